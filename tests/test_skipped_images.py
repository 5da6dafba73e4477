"""bad_images="skip": each replaced example is flagged, counted on device as a running
total over the fit, logged as ``train/skipped_images``, shown in the fit summary and
continued by a resumed fit; "stop" adds nothing."""

from __future__ import annotations

import io
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from tiny_task import make_trainer

import nnx_trainer
from nnx_trainer.data import PipelineConfig, train_pipeline
from nnx_trainer_plugins.jsonl_logger import JsonlLogger
from nnx_trainer_plugins.orbax_checkpoint import OrbaxCheckpoint
from nnx_trainer_plugins.rich_progress import RichProgress
from resnet_task.data import load_image_folder
from resnet_task.imagenet import CenterCrop, RandomResizedCrop
from resnet_task.metrics import ReplacedExamples
from resnet_task.task import ResNetConfig, ResNetTask

PER_CLASS = 6  # train files per class: 2 classes, 12 files, 3 steps of 4 per epoch
BATCH = 4
BAD = ("c0/2.jpg", "c1/4.jpg")  # under train/: one truncated JPEG, one not a JPEG at all


def make_folder(root: Path) -> Path:
    """``train/`` and ``val/`` of two tinted classes of small JPEGs, two train files bad."""
    for split, count in (("train", PER_CLASS), ("val", 2)):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(count):
                pixels = np.full((14, 18, 3), 40 + 150 * c, np.uint8)
                pixels[..., 2] = 10 * i
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.jpg")
    truncated, garbage = (root / "train" / name for name in BAD)
    truncated.write_bytes(truncated.read_bytes()[:100])  # the header parses, decoding fails
    garbage.write_bytes(b"not a jpeg" * 20)
    return root


def _task(root: Path, bad_images: str = "skip", **overrides) -> ResNetTask:
    return ResNetTask(ResNetConfig(
        dataset="folder", data_dir=str(root), image_size=8, model="simple",
        model_kwargs=(("num_blocks", 1), ("initial_features", 4)),
        dataset_kwargs=(("bad_images", bad_images), ("max_bad_fraction", 0.25)), **overrides))


def _fit(task: ResNetTask, run_dir: Path, ckpt_path: str | None = None, checkpoint=False,
         **kwargs) -> tuple[nnx_trainer.Trainer, str]:
    """Fit with the JSONL logger and the progress plugin's plain output; the output."""
    buf = io.StringIO()
    plugins = [JsonlLogger(), RichProgress(console=Console(file=buf, width=120), force=False)]
    if checkpoint:
        plugins.append(OrbaxCheckpoint(min_seconds_between_saves=0, async_save=False))
    kwargs = {"max_epochs": 2, "batch_size": BATCH, "log_every_n_steps": 2, **kwargs}
    trainer = make_trainer(run_dir, *plugins, **kwargs)
    trainer.fit(task, ckpt_path=ckpt_path)
    return trainer, buf.getvalue()


