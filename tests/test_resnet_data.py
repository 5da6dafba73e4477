"""Datasets and transforms of the ResNet task: real on-disk formats, faked small in tmp_path."""

from __future__ import annotations

import inspect
import os
import pickle
from collections import Counter
from pathlib import Path

import grain
import numpy as np
import pytest
from fake_cifar import make_fake_cifar, write_pickle
from PIL import Image

from resnet_task.data import (
    DataError,
    DatasetInfo,
    load_cifar,
    load_dataset,
    load_digits,
    load_image_folder,
    load_synthetic,
)
from resnet_task.transforms import Normalize, RandomCrop, RandomHorizontalFlip


def _materialize(ds: grain.MapDataset) -> tuple[np.ndarray, np.ndarray]:
    items = [ds[i] for i in range(len(ds))]
    return np.stack([e["image"] for e in items]), np.array([e["label"] for e in items])


def _check_example(example: dict, shape: tuple[int, ...], num_classes: int) -> None:
    assert set(example) == {"image", "label"}
    assert example["image"].shape == shape and example["image"].dtype == np.uint8
    assert isinstance(example["label"], np.int32) and 0 <= example["label"] < num_classes


# ---- digits ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_digits_sizes_shapes_and_labels(digits):
    train, val, info = digits
    assert isinstance(info, DatasetInfo) and info.num_classes == 10
    assert len(train) + len(val) == 1797
    assert (info.num_train, info.num_val) == (len(train), len(val))
    assert len(val) == pytest.approx(0.2 * 1797, abs=10)
    assert info.image_shape == (16, 16, 1)
    _check_example(train[0], (16, 16, 1), 10)
    _check_example(val[len(val) - 1], (16, 16, 1), 10)
    x, _ = _materialize(train)
    assert info.mean[0] == pytest.approx(x.mean() / 255, rel=1e-6)
    assert info.std[0] == pytest.approx(x.std() / 255, rel=1e-6)


def test_digits_split_is_deterministic_disjoint_and_stratified(digits):
    train, val, _ = digits
    train2, val2, _ = load_digits()
    for a, b in ((train, train2), (val, val2)):
        xa, ya = _materialize(a)
        xb, yb = _materialize(b)
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    xt, yt = _materialize(train)
    xv, yv = _materialize(val)
    # All 1797 digit images are distinct, so disjointness can be checked by content.
    assert not {x.tobytes() for x in xt} & {x.tobytes() for x in xv}
    assert set(yt.tolist()) == set(yv.tolist()) == set(range(10))
    # Each class is split in (about) the same proportion.
    frac = np.bincount(yv, minlength=10) / (np.bincount(yv, minlength=10) + np.bincount(yt))
    assert np.all(np.abs(frac - 0.2) < 0.02)


def test_digits_native_size_is_a_partition_of_the_raw_data():
    from sklearn.datasets import load_digits as sk_load_digits

    train, val, info = load_digits(image_size=8, val_fraction=0.3, seed=1)
    assert info.image_shape == (8, 8, 1)
    raw = sk_load_digits()
    expected = np.rint(raw.images * 255 / 16).astype(np.uint8)
    key = lambda x, y: (x.tobytes(), int(y))  # noqa: E731
    got = Counter()
    for ds in (train, val):
        got.update(key(x, y) for x, y in zip(*_materialize(ds), strict=True))
    assert got == Counter(key(x[..., None], y) for x, y in zip(expected, raw.target, strict=True))


def test_digits_bad_arguments():
    with pytest.raises(DataError, match="val_fraction"):
        load_digits(val_fraction=1.0)
    with pytest.raises(DataError, match="image_size"):
        load_digits(image_size=0)


