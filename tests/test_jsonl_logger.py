"""JsonlLogger: valid JSON lines at the log cadence, validation lines, hparams, NaN, appends."""

from __future__ import annotations

import json
import math
import time
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
from tiny_task import TinyTask

import nnx_trainer
from plugins.jsonl_logger import JsonlLogger


def _strict_loads(line: str) -> dict:
    """json.loads that rejects the non-standard NaN/Infinity tokens Python would accept."""

    def reject(token: str):
        raise ValueError(f"invalid JSON token {token!r}")

    return json.loads(line, parse_constant=reject)


def _read(path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")  # every line complete
    return [_strict_loads(line) for line in text.splitlines()]


def _fit(run_dir, max_epochs: int) -> None:
    trainer = nnx_trainer.Trainer(
        max_epochs=max_epochs, batch_size=8, log_every_n_steps=3, plugin_autoload=False,
        plugins=[JsonlLogger()], run_dir=run_dir,
    )
    trainer.fit(TinyTask())  # 64 examples / 8 = 8 steps per epoch, 20 validation examples


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two fits into one run directory (a fresh logger each, as after a restart)."""
    run_dir = tmp_path_factory.mktemp("run") / "nested" / "dir"  # created by the plugin
    start = time.time()
    _fit(run_dir, max_epochs=2)
    first = _read(run_dir / "metrics.jsonl")
    end = time.time()
    _fit(run_dir, max_epochs=1)
    second = _read(run_dir / "metrics.jsonl")
    return SimpleNamespace(run_dir=run_dir, first=first, second=second, start=start, end=end)


def test_every_line_is_json_with_step_and_time(runs):
    for record in runs.first:
        assert isinstance(record["step"], int)
        assert runs.start <= record["time"] <= runs.end
        assert all(isinstance(v, float) for k, v in record.items() if k != "step")


def test_train_lines_follow_log_every_n_steps(runs):
    train = [r for r in runs.first if "train/loss" in r]
    # Every 3 steps, plus the final flush at the last step (16 is not a multiple of 3).
    assert [r["step"] for r in train] == [3, 6, 9, 12, 15, 16]
    assert [r["epoch"] for r in train] == [0.0, 0.0, 1.0, 1.0, 1.0, 2.0]
    assert all(math.isfinite(r["train/loss"]) for r in train)


def test_validation_lines_after_each_epoch(runs):
    steps = [(r["step"], "val/loss" in r) for r in runs.first]
    val = [r for r in runs.first if "val/loss" in r]
    assert [r["step"] for r in val] == [8, 16]
    assert all(0.0 <= r["val/accuracy"] <= 1.0 for r in val)
    # In log order: the epoch-1 validation comes between the train logs of steps 6 and 9.
    assert steps.index((8, True)) == steps.index((6, False)) + 1


def test_hparams_json_written(runs):
    params = json.loads((runs.run_dir / "hparams.json").read_text(encoding="utf-8"))
    assert params["trainer"]["batch_size"] == 8
    assert params["trainer"]["max_epochs"] == 1  # rewritten by the latest fit
    assert params["task"] == {"lr": 0.1, "n_train": 64}


def test_second_run_appends(runs):
    assert runs.second[: len(runs.first)] == runs.first
    added = runs.second[len(runs.first):]
    assert [r["step"] for r in added if "train/loss" in r] == [3, 6, 8]
    assert [r["step"] for r in added if "val/loss" in r] == [8]


def _stub(run_dir, main: bool = True) -> SimpleNamespace:
    return SimpleNamespace(run_dir=run_dir, is_main_process=main)


def test_non_finite_and_vector_values_stay_valid_json(tmp_path):
    logger, trainer = JsonlLogger(filename="m.jsonl"), _stub(tmp_path)
    metrics = {
        "train/loss": jnp.asarray(jnp.nan),  # a device scalar, as the engine sends
        "train/up": np.float32(np.inf),
        "train/down": -math.inf,
        "val/per_class": jnp.asarray([0.5, jnp.nan]),
        "epoch": 3,
    }
    logger.log_metrics(trainer=trainer, metrics=metrics, step=7)
    (record,) = _read(tmp_path / "m.jsonl")
    assert record["step"] == 7
    assert record["train/loss"] == "nan"
    assert record["train/up"] == "inf" and record["train/down"] == "-inf"
    assert record["val/per_class"] == [0.5, "nan"]
    assert record["epoch"] == 3.0
    assert math.isnan(float(record["train/loss"]))  # the strings read back with float()


def test_half_written_last_line_is_cut_before_appending(tmp_path):
    path = tmp_path / "metrics.jsonl"
    complete, cut_short = '{"step": 1, "time": 0.0, "train/loss": 1.0}\n', '{"step": 2, "ti'
    path.write_text(complete + cut_short, encoding="utf-8")
    JsonlLogger().log_metrics(trainer=_stub(tmp_path), metrics={"train/loss": 0.5}, step=3)
    assert [r["step"] for r in _read(path)] == [1, 3]


def test_only_the_main_process_writes(tmp_path):
    logger, trainer = JsonlLogger(), _stub(tmp_path / "run", main=False)
    logger.log_hyperparams(trainer=trainer, params={"a": 1})
    logger.log_metrics(trainer=trainer, metrics={"train/loss": 1.0}, step=1)
    assert not (tmp_path / "run").exists()


def test_hparams_non_finite_values(tmp_path):
    JsonlLogger().log_hyperparams(trainer=_stub(tmp_path), params={"clip": math.inf, "n": None})
    assert _strict_loads((tmp_path / "hparams.json").read_text()) == {"clip": "inf", "n": None}


def test_entry_point_default_and_configured_instance():
    loaded = nnx_trainer.Trainer(plugin_autoload=False, plugins=["metrics_jsonl"])
    default = loaded.plugin_manager.get_plugin("metrics_jsonl")
    assert isinstance(default, JsonlLogger) and default.filename == "metrics.jsonl"
    mine = JsonlLogger(filename="other.jsonl")
    replaced = nnx_trainer.Trainer(plugin_autoload=False, plugins=[mine, "metrics_jsonl"])
    assert replaced.plugin_manager.get_plugin("metrics_jsonl") is mine
    with pytest.raises(ValueError, match="plain file name"):
        JsonlLogger(filename="../escape.jsonl")
