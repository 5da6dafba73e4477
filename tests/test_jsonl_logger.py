"""JsonlLogger: JSON lines at the log cadence, validation lines, hparams, NaN, one file per fit."""

from __future__ import annotations

import json
import math
import time
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
from tiny_task import TinyTask, make_trainer

import nnx_trainer
from nnx_trainer_plugins.jsonl_logger import JsonlLogger


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
    trainer = make_trainer(run_dir, JsonlLogger(), max_epochs=max_epochs, batch_size=8,
                           log_every_n_steps=3)
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
    return SimpleNamespace(run_dir=run_dir, first=first, second=second, start=start, end=end,
                           moved=_read(run_dir / "metrics.1.jsonl"))


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
    assert params["trainer"]["max_epochs"] == 1  # the latest fit's
    assert params["task"] == {"lr": 0.1, "n_train": 64}
    earlier = json.loads((runs.run_dir / "hparams.1.json").read_text(encoding="utf-8"))
    assert earlier["trainer"]["max_epochs"] == 2  # the first fit's, moved aside with it


def test_a_second_fit_has_its_own_file_and_the_first_is_moved_aside(runs):
    assert runs.moved == runs.first  # metrics.1.jsonl: the first fit, untouched
    assert [r["step"] for r in runs.second if "train/loss" in r] == [3, 6, 8]
    assert [r["step"] for r in runs.second if "val/loss" in r] == [8]
    _fit(runs.run_dir, max_epochs=1)  # a third: numbered after the others
    assert _read(runs.run_dir / "metrics.2.jsonl") == runs.second


def test_a_resumed_fit_drops_the_rows_after_its_checkpoint(tmp_path):
    rows = [{"step": s, "time": 0.0, "train/loss": 1.0} for s in (3, 6, 8, 9, 12)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 1', encoding="utf-8")
    logger = JsonlLogger()
    resumed = SimpleNamespace(run_dir=tmp_path, is_main_process=True, global_step=8,
                              resumed_from=str(tmp_path / "checkpoints" / "8"))
    logger.log_hyperparams(trainer=resumed, params={})
    assert [r["step"] for r in _read(path)] == [3, 6, 8]
    assert not (tmp_path / "metrics.1.jsonl").exists()  # same fit, continued: same file
    logger.log_metrics(trainer=resumed, metrics={"train/loss": 0.5}, step=9)
    assert [r["step"] for r in _read(path)] == [3, 6, 8, 9]


def test_a_run_killed_and_resumed_holds_each_step_once(tmp_path):
    from nnx_trainer_plugins.orbax_checkpoint import OrbaxCheckpoint

    class Crash:
        @nnx_trainer.hookimpl
        def on_train_batch_start(self, step):
            if step == 10:  # steps 0..9 ran and were logged; the checkpoint is at 8
                raise RuntimeError("killed")

    def checkpoint() -> OrbaxCheckpoint:
        return OrbaxCheckpoint(every_n_steps=4, min_seconds_between_saves=0, async_save=False)

    options = {"max_epochs": 2, "batch_size": 8, "log_every_n_steps": 1}
    with pytest.raises(RuntimeError, match="killed"):
        make_trainer(tmp_path, JsonlLogger(), Crash(), checkpoint(), **options).fit(TinyTask())
    assert [r["step"] for r in _read(tmp_path / "metrics.jsonl") if "train/loss" in r] == \
        list(range(1, 11))
    resumed = make_trainer(tmp_path, JsonlLogger(), checkpoint(), **options)
    resumed.fit(TinyTask(), ckpt_path="last")
    assert resumed.resumed_from is not None
    records = _read(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "train/loss" in r] == list(range(1, 17))
    assert [r["step"] for r in records if "val/loss" in r] == [8, 16]
    assert not (tmp_path / "metrics.1.jsonl").exists()


def _stub(run_dir, main: bool = True) -> SimpleNamespace:
    return SimpleNamespace(run_dir=run_dir, is_main_process=main, global_step=0,
                           resumed_from=None)


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