# ---- CIFAR -----------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_loads_fake_dirs(tmp_path, num_classes):
    d, expected = make_fake_cifar(tmp_path, num_classes)
    for where in (d, tmp_path):  # the directory itself or its parent
        train, test, info = load_cifar(where, num_classes=num_classes)
        assert info.num_classes == num_classes and info.image_shape == (32, 32, 3)
        assert info.name == f"cifar{num_classes}"
        assert len(info.mean) == len(info.std) == 3
        assert (info.num_train, info.num_val) == (len(train), len(test))
        _check_example(train[0], (32, 32, 3), num_classes)
        for ds, split in ((train, "train"), (test, "test")):
            x, y = _materialize(ds)
            np.testing.assert_array_equal(x, expected[split][0])  # channel-major -> HWC
            np.testing.assert_array_equal(y, expected[split][1])
    assert len(train) == (20 if num_classes == 10 else 4)


def test_cifar_through_load_dataset(tmp_path):
    make_fake_cifar(tmp_path, 100)
    train, _, info = load_dataset("cifar100", str(tmp_path), None)
    assert info.num_classes == 100 and len(train) == 4
    with pytest.raises(DataError, match="--data-dir"):
        load_dataset("cifar10", None, None)
    with pytest.raises(DataError, match="32x32"):
        load_dataset("cifar100", str(tmp_path), 64)


def test_cifar_missing_dir(tmp_path):
    with pytest.raises(DataError) as e:
        load_cifar(tmp_path / "nope")
    msg = str(e.value)
    assert "not found" in msg and "cifar-10-batches-py" in msg and "--data-dir" in msg
    assert "data_batch_1..5" in msg and "test_batch" in msg
    with pytest.raises(DataError, match="contains neither 'cifar-100-python/'"):
        load_cifar(tmp_path, num_classes=100)
    with pytest.raises(DataError, match="10 or 100"):
        load_cifar(tmp_path, num_classes=20)


def test_cifar_missing_batch_file(tmp_path):
    d, _ = make_fake_cifar(tmp_path)
    (d / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"missing \['data_batch_3'\].*extracting"):
        load_cifar(tmp_path)


@pytest.mark.parametrize(
    "corrupt, problem",
    [
        (lambda b: b.pop(b"labels"), "lacks key"),
        (lambda b: b.update({b"data": b[b"data"][:, :3000]}), r"shape \(N, 3072\)"),
        (lambda b: b.update({b"data": b[b"data"].astype(np.float32)}), "uint8"),
        (lambda b: b.update({b"labels": b[b"labels"][:-1]}), "one per image"),
    ],
)
def test_cifar_bad_pickle_contents(tmp_path, corrupt, problem):
    d, _ = make_fake_cifar(tmp_path)
    path = d / "data_batch_2"
    with open(path, "rb") as f:
        batch = pickle.load(f)
    corrupt(batch)
    write_pickle(path, batch)
    with pytest.raises(DataError, match=problem) as e:
        load_cifar(d)
    assert "data_batch_2" in str(e.value) and "extracting" in str(e.value)


def test_cifar_unreadable_pickles(tmp_path):
    d, _ = make_fake_cifar(tmp_path)
    (d / "test_batch").write_bytes(b"this is not a pickle")
    with pytest.raises(DataError, match="cannot read CIFAR batch .*test_batch.*extracting"):
        load_cifar(d)
    write_pickle(d / "test_batch", [1, 2, 3])
    with pytest.raises(DataError, match="not a dict"):
        load_cifar(d)


class _Exploit:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def test_cifar_pickle_cannot_run_code(tmp_path):
    d, _ = make_fake_cifar(tmp_path)
    marker = tmp_path / "pwned"
    write_pickle(d / "test_batch", {b"data": _Exploit(str(marker)), b"labels": []})
    with pytest.raises(DataError, match="not allowed"):
        load_cifar(d)
    assert not marker.exists()


def test_cifar_label_out_of_range(tmp_path):
    d, _ = make_fake_cifar(tmp_path)
    path = d / "data_batch_4"
    with open(path, "rb") as f:
        batch = pickle.load(f)
    batch[b"labels"][2] = 10
    write_pickle(path, batch)
    with pytest.raises(DataError) as e:
        load_cifar(tmp_path)
    msg = str(e.value)
    assert "data_batch_4" in msg and "label 10 at index 2" in msg and "[0, 10)" in msg


