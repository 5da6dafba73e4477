"""``Trainer.fit(init_from=...)``: parameters and batch statistics from another run or a
weight file, matched by path and shape; no optimizer state, no counters."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from tiny_task import TinyModel, TinyTask, make_trainer

from nnx_trainer import hookimpl
from nnx_trainer.cli import main
from nnx_trainer.init_from import partial_state, read_weights, save_weights
from nnx_trainer_plugins.orbax_checkpoint import OrbaxCheckpoint

FIXTURE = Path(__file__).resolve().parent / "data" / "torchvision_resnet50_w4.safetensors"


class FourClassTask(TinyTask):
    """TinyTask with a 4-class head: the same body, a head of another shape."""

    def configure_model(self, rngs):
        return TinyModel(self.dim, 4, rngs=rngs, dtype=self.compute_dtype)


class StartOfFit:
    """Keeps the model arrays and the optimizer state as the fit's first step sees them."""

    @hookimpl
    def on_fit_start(self, trainer, task):
        self.model = {"/".join(map(str, p)): np.asarray(v.get_value())
                      for p, v in nnx.to_flat_state(trainer.state.model)}
        self.optimizer = [np.asarray(x) for x in jax.tree.leaves(trainer.state.optimizer)]
        self.step = trainer.global_step


@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> Path:
    """A 3-class TinyTask run with a checkpoint after 2 epochs (8 steps)."""
    run = tmp_path_factory.mktemp("source") / "run"
    make_trainer(run, OrbaxCheckpoint(async_save=False), max_epochs=2).fit(TinyTask())
    return run


def test_fine_tuning_from_a_checkpoint_with_a_new_head(source_run, tmp_path, caplog):
    saved, where = read_weights(source_run)  # the run's latest step
    assert where.endswith("checkpoints/8")
    start = StartOfFit()
    with caplog.at_level(logging.WARNING, logger="nnx_trainer"):
        trainer = make_trainer(tmp_path / "tuned", start, max_epochs=3)
        trainer.fit(FourClassTask(), init_from=str(source_run))
    report = trainer.init_report
    assert sorted(report.loaded) == ["bn/bias", "bn/mean", "bn/scale", "bn/var",
                                     "fc1/bias", "fc1/kernel"]
    assert report.skipped == {"fc2/bias": "shape (3,) in the source, (4,) here",
                              "fc2/kernel": "shape (16, 3) in the source, (16, 4) here"}
    assert "skipped (fresh init): fc2/bias (shape (3,) in the source, (4,) here)" in caplog.text
    for key in report.loaded:  # the source's values, batch statistics included
        np.testing.assert_array_equal(start.model[key], saved[f"{key}/value"])
    # No counters and no optimizer state came along: a fresh SGD momentum, step 0, and
    # all 3 epochs (12 steps) run.
    assert start.step == 0 and all(not x.any() for x in start.optimizer)
    assert trainer.global_step == 12
    assert trainer.validate(FourClassTask())["val/accuracy"] > 0.8


def test_weight_files_round_trip_by_name(source_run, tmp_path):
    pytest.importorskip("safetensors")
    trained = make_trainer(tmp_path / "eval", OrbaxCheckpoint())
    trained.validate(TinyTask(), ckpt_path=str(source_run / "checkpoints"))
    for name in ("w.npz", "w.safetensors"):
        path = save_weights(trained.model, tmp_path / name)
        start = StartOfFit()
        trainer = make_trainer(tmp_path / name.replace(".", "_"), start, max_steps=1)
        trainer.fit(TinyTask(), init_from=path)
        assert not trainer.init_report.skipped and len(trainer.init_report.loaded) == 8
        for p, v in nnx.to_flat_state(nnx.state(trained.model)):
            np.testing.assert_array_equal(start.model["/".join(map(str, p))], v.get_value())


def test_a_source_that_matches_nothing_fails_naming_both_sides(tmp_path):
    model = TinyModel(8, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"no array matches the model by path and shape \(the "
                                         r"source has encoder/w, \.\.\.; the model bn/bias"):
        partial_state(nnx.state(model), {"encoder/w": np.zeros(3)}, "x.npz")
    with pytest.raises(FileNotFoundError, match="no weight file or checkpoint directory"):
        make_trainer(tmp_path / "r", max_steps=1).fit(TinyTask(), init_from=str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no committed checkpoint step"):
        read_weights(tmp_path / "empty")


def test_cli_init_from(source_run, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NNX_TRAINER_DISABLE_PLUGIN_AUTOLOAD", "1")
    run = tmp_path / "cli"
    with caplog.at_level(logging.INFO, logger="nnx_trainer"):
        assert main(["fit", "--task", "tiny_task:TinyTask", "--trainer.batch_size", "16",
                     "--trainer.max_steps", "2", "--trainer.run_dir", str(run),
                     "--plugins.checkpoint", "{}",
                     "--init_from", str(source_run / "checkpoints" / "8")]) == 0
    assert "loaded 8 of 8 parameter/batch-stat arrays" in caplog.text
    # The saved config leaves the fit-only init_from out, so other commands read it too.
    assert "\ninit_from:" not in (run / "config.yaml").read_text()
    assert main(["validate", "--config", str(run / "config.yaml"), "--ckpt_path", "last"]) == 0


def test_resnet_task_fine_tunes_from_a_torchvision_file(tmp_path):
    pytest.importorskip("safetensors")
    from resnet_task.task import ResNetTask

    task = ResNetTask(dataset="synthetic", model="resnet50", stem="imagenet",
                      model_kwargs=(("width", 4),), freeze="backbone",
                      dataset_kwargs=(("num_classes", 3), ("num_examples", 64)),
                      conv_impl="xla")
    start = StartOfFit()
    trainer = make_trainer(tmp_path / "ft", start, max_steps=2)
    trainer.fit(task, init_from=str(FIXTURE))
    report = trainer.init_report
    assert set(report.skipped) == {"head/kernel", "head/bias"}  # 10 classes in the file
    assert len(report.loaded) == 265 and report.unused == ["input", "logits"]
    # The backbone is frozen: after training its parameters are still the file's.
    from resnet_task.torchvision_weights import nnx_weights

    expected = nnx_weights(FIXTURE)
    after = {"/".join(map(str, p)): np.asarray(v.get_value())
             for p, v in nnx.to_flat_state(trainer.state.model)}
    np.testing.assert_array_equal(after["stages/3/layers/2/conv3/kernel"],
                                  expected["stages/3/layers/2/conv3/kernel"])
    assert not np.array_equal(after["head/kernel"], start.model["head/kernel"])


def test_a_relative_run_directory_is_read_from_the_working_directory(source_run, monkeypatch):
    # Was Orbax's "Checkpoint path should be absolute" for init_from="runs/x".
    monkeypatch.chdir(source_run.parent)
    relative, where = read_weights("run")
    absolute, _ = read_weights(source_run)
    assert where == str(source_run / "checkpoints" / "8")
    assert sorted(relative) == sorted(absolute)
    assert all(np.array_equal(relative[k], absolute[k]) for k in absolute)
