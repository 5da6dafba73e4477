"""ArrayRecord shards: the converter, the shard source, resuming, damaged shards, training."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fake_cifar import make_fake_cifar, write_pickle
from PIL import Image

from resnet_task.arrayrecord import METADATA_FILE, decode_record, encode_record
from resnet_task.convert import MANIFEST_FILE, convert
from resnet_task.convert import main as convert_main
from resnet_task.data import DataError, load_cifar, load_dataset, load_image_folder

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("dog", "ant", "cat")  # not in sorted order: labels come from sorted names


def make_folder(root: Path, per_class: int = 6, size: int = 8, seed: int = 0) -> Path:
    """``root/<class>/<i>.png|jpg``: random pixels, so every example is distinct."""
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size + i % 2, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.{('png', 'jpg')[i % 2]}")
    return root


def assert_same_examples(a, b) -> None:
    """Two datasets give the same examples, index by index."""
    assert len(a) == len(b)
    for i in range(len(a)):
        x, y = a[i], b[i]
        assert set(x) == set(y) == {"image", "label"}
        assert x["image"].dtype == y["image"].dtype == np.uint8
        np.testing.assert_array_equal(x["image"], y["image"])
        assert isinstance(x["label"], np.int32) and x["label"] == y["label"]


def shard_files(dst: Path) -> list[Path]:
    return sorted(dst.glob("*.arrayrecord"))


def test_record_format_round_trip():
    label, data = decode_record(encode_record(7, b"\x89PNG..."))
    assert (label, bytes(data)) == (7, b"\x89PNG...")
    with pytest.raises(ValueError, match="not b'NXR1'"):
        decode_record(b"XXXX\x00\x00\x00\x00")


@pytest.mark.parametrize("layout", ["flat", "train_val"])
def test_folder_shards_equal_the_folder_source(tmp_path, layout):
    if layout == "flat":
        src = make_folder(tmp_path / "src")
    else:
        make_folder(tmp_path / "src" / "train")
        make_folder(tmp_path / "src" / "val", per_class=2, seed=1)
        src = tmp_path / "src"
    result = convert(src, tmp_path / "dst", num_shards=4, workers=2, progress=False)
    meta = json.loads((tmp_path / "dst" / METADATA_FILE).read_text())
    assert meta == result.metadata
    assert meta["class_names"] == ["ant", "cat", "dog"]
    assert list(meta["splits"]) == (["train"] if layout == "flat" else ["train", "val"])
    assert meta["splits"]["train"]["class_counts"] == [6, 6, 6]
    assert len(result.written) == (4 if layout == "flat" else 8) and result.skipped == []

    train, val, info = load_dataset("arrayrecord", str(tmp_path / "dst"), 8,
                                    val_fraction=0.25, seed=3)
    f_train, f_val, f_info = load_image_folder(src, 8, val_fraction=0.25, seed=3)
    assert info.name == "arrayrecord"
    for field in ("num_classes", "image_shape", "mean", "std", "num_train", "num_val",
                  "class_names"):
        assert getattr(info, field) == getattr(f_info, field)
    assert_same_examples(train, f_train)
    assert_same_examples(val, f_val)
    # The default size is the folder loader's (64); a Grain worker gets a pickled copy.
    _, _, default = load_dataset("arrayrecord", str(tmp_path / "dst"), None)
    assert default.image_shape == (64, 64, 3)
    assert_same_examples(pickle.loads(pickle.dumps(train)), f_train)


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_shards_equal_load_cifar(tmp_path, num_classes):
    d, _ = make_fake_cifar(tmp_path / "src", num_classes, n=5)
    if num_classes == 10:  # the optional names file of the real archive
        write_pickle(d / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    dst = tmp_path / "dst"
    assert convert_main([str(tmp_path / "src"), str(dst), "--examples-per-shard", "4",
                         "--workers", "3", "--no-progress"]) == 0
    meta = json.loads((dst / METADATA_FILE).read_text())
    assert meta["source"]["kind"] == f"cifar{num_classes}" and meta["image_size"] == 32
    assert list(meta["splits"]) == ["train", "test"]
    names = [f"c{i}" for i in range(10)] if num_classes == 10 else [
        str(i) for i in range(100)]
    train, test, info = load_dataset("arrayrecord", str(dst), None)
    c_train, c_test, c_info = load_cifar(d, num_classes)
    assert info.class_names == tuple(names) and info.num_classes == num_classes
    assert info.image_shape == (32, 32, 3)
    assert (info.mean, info.std) == (c_info.mean, c_info.std)
    assert (info.num_train, info.num_val) == (c_info.num_train, c_info.num_val)
    assert_same_examples(train, c_train)  # PNG is lossless: the same pixels
    assert_same_examples(test, c_test)


def test_a_rerun_resumes_skipping_completed_shards(tmp_path):
    src = make_folder(tmp_path / "src")
    dst = tmp_path / "dst"
    convert(src, dst, num_shards=4, workers=2, progress=False)
    expected, _, _ = load_dataset("arrayrecord", str(dst), 8, val_fraction=0.25)
    expected = [expected[i] for i in range(len(expected))]
    shards = shard_files(dst)
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}
    # An interrupted run: shard 1 never finished (a temp file, no manifest line, and the
    # last manifest line cut short), shard 2's file was damaged, metadata not written yet.
    manifest = dst / MANIFEST_FILE
    lines = [x for x in manifest.read_text().splitlines() if shards[1].name not in x]
    manifest.write_text("\n".join(lines) + '\n{"file": "train-000')
    shards[1].rename(shards[1].with_name(shards[1].name + ".tmp"))
    shards[2].write_bytes(shards[2].read_bytes()[:1000])
    (dst / METADATA_FILE).unlink()
    with pytest.raises(DataError, match="python -m resnet_task.convert"):
        load_dataset("arrayrecord", str(dst), 8)

    result = convert(src, dst, num_shards=4, workers=2, progress=False)
    assert result.written == [shards[1].name, shards[2].name]
    assert result.skipped == [shards[0].name, shards[3].name]
    for p in (shards[0], shards[3]):  # not rewritten
        assert p.stat().st_mtime_ns == stamps[p.name]
    assert not list(dst.glob("*.tmp"))
    train, _, _ = load_dataset("arrayrecord", str(dst), 8, val_fraction=0.25)
    assert_same_examples(train, expected)
    # A finished conversion re-run writes nothing; other options are another conversion.
    assert convert(src, dst, num_shards=4, progress=False).written == []
    with pytest.raises(DataError, match="different conversion.*empty DST"):
        convert(src, dst, num_shards=2, progress=False)


def test_a_missing_or_damaged_shard_fails_at_build_naming_it(tmp_path):
    src = make_folder(tmp_path / "src")
    dst = tmp_path / "dst"
    convert(src, dst, num_shards=3, progress=False)
    shard = shard_files(dst)[1]
    data = shard.read_bytes()
    shard.unlink()
    with pytest.raises(DataError) as e:
        load_dataset("arrayrecord", str(dst), 8)
    assert f"shard '{shard}' is missing" in str(e.value)
    assert f"python -m resnet_task.convert {src.resolve()} {dst}" in str(e.value)
    shard.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(DataError, match=rf"shard '{shard}' has \d+ bytes.*truncated"):
        load_dataset("arrayrecord", str(dst), 8)
    shard.write_bytes(b"\0" * len(data))  # the right size, but not an ArrayRecord file
    with pytest.raises(DataError, match=f"shard '{shard}' cannot be"):
        load_dataset("arrayrecord", str(dst), 8)
    shard.write_bytes(data)
    load_dataset("arrayrecord", str(dst), 8)  # intact again
    (dst / METADATA_FILE).unlink()
    with pytest.raises(DataError, match=r"metadata.json' not found.*python -m resnet_task"):
        load_dataset("arrayrecord", str(dst), 8)
    with pytest.raises(DataError, match="not found"):
        load_dataset("arrayrecord", str(tmp_path / "nope"), 8)
    with pytest.raises(DataError, match="pass --data-dir"):
        load_dataset("arrayrecord", None, 8)


def test_a_corrupt_record_follows_the_bad_images_policy(tmp_path, caplog):
    src = make_folder(tmp_path / "src")
    dst = tmp_path / "dst"
    convert(src, dst, num_shards=2, progress=False)
    shard = shard_files(dst)[0]
    data = bytearray(shard.read_bytes())
    # Flip a byte inside record 4's image bytes: the file keeps its size and opens, but
    # the record's checksum no longer matches.
    payload = (src / "ant" / "4.png").read_bytes()
    at = bytes(data).find(payload)
    assert at > 0
    data[at + len(payload) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    train, _, _ = load_dataset("arrayrecord", str(dst), 8, val_fraction=0.25)
    full, _, _ = load_dataset("arrayrecord", str(dst), 8, val_fraction=0.25,
                              bad_images="skip", max_bad_fraction=0.1)
    with pytest.raises(DataError) as e:
        for i in range(len(train)):
            train[i]
    assert f"record 4 of shard '{shard}'" in str(e.value)
    assert "--bad-images skip" in str(e.value) and "python -m resnet_task.convert" in str(e.value)
    with caplog.at_level("WARNING", logger="resnet_task"):
        examples = [full[i] for i in range(len(full))]
    assert f"skipped undecodable record 4 of shard '{shard}'" in caplog.text
    assert len(examples) == len(train)


def test_converter_command_line_errors(tmp_path, capsys):
    assert convert_main([str(tmp_path / "nope"), str(tmp_path / "dst")]) == 2
    assert "not found" in capsys.readouterr().err
    src = make_folder(tmp_path / "src")
    assert convert_main([str(src), str(src / "shards")]) == 2
    assert "inside SRC" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert_main([str(src), str(tmp_path / "d"), "--num-shards", "2",
                      "--examples-per-shard", "3"])
    assert convert_main([str(src), str(tmp_path / "d"), "--workers", "0"]) == 2
    assert "--workers must be >= 1" in capsys.readouterr().err


def _example_main():
    spec = importlib.util.spec_from_file_location("train_resnet",
                                                  ROOT / "examples" / "train_resnet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_example_flags_for_arrayrecord(tmp_path, capsys):
    main = _example_main()
    assert main(["--dataset", "arrayrecord", "--verify-images"]) == 2
    assert "--dataset folder only" in capsys.readouterr().err
    assert main(["--dataset", "arrayrecord", "--data-dir", str(tmp_path)]) == 2
    assert "metadata.json' not found" in capsys.readouterr().err


@pytest.mark.parametrize("workers", ["0", pytest.param("2", marks=pytest.mark.slow)])
def test_the_example_trains_on_shards(tmp_path, workers):
    src = make_folder(tmp_path / "src", per_class=8)
    dst = tmp_path / "dst"
    convert(src, dst, num_shards=2, progress=False)
    # With Grain worker processes (slow: ~15 s more) the shard source is pickled into each.
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_resnet.py"), "--dataset", "arrayrecord",
         "--data-dir", str(dst), "--image-size", "8", "--batch-size", "4", "--epochs", "1",
         "--max-steps", "3", "--bad-images", "skip", "--workers", workers, "--no-checkpoint",
         "--disable-plugin", "progress", "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "arrayrecord: 21 train / 3 held-out examples, 3 classes" in proc.stdout
    assert "held-out top-1 accuracy" in proc.stdout and "after 3 steps" in proc.stdout