def test_cifar_python2_style_pickle_loads(tmp_path):
    """Real CIFAR files name numpy.core.multiarray (NumPy 1.x); NumPy 2 writes numpy._core."""
    d, expected = make_fake_cifar(tmp_path)
    for name in ["test_batch"]:
        raw = (d / name).read_bytes()
        assert b"numpy._core.multiarray" in raw
        (d / name).write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    _, test, _ = load_cifar(d)
    np.testing.assert_array_equal(_materialize(test)[0], expected["test"][0])


# ---- image folder ----------------------------------------------------------------------------

_COLORS = {"ant": (200, 20, 20), "cat": (20, 200, 20), "dog": (20, 20, 200)}


def _write_image(path: Path, color, size=(20, 12), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path)


def make_folder(root: Path, per_class: int = 4, classes=("dog", "ant", "cat")) -> Path:
    for c in classes:
        for i in range(per_class):
            ext = ("png", "jpg", "bmp", "PNG")[i % 4]
            _write_image(root / c / f"{i}.{ext}", _COLORS[c], size=(20 + i, 12 + 2 * i))
    (root / "ant" / "notes.txt").write_text("not an image")  # ignored
    (root / ".hidden").mkdir()  # ignored: not a class
    return root


def _check_colours(ds, info) -> None:
    for i in range(len(ds)):
        e = ds[i]
        assert e["image"].shape == (16, 16, 3) and e["image"].dtype == np.uint8
        name = info.class_names[int(e["label"])]
        assert int(np.argmax(e["image"].reshape(-1, 3).mean(0))) == np.argmax(_COLORS[name])


def test_image_folder_loads_with_sorted_labels(tmp_path):
    make_folder(tmp_path)
    _write_image(tmp_path / "cat" / "palette.gif", _COLORS["cat"], mode="P")  # -> RGB
    _write_image(tmp_path / "dog" / "alpha.webp", _COLORS["dog"], mode="RGBA")
    train, val, info = load_image_folder(tmp_path, image_size=16, val_fraction=0.25)
    assert info.class_names == ("ant", "cat", "dog") and info.num_classes == 3
    assert info.image_shape == (16, 16, 3)
    assert len(train) + len(val) == 14 and (info.num_train, info.num_val) == (11, 3)
    _check_example(train[0], (16, 16, 3), 3)
    _check_colours(train, info)
    _check_colours(val, info)
    # One val example per class, and the split is the same on every call.
    assert sorted(_materialize(val)[1].tolist()) == [0, 1, 2]
    _, val2, _ = load_image_folder(tmp_path, image_size=16, val_fraction=0.25)
    np.testing.assert_array_equal(_materialize(val)[0], _materialize(val2)[0])


def test_image_folder_train_val_layout(tmp_path):
    make_folder(tmp_path / "train", per_class=3)
    make_folder(tmp_path / "val", per_class=1)
    train, val, info = load_dataset("folder", str(tmp_path), 16)
    assert info.class_names == ("ant", "cat", "dog")
    assert (len(train), len(val)) == (9, 3)
    _check_colours(train, info)
    _check_colours(val, info)


def test_image_folder_layout_errors(tmp_path):
    with pytest.raises(DataError, match="not found.*--data-dir"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "loose.png").write_bytes(b"")
    with pytest.raises(DataError, match="no class sub-folders.*--data-dir"):
        load_image_folder(tmp_path)
    make_folder(tmp_path / "train")
    with pytest.raises(DataError, match="no 'val/'"):
        load_image_folder(tmp_path)
    make_folder(tmp_path / "val", classes=("ant", "cat"))
    with pytest.raises(DataError, match=r"only in train: \['dog'\]"):
        load_image_folder(tmp_path)