def _logged_counts(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/skipped_images"]) for r in rows if "train/skipped_images" in r]


# ---- the flag ------------------------------------------------------------------------


def test_skip_flags_each_replaced_example_and_stop_adds_no_key(tmp_path):
    root = make_folder(tmp_path)
    skip, _, _ = load_image_folder(root, 8, bad_images="skip", max_bad_fraction=0.25)
    source = skip._source
    bad = {source._paths.index(str(root / "train" / name)) for name in BAD}
    elements = [skip[i] for i in range(len(skip))]
    assert [bool(e["replaced"]) for e in elements] == [i in bad for i in range(len(skip))]
    assert all(type(e["replaced"]) is np.bool_ for e in elements)
    # Encoded mode: the crop that decodes the file reports it (train and evaluation crops).
    encoded = load_image_folder(root, 8, bad_images="skip", max_bad_fraction=0.25,
                                encoded=True)[0]._source
    for i in range(len(encoded)):
        out = RandomResizedCrop(8).random_map(encoded[i], np.random.default_rng(0))
        assert out["replaced"] == (i in bad) and out["image"].shape == (8, 8, 3)
        assert CenterCrop(8).map(encoded[i])["replaced"] == (i in bad)
    # "stop" elements are as they always were (no bad file in val to stop on).
    _, val, _ = load_image_folder(root, 8)
    assert all(set(val[i]) == {"image", "label"} for i in range(len(val)))


@pytest.mark.parametrize("recipe", ["default", "imagenet"])
def test_the_flags_go_through_the_transforms_into_batches(tmp_path, recipe):
    task = _task(make_folder(tmp_path), recipe=recipe)
    config = PipelineConfig(global_batch_size=BATCH)
    batches = list(train_pipeline(task.train_data(), task.train_transforms(), config, seed=0,
                                  epoch=0))
    assert len(batches) == 2 * PER_CLASS // BATCH
    for batch in batches:
        assert batch["replaced"].dtype == np.bool_ and batch["replaced"].shape == (BATCH,)
    assert sum(int(b["replaced"].sum()) for b in batches) == len(BAD)  # each drawn once
    stop = _task(tmp_path, bad_images="stop")
    assert "skipped_images" not in stop.configure_train_metrics()._metric_names
    assert "skipped_images" in task.configure_train_metrics()._metric_names


def test_the_metric_sums_flags_honours_the_mask_and_keeps_its_total_on_reset():
    metric = ReplacedExamples()
    metric.update(replaced=jnp.array([True, False, True]))
    metric.update(replaced=jnp.array([True, True]), mask=jnp.array([True, False]))
    assert int(metric.compute()) == 3 and metric.compute().dtype == jnp.int32
    metric.reset()  # the Trainer's per-log-interval reset: a running total stays
    assert int(metric.compute()) == 3
    with pytest.raises(TypeError, match="'replaced'"):
        metric.update(values=jnp.ones(2))


# ---- a fit ---------------------------------------------------------------------------


@pytest.mark.parametrize(("workers", "recipe"), [
    (0, "default"), (0, "imagenet"), pytest.param(2, "default", marks=pytest.mark.slow)])
def test_a_fit_logs_and_summarises_the_count_of_skipped_images(tmp_path, workers, recipe):
    # With Grain workers (slow: they are spawned) each worker finds the bad files on its
    # own; the count is made on device from the batches, so it is the same.
    task = _task(make_folder(tmp_path / "data"), recipe=recipe)
    trainer, out = _fit(task, tmp_path / "run", worker_count=workers)
    counts = _logged_counts(tmp_path / "run")
    # Logged every 2 steps and at the end: steps 2, 4, 6, a running total that only grows.
    assert [step for step, _ in counts] == [2, 4, 6]
    assert [c for _, c in counts] == sorted(c for _, c in counts)
    assert counts[-1][1] == len(BAD) * 2  # every bad file, once in each of the 2 epochs
    assert f"  train/skipped_images  {len(BAD) * 2}" in out.splitlines()
    assert "fit summary" in out.splitlines()


def test_a_resumed_fit_continues_the_count(tmp_path):
    root = make_folder(tmp_path / "data")
    run = tmp_path / "run"
    # Stop in the middle of the second epoch; the end-of-fit checkpoint holds the total.
    first, _ = _fit(_task(root), run, checkpoint=True, max_steps=5)
    assert first.global_step == 5
    at_checkpoint = int(first.callback_metrics["train/skipped_images"])
    assert at_checkpoint >= len(BAD)  # the first epoch's, at least
    resumed, out = _fit(_task(root), run, ckpt_path="last", checkpoint=True)
    assert resumed.resumed_from is not None and resumed.global_step == 6
    counts = _logged_counts(run)  # the first fit's rows, then the resumed fit's
    assert [step for step, _ in counts] == [2, 4, 5, 6]
    assert counts[2][1] == at_checkpoint
    assert counts[-1][1] == len(BAD) * 2  # the whole fit's, not the resumed part's
    assert f"  train/skipped_images  {len(BAD) * 2}" in out.splitlines()
