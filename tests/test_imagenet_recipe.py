"""The ImageNet recipe: random resized crops, the evaluation centre crop, draft-mode
decoding, the --recipe imagenet preset, and the example run end to end with it."""

from __future__ import annotations

import importlib.util
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from nnx_trainer.data import PipelineConfig, eval_pipeline, train_pipeline
from resnet_task.data import load_image_folder
from resnet_task.errors import DataError
from resnet_task.image_folder import EncodedImage
from resnet_task.imagenet import (
    CenterCrop,
    RandomResizedCrop,
    center_crop_box,
    decode_crop,
    resolve_recipe,
    sample_crop_box,
)
from resnet_task.task import ResNetConfig, ResNetTask

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_resnet.py"


def _smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A photo-like RGB image: gradients plus a few soft blobs (JPEG-friendly, not flat)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = []
    for c in range(3):
        v = 60 + 120 * (x / width) * (c != 1) + 100 * (y / height) * (c != 0)
        for _ in range(4):
            cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(8, 30)
            v += rng.uniform(-60, 60) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))
        channels.append(v)
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def make_jpeg_folder(root: Path, classes: int = 4, per_class: int = 6,
                     size: tuple[int, int] = (120, 90)) -> Path:
    """``classes`` x ``per_class`` JPEGs of ``size`` (w, h), each class its own tint."""
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = _smooth_image(size[1], size[0], seed=c * 100 + i)
            pixels[..., c % 3] = np.clip(pixels[..., c % 3].astype(int) + 60, 0, 255)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.jpg", quality=90)
    return root


def _encoded_train(root: Path, **policy):
    train, _, _ = load_image_folder(root, image_size=32, val_fraction=0.25, encoded=True,
                                    **policy)
    return train._source


# ---- RandomResizedCrop ----------------------------------------------------------------


def test_random_resized_crop_output_shapes_for_files_and_arrays(tmp_path):
    source = _encoded_train(make_jpeg_folder(tmp_path, classes=2, per_class=3))
    element = source[0]
    assert isinstance(element["image"], EncodedImage)
    crop = RandomResizedCrop(40)
    out = crop.random_map(element, np.random.default_rng(0))
    assert out["image"].shape == (40, 40, 3) and out["image"].dtype == np.uint8
    assert out["label"] == element["label"]
    rgb = {"image": _smooth_image(50, 70), "label": np.int32(1)}
    assert crop.random_map(rgb, np.random.default_rng(0))["image"].shape == (40, 40, 3)
    gray = {"image": _smooth_image(50, 70)[..., :1], "label": np.int32(1)}
    assert crop.random_map(gray, np.random.default_rng(0))["image"].shape == (40, 40, 1)


def test_crop_boxes_stay_in_the_image_within_area_and_aspect_bounds():
    height, width = 90, 120
    fractions, aspects = [], []
    for k in range(3000):
        draws = np.random.default_rng(k).random((10, 4))
        top, left, h, w = sample_crop_box(height, width, draws)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        # Sides are rounded to whole pixels: allow half a pixel on each.
        assert (h + 0.5) * (w + 0.5) >= 0.08 * height * width
        assert 3 / 4 <= (w + 0.5) / (h - 0.5) and (w - 0.5) / (h + 0.5) <= 4 / 3
        fractions.append(h * w / (height * width))
        aspects.append(w / h)
    # The draws cover the whole ranges, not a corner of them.
    assert min(fractions) < 0.1 and max(fractions) > 0.9
    assert min(aspects) < 0.8 and max(aspects) > 1.25
    # The first attempt that fits is taken as drawn: area 0.08 + 0.92 * 0.5 = 54%, ratio 1.
    first = np.array([[0.5, 0.5, 0.5, 0.25]] + [[0.0, 0.0, 0.0, 0.0]] * 9)
    side = round(math.sqrt(0.54 * height * width))  # 76
    assert sample_crop_box(height, width, first) == (
        int(0.5 * (height - side + 1)), int(0.25 * (width - side + 1)), side, side)