def test_image_folder_empty_class(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "eel").mkdir()
    (tmp_path / "eel" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError) as e:
        load_image_folder(tmp_path)
    assert str(tmp_path / "eel") in str(e.value) and "no images" in str(e.value)


def test_image_folder_corrupt_images_are_named(tmp_path):
    make_folder(tmp_path)
    garbage = tmp_path / "cat" / "garbage.png"
    garbage.write_bytes(os.urandom(64))
    good = tmp_path / "dog" / "0.png"
    truncated = tmp_path / "dog" / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:-20])
    load_image_folder(tmp_path)  # building only lists the folders: no file is opened
    with pytest.raises(DataError) as e:
        load_image_folder(tmp_path, verify=True)  # --verify-images: every bad file at once
    msg = str(e.value)
    assert "2 unreadable or corrupt" in msg and "delete or replace" in msg
    assert str(garbage) in msg and str(truncated) in msg


def _folder_with_a_bad_file(root: Path) -> Path:
    make_folder(root, per_class=6)
    bad = root / "cat" / "0b-broken.png"  # sorts between 0.png and 1.jpg
    bad.write_bytes((root / "cat" / "0.png").read_bytes()[:-40])
    return bad


def test_an_undecodable_file_stops_the_read_naming_it_by_default(tmp_path):
    bad = _folder_with_a_bad_file(tmp_path)
    train, val, _ = load_image_folder(tmp_path, image_size=16, val_fraction=0.25)
    with pytest.raises(DataError) as e:
        for ds in (train, val):
            for i in range(len(ds)):
                ds[i]
    assert str(bad) in str(e.value) and "--bad-images skip" in str(e.value)
    with pytest.raises(DataError, match="choose one of stop, skip"):
        load_image_folder(tmp_path, bad_images="ignore")


def test_skip_replaces_a_bad_file_deterministically_and_stops_past_the_bound(tmp_path, caplog):
    from resnet_task.image_folder import ImageFileSource, scan_folder

    bad = _folder_with_a_bad_file(tmp_path)
    names, paths, labels = scan_folder(tmp_path)
    index = paths.index(str(bad))
    first = ImageFileSource(paths, labels, 16, bad_images="skip", max_bad_fraction=0.1)
    with caplog.at_level("WARNING", logger="resnet_task"):
        replaced = first[index]
    assert str(bad) in caplog.text and "skipped undecodable image" in caplog.text
    # The replacement is the next file in index order, on any reader (another process,
    # a resumed run): a fresh source gives the same example.
    np.testing.assert_array_equal(replaced["image"], first[index + 1]["image"])
    assert int(replaced["label"]) == int(labels[index + 1])
    again = ImageFileSource(paths, labels, 16, bad_images="skip", max_bad_fraction=0.1)
    np.testing.assert_array_equal(again[index]["image"], replaced["image"])
    assert list(first.skipped) == [str(bad)]
    # Past the bound (here: any bad file at all), the reader stops, naming the files.
    strict = ImageFileSource(paths, labels, 16, bad_images="skip", max_bad_fraction=0.0)
    with pytest.raises(DataError, match="more than max_bad_fraction=0.0") as e:
        strict[index]
    assert str(bad) in str(e.value)


# ---- synthetic -------------------------------------------------------------------------------


def test_synthetic_deterministic_and_learnable():
    train, val, info = load_synthetic(400, image_shape=(12, 12, 3), num_classes=10, seed=3)
    assert (len(train), len(val)) == (320, 80) and info.image_shape == (12, 12, 3)
    _check_example(train[5], (12, 12, 3), 10)
    xt, yt = _materialize(train)
    xv, yv = _materialize(val)
    again_x, again_y = _materialize(load_synthetic(400, (12, 12, 3), 10, seed=3)[0])
    np.testing.assert_array_equal(xt, again_x)
    np.testing.assert_array_equal(yt, again_y)
    assert not np.array_equal(xt, _materialize(load_synthetic(400, (12, 12, 3), 10, seed=4)[0])[0])
    assert np.bincount(yt, minlength=10).min() >= 28  # balanced classes
    # Nearest class mean (fit on train) classifies held-out examples far above chance (10%).
    xt_f, xv_f = xt.reshape(len(xt), -1).astype(np.float32), xv.reshape(len(xv), -1)
    means = np.stack([xt_f[yt == c].mean(0) for c in range(10)])
    dist = ((xv_f[:, None, :].astype(np.float32) - means[None]) ** 2).sum(-1)
    assert (dist.argmin(1) == yv).mean() > 0.9


def test_load_dataset_dispatch():
    _, _, info = load_dataset("synthetic", None, 8, num_examples=20, num_classes=4)
    assert info.image_shape == (8, 8, 3) and info.num_classes == 4
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*digits.*cifar10.*synthetic"):
        load_dataset("mnist", None, None)


# ---- transforms ------------------------------------------------------------------------------


def _known_image(h: int = 8, w: int = 6, c: int = 3) -> np.ndarray:
    img = (np.arange(h * w * c) % 250 + 1).astype(np.uint8).reshape(h, w, c)  # no zeros
    img.flags.writeable = False  # transforms must not write into their input
    return img


def test_random_crop_is_a_shifted_copy():
    img = _known_image()
    crop = RandomCrop(2)
    padded = np.pad(img, ((2, 2), (2, 2), (0, 0)))
    offsets = set()
    for seed in range(60):
        element = {"image": img, "label": np.int32(3)}
        out = crop.random_map(element, np.random.default_rng(seed))
        assert out is not element and out["image"].shape == img.shape
        assert out["image"].dtype == np.uint8 and out["label"] == 3
        matches = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if np.array_equal(out["image"], padded[dy : dy + 8, dx : dx + 6])
        ]
        assert len(matches) == 1
        offsets.add(matches[0])
        again = crop.random_map(element, np.random.default_rng(seed))
        np.testing.assert_array_equal(out["image"], again["image"])
    assert len(offsets) > 15  # offsets cover the 5x5 range
    np.testing.assert_array_equal(
        RandomCrop(0).random_map({"image": img}, np.random.default_rng(0))["image"], img
    )


def test_random_crop_reflect_and_bad_args():
    img = _known_image()
    out = RandomCrop(3, mode="reflect").random_map({"image": img}, np.random.default_rng(1))
    padded = np.pad(img, ((3, 3), (3, 3), (0, 0)), mode="reflect")
    assert any(
        np.array_equal(out["image"], padded[dy : dy + 8, dx : dx + 6])
        for dy in range(7)
        for dx in range(7)
    )
    with pytest.raises(ValueError):
        RandomCrop(-1)
    with pytest.raises(ValueError):
        RandomCrop(2, mode="wrap")


def test_random_horizontal_flip():
    img = _known_image()
    flipped = RandomHorizontalFlip(1.0).random_map({"image": img}, np.random.default_rng(0))
    np.testing.assert_array_equal(flipped["image"], img[:, ::-1])
    kept = RandomHorizontalFlip(0.0).random_map({"image": img}, np.random.default_rng(0))
    np.testing.assert_array_equal(kept["image"], img)
    half = RandomHorizontalFlip(0.5)
    flips = [
        np.array_equal(half.random_map({"image": img}, np.random.default_rng(s))["image"], img)
        for s in range(40)
    ]
    assert 5 < sum(flips) < 35
    with pytest.raises(ValueError):
        RandomHorizontalFlip(1.5)