def test_crop_falls_back_to_a_centred_box_of_the_allowed_ratio():
    never_fits = np.ones((10, 4)) * [0.999, 0.999, 0.5, 0.5]  # whole area, ratio 4/3
    # A very wide image: full height, width cut to 4/3 of it, centred.
    assert sample_crop_box(10, 100, never_fits) == (0, (100 - 13) // 2, 10, 13)
    # A very tall one: full width, height cut to width / (3/4), centred.
    assert sample_crop_box(100, 10, np.ones((10, 4)) * [0.999, 0.0, 0.5, 0.5]) == (
        (100 - 13) // 2, 0, 13, 10)


def test_crop_is_deterministic_per_key_and_differs_between_keys(tmp_path):
    source = _encoded_train(make_jpeg_folder(tmp_path, classes=1, per_class=2))
    crop = RandomResizedCrop(32)
    element = source[0]
    first = crop.random_map(element, np.random.default_rng(7))["image"]
    again = crop.random_map(source[0], np.random.default_rng(7))["image"]
    np.testing.assert_array_equal(first, again)
    boxes = {sample_crop_box(90, 120, np.random.default_rng(k).random((10, 4)))
             for k in range(16)}
    assert len(boxes) == 16
    others = [crop.random_map(element, np.random.default_rng(k))["image"] for k in range(8, 12)]
    assert all(not np.array_equal(first, o) for o in others)


def _recipe_task(root: Path, **overrides) -> ResNetTask:
    return ResNetTask(ResNetConfig(dataset="folder", data_dir=str(root), image_size=32,
                                   model="resnet18", stem="imagenet", recipe="imagenet",
                                   dataset_kwargs=(("val_fraction", 0.25),), **overrides))


def test_trainer_pipeline_crops_are_the_same_on_every_process_and_after_a_resume(tmp_path):
    task = _recipe_task(make_jpeg_folder(tmp_path))
    # The recipe ships uint8 batches; its steps normalise on the device.
    assert [type(t).__name__ for t in task.train_transforms()] == [
        "RandomResizedCrop", "CheckLabels", "RandomHorizontalFlip"]
    assert [type(t).__name__ for t in task.eval_transforms()] == ["CenterCrop", "CheckLabels"]

    def batches(process_index=0, process_count=1, start_batch=0, epoch=0):
        config = PipelineConfig(global_batch_size=4, process_index=process_index,
                                process_count=process_count)
        it = train_pipeline(task.train_data(), task.train_transforms(), config, seed=3,
                            epoch=epoch, start_batch=start_batch)
        return [b["image"] for b in it]

    one = batches()
    assert one[0].shape == (4, 32, 32, 3) and one[0].dtype == np.uint8
    halves = [batches(p, 2) for p in (0, 1)]
    for k, batch in enumerate(one):  # process p holds global rows 2p, 2p + 1
        np.testing.assert_array_equal(batch[:2], halves[0][k])
        np.testing.assert_array_equal(batch[2:], halves[1][k])
    resumed = batches(start_batch=2)
    for a, b in zip(one[2:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    # Another epoch, other crops.
    assert not np.array_equal(one[0], batches(epoch=1)[0])


def test_a_bad_file_follows_the_policy_in_encoded_mode(tmp_path):
    root = make_jpeg_folder(tmp_path, classes=2, per_class=3)
    bad = root / "class0" / "0.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated: the header parses, decoding fails
    crop = RandomResizedCrop(32)
    stop = load_image_folder(root, 32, val_fraction=0.25, encoded=True)[0]._source
    index = stop._paths.index(str(bad))
    with pytest.raises(DataError, match="0.jpg"):
        crop.random_map(stop[index], np.random.default_rng(0))
    skip = load_image_folder(root, 32, val_fraction=0.25, bad_images="skip",
                             max_bad_fraction=0.5, encoded=True)[0]._source
    out = crop.random_map(skip[index], np.random.default_rng(0))
    assert out["image"].shape == (32, 32, 3)
    assert out["label"] == skip.labels[index + 1]  # the next file replaced it, label too
    assert str(bad) in skip.skipped


# ---- evaluation crop and draft decoding ------------------------------------------------


@pytest.mark.parametrize("shape", [(90, 120), (130, 90), (64, 64)])
def test_center_crop_is_resize_shorter_side_then_central_crop(tmp_path, shape):
    height, width = shape
    pixels = _smooth_image(height, width, seed=1)
    size = 32
    short = round(size / 0.875)  # 37
    if height <= width:
        new_w, new_h = int(short * width / height), short
    else:
        new_w, new_h = short, int(short * height / width)
    resized = Image.fromarray(pixels).resize((new_w, new_h), Image.Resampling.BILINEAR)
    top, left = round((new_h - size) / 2), round((new_w - size) / 2)
    reference = np.asarray(resized)[top:top + size, left:left + size].astype(int)

    from_array = CenterCrop(size).map({"image": pixels, "label": 0})["image"]
    path = tmp_path / "x.png"  # lossless, and no draft step for PNG
    Image.fromarray(pixels).save(path)
    from_file = decode_crop(str(path), lambda h, w: center_crop_box(h, w, size), size)
    for out in (from_array, from_file):
        assert out.shape == (size, size, 3)
        # Same sampling points: off by Pillow's rounding only (a 1-pixel shift gives >= 7).
        assert np.abs(out.astype(int) - reference).max() <= 1


def test_draft_decode_matches_a_full_decode_and_resize(monkeypatch):
    # Pillow's draft is spied on; simplejpeg gives the same pixels (tests/test_jpeg.py).
    monkeypatch.setenv("RESNET_TASK_JPEG_DECODER", "pillow")
    pixels = _smooth_image(375, 500, seed=2)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    size = 32

    def box(h, w):
        return center_crop_box(h, w, size)

    from PIL import JpegImagePlugin

    scales = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, req):
        result = real_draft(self, mode, req)
        scales.append(result[1][2] / 500 if result else 1.0)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    drafted = decode_crop(io.BytesIO(data), box, size)
    assert scales == [1 / 8]  # a 32 px crop of a 500x375 photo: decoded at 1/8

    with Image.open(io.BytesIO(data)) as img:  # the reference: full decode, then resize
        full = img.convert("RGB")
        top, left, h, w = box(375, 500)
        reference = np.asarray(full.resize((size, size), Image.Resampling.BILINEAR,
                                           box=(left, top, left + w, top + h)))
    assert drafted.shape == reference.shape == (size, size, 3)
    diff = np.abs(drafted.astype(int) - reference.astype(int))
    assert diff.mean() < 1.5 and diff.max() < 12  # JPEG's DCT scaling vs a full decode

    # A crop that needs the full resolution is decoded at full scale.
    scales.clear()
    decode_crop(io.BytesIO(data), lambda h, w: (0, 0, 200, 200), 160)
    assert scales == [1.0]


# ---- the preset --------------------------------------------------------------------------


def _example_module():
    spec = importlib.util.spec_from_file_location("train_resnet_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_imagenet_preset_resolves_to_the_flax_recipe():
    example = _example_module()
    args = example.parse_args(["--recipe", "imagenet"])
    assert args.model == "resnet50" and args.stem == "imagenet" and args.image_size == 224
    assert args.batch_size == 1024 and args.epochs == 90 and args.optimizer == "sgd"
    assert args.lr == pytest.approx(0.4) and args.weight_decay == pytest.approx(1e-4)
    assert args.warmup_fraction == pytest.approx(5 / 90) and args.precision == "bf16"
    assert args.label_smoothing == 0.0

    # Explicit flags win; the derived values follow the resolved batch size and epochs.
    args = example.parse_args(["--recipe", "imagenet", "--batch-size", "256", "--epochs",
                               "45", "--precision", "fp32", "--model", "resnet18"])
    assert args.lr == pytest.approx(0.1) and args.warmup_fraction == pytest.approx(5 / 45)
    assert args.precision == "fp32" and args.model == "resnet18" and args.stem == "imagenet"
    args = example.parse_args(["--recipe", "imagenet", "--lr", "0.3",
                               "--warmup-fraction", "0.1"])
    assert args.lr == 0.3 and args.warmup_fraction == 0.1 and args.batch_size == 1024

    # Without the recipe nothing changes.
    args = example.parse_args([])
    assert (args.model, args.batch_size, args.lr, args.epochs, args.precision) == (
        "simple", 32, 0.05, 40, "fp32")
    assert args.recipe == "default"
    args = example.parse_args(["--precision", "bf16", "--lr", "0.2"])
    assert (args.precision, args.lr, args.warmup_fraction) == ("bf16", 0.2, 0.05)
    with pytest.raises(ValueError, match="unknown recipe"):
        resolve_recipe("nope", {}, {})


def test_imagenet_recipe_optimizer_decays_only_kernels_and_warms_up():
    values = resolve_recipe("imagenet", {}, {})
    task = ResNetTask(ResNetConfig(
        dataset="synthetic", image_size=32, model="resnet18", stem=values["stem"],
        recipe="imagenet", learning_rate=values["lr"], weight_decay=values["weight_decay"],
        warmup_fraction=values["warmup_fraction"], dataset_kwargs=(("num_examples", 16),)))
    total = 900  # 10 steps per epoch over 90 epochs: 5 warmup epochs = 50 steps
    tx = task.configure_optimizer(total)
    schedule = task.learning_rate_schedule
    assert float(schedule(0)) == 0.0 and float(schedule(50)) == pytest.approx(0.4)
    assert float(schedule(25)) == pytest.approx(0.2)
    assert float(schedule(total)) == pytest.approx(0.0, abs=1e-6)

    params = nnx.state(task.configure_model(nnx.Rngs(0)), nnx.Param)
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = tx.init(params)
    for _ in range(60):  # past the warmup: only weight decay moves the parameters
        updates, state = tx.update(zeros, state, params)
    leaves = jax.tree_util.tree_leaves_with_path(updates)
    decayed = [p for p, u in leaves if float(jnp.abs(u).max()) > 0]
    kept = [p for p, u in leaves if float(jnp.abs(u).max()) == 0]
    shapes = dict(jax.tree_util.tree_leaves_with_path(params))
    assert decayed and kept
    assert all(shapes[p].ndim > 1 for p in decayed)  # conv and dense kernels
    assert all(shapes[p].ndim == 1 for p in kept)  # batch-norm scales/biases, the dense bias


# ---- end to end ----------------------------------------------------------------------------


@pytest.mark.slow
def test_example_runs_the_imagenet_preset_end_to_end(tmp_path):
    root = make_jpeg_folder(tmp_path / "data")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--recipe", "imagenet", "--dataset", "folder",
         "--data-dir", str(root), "--image-size", "32", "--model", "resnet18",
         "--batch-size", "8", "--max-steps", "2", "--epochs", "1", "--no-checkpoint",
         "--precision", "fp32", "--disable-plugin", "progress", "--run-dir",
         str(tmp_path / "run")],
        capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "recipe imagenet: batch 8, lr 0.003125" in proc.stdout
    assert "images (32, 32, 3)" in proc.stdout
    line = next(x for x in proc.stdout.splitlines() if x.startswith("held-out top-1 accuracy"))
    assert "after 2 steps" in line
    assert math.isfinite(float(line.split()[3]))


def test_normalising_on_the_device_gives_the_host_normalisations_inputs(tmp_path):
    root = make_jpeg_folder(tmp_path)
    on_device = _recipe_task(root)
    on_host = _recipe_task(root, normalize_on_device=False)
    assert on_device.normalizes_on_device and not on_host.normalizes_on_device
    assert type(on_host.eval_transforms()[-1]).__name__ == "Normalize"
    config = PipelineConfig(global_batch_size=4)
    raw = next(iter(eval_pipeline(on_device.val_data(), on_device.eval_transforms(), config)[0]))
    host = next(iter(eval_pipeline(on_host.val_data(), on_host.eval_transforms(), config)[0]))
    assert raw["image"].dtype == np.uint8 and host["image"].dtype == np.float32
    np.testing.assert_allclose(np.asarray(on_device._images(raw)), host["image"],
                               rtol=1e-6, atol=1e-6)
    # Off the imagenet recipe the default stays on the host.
    assert not ResNetTask(ResNetConfig()).normalizes_on_device