def test_normalize_values_and_dtype():
    img = _known_image()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    element = {"image": img, "label": np.int32(7)}
    out = Normalize(mean, std).map(element)
    assert out["image"].dtype == np.float32 and out["image"].shape == img.shape
    expected = (img / 255.0 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(out["image"], expected, rtol=1e-5, atol=1e-5)
    assert isinstance(out["label"], np.int32) and out["label"] == 7
    assert element["image"] is img  # input untouched
    gray = Normalize((0.5,), (0.25,)).map({"image": img[..., :1], "label": np.int32(0)})
    np.testing.assert_allclose(gray["image"], (img[..., :1] / 255 - 0.5) / 0.25, atol=1e-5)
    with pytest.raises(ValueError, match="channel statistics"):
        Normalize(mean, std).map({"image": img[..., :1]})
    with pytest.raises(ValueError):
        Normalize((0.5,), (0.0,))


def test_transforms_pickle_roundtrip():
    img = _known_image()
    for t in (RandomCrop(4), RandomHorizontalFlip(0.3), Normalize((0.1, 0.2, 0.3), (1, 1, 1))):
        clone = pickle.loads(pickle.dumps(t))
        assert type(clone) is type(t) and repr(clone) == repr(t)
        if isinstance(t, grain.transforms.Map):
            np.testing.assert_array_equal(
                clone.map({"image": img})["image"], t.map({"image": img})["image"]
            )
        else:
            a = clone.random_map({"image": img}, np.random.default_rng(5))["image"]
            b = t.random_map({"image": img}, np.random.default_rng(5))["image"]
            np.testing.assert_array_equal(a, b)


def _pipeline(ds: grain.MapDataset, info: DatasetInfo) -> grain.MapDataset:
    return (
        ds.shuffle(seed=0)
        .random_map(RandomCrop(4), seed=1)
        .random_map(RandomHorizontalFlip(), seed=2)
        .map(Normalize(info.mean, info.std))
        .batch(4)
    )


def test_grain_pipeline_deterministic_across_worker_processes():
    # grain 0.2.18 reads an absl flag (worker profiling) when an mp_prefetch iterator starts and
    # jax is installed; outside absl.app.run nothing has parsed flags, so mark them parsed.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    train, _, info = load_synthetic(40, image_shape=(16, 16, 3), num_classes=4, seed=0)
    reference = list(_pipeline(train, info))
    assert len(reference) == 8
    assert reference[0]["image"].shape == (4, 16, 16, 3)
    assert reference[0]["image"].dtype == np.float32
    assert reference[0]["label"].dtype == np.int32
    again = list(_pipeline(load_synthetic(40, (16, 16, 3), 4, seed=0)[0], info))
    it = (
        _pipeline(train, info)
        .to_iter_dataset()
        .mp_prefetch(grain.MultiprocessingOptions(num_workers=2))
        .__iter__()
    )
    try:
        in_workers = list(it)
    finally:
        it.close()
    for other in (again, in_workers):
        assert len(other) == len(reference)
        for a, b in zip(reference, other, strict=True):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])


# ---- Grain behaviour the engine and these transforms rely on (grain 0.2.18) ----------------


def test_grain_contracts():
    assert list(inspect.signature(grain.transforms.RandomMap.random_map).parameters) == [
        "self",
        "element",
        "rng",
    ]
    ds = grain.MapDataset.range(10)
    assert list(ds[1::3]) == [1, 4, 7]  # process sharding by slicing works on MapDataset
    # shuffle + repeat: each epoch is a different permutation of all elements.
    rep = ds.shuffle(seed=0).repeat(2)
    first, second = list(rep)[:10], list(rep)[10:]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    # random_map's rng depends on (seed, index): the same index gives the same draw whatever
    # else is read, and a repeated dataset gets fresh draws in the next epoch.
    noisy = ds.random_map(lambda x, rng: int(rng.integers(1 << 30)), seed=7)
    assert noisy[3] == noisy[3] == list(noisy)[3]
    rep_noisy = ds.random_map(lambda x, rng: int(rng.integers(1 << 30)), seed=7).repeat(2)
    assert list(rep_noisy)[:10] != list(rep_noisy)[10:]


# ---- batch forms (what the Trainer runs): same operations, one call per batch ---------------


def _batch_of(img: np.ndarray, n: int) -> dict[str, np.ndarray]:
    images = np.stack([np.roll(img, k, axis=0) for k in range(n)])
    images.flags.writeable = False  # a batch transform must not write into its input
    return {"image": images, "label": np.arange(n, dtype=np.int32)}


def test_random_crop_batch_is_a_shifted_copy_per_example():
    from nnx_trainer.transforms import example_keys

    batch = _batch_of(_known_image(), 64)
    keys = example_keys(3, np.arange(64))
    out = RandomCrop(2).map_batch(batch, keys)
    assert out["image"].shape == batch["image"].shape and out["image"].dtype == np.uint8
    np.testing.assert_array_equal(out["label"], batch["label"])
    offsets = set()
    for b in range(64):
        padded = np.pad(batch["image"][b], ((2, 2), (2, 2), (0, 0)))
        matches = [(dy, dx) for dy in range(5) for dx in range(5)
                   if np.array_equal(out["image"][b], padded[dy : dy + 8, dx : dx + 6])]
        assert matches, f"example {b} is not a crop of its padded image"
        offsets.add(matches[0])
    assert len(offsets) > 15  # offsets cover the 5x5 range
    again = RandomCrop(2).map_batch(batch, keys)
    np.testing.assert_array_equal(out["image"], again["image"])  # keys decide, nothing else
    other = RandomCrop(2).map_batch(batch, example_keys(4, np.arange(64)))
    assert not np.array_equal(out["image"], other["image"])
    # An example's crop depends on its key only, not on its row or its batch-mates.
    alone = RandomCrop(2).map_batch({"image": batch["image"][5:6]}, keys[5:6])
    np.testing.assert_array_equal(alone["image"][0], out["image"][5])
    reflect = RandomCrop(3, mode="reflect").map_batch(batch, keys)
    padded = np.pad(batch["image"][0], ((3, 3), (3, 3), (0, 0)), mode="reflect")
    assert any(np.array_equal(reflect["image"][0], padded[dy : dy + 8, dx : dx + 6])
               for dy in range(7) for dx in range(7))


def test_random_horizontal_flip_batch():
    from nnx_trainer.transforms import example_keys

    batch = _batch_of(_known_image(), 80)
    keys = example_keys(0, np.arange(80))
    out = RandomHorizontalFlip(0.5).map_batch(batch, keys)["image"]
    flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, batch["image"], strict=True)]
    kept = [np.array_equal(o, i) for o, i in zip(out, batch["image"], strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 20 < sum(flipped) < 60
    all_flipped = RandomHorizontalFlip(1.0).map_batch(batch, keys)["image"]
    np.testing.assert_array_equal(all_flipped, batch["image"][:, :, ::-1])
    none = RandomHorizontalFlip(0.0).map_batch(batch, keys)["image"]
    np.testing.assert_array_equal(none, batch["image"])


def test_normalize_batch_equals_per_example():
    batch = _batch_of(_known_image(), 5)
    norm = Normalize((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    out = norm.map_batch(batch, np.zeros(5, np.uint64))["image"]
    expected = np.stack([norm.map({"image": i})["image"] for i in batch["image"]])
    np.testing.assert_array_equal(out, expected)
    gray = Normalize((0.5,), (0.25,)).map_batch({"image": batch["image"][..., 0]}, None)
    np.testing.assert_allclose(gray["image"], (batch["image"][..., 0] / 255 - 0.5) / 0.25,
                               atol=1e-5)
    with pytest.raises(ValueError, match="channel statistics"):
        norm.map_batch({"image": batch["image"][..., :1]}, None)


def test_array_source_batched_read_matches_single_reads(digits):
    train = digits[0]
    source = train._source if hasattr(train, "_source") else None
    if source is None:
        pytest.skip("digits train set is not a plain ArraySource dataset")
    rows = source._getitems([5, 0, 5, 17])
    for index, row in zip([5, 0, 5, 17], rows, strict=True):
        single = source[index]
        np.testing.assert_array_equal(row["image"], single["image"])
        assert row["label"] == single["label"]
