"""The throughput plugin: host-clock rates at the log cadence, from the Trainer's own counters."""

from __future__ import annotations

import io
import re

import pytest
from fake_clock import FakeClock
from hook_recorder import HookRecorder
from rich.console import Console
from tiny_task import TinyTask, make_trainer

import nnx_trainer
from nnx_trainer_plugins.rich_progress import RichProgress
from nnx_trainer_plugins.throughput import Throughput


def _fit(tmp_path, plugin: Throughput) -> tuple[nnx_trainer.Trainer, HookRecorder]:
    logged = HookRecorder("log_metrics")
    trainer = make_trainer(tmp_path, plugin, logged, max_epochs=2, log_every_n_steps=2)
    trainer.fit(TinyTask())
    return trainer, logged


def test_rates_are_logged_at_the_cadence_after_the_compile_window(tmp_path):
    trainer, logged = _fit(tmp_path, Throughput())
    perf = [(step, m) for step, m in logged.logged() if "perf/steps_per_sec" in m]
    assert [step for step, _ in perf] == [4, 6, 8]  # the window ending at 2 holds compilation
    for _, m in perf:
        assert all(isinstance(v, float) for v in m.values())  # host numbers, no device reads
        # Examples, not images: the engine names no modality (the tiny task is tabular).
        assert m["perf/examples_per_sec"] == pytest.approx(16 * m["perf/steps_per_sec"])
        assert not any("image" in name for name in m)
        assert 0.0 <= m["perf/data_wait_share"] <= 1.0
        assert m["perf/compile_seconds"] == trainer.compile_seconds["train"] > 0
    assert 0.0 < trainer.data_wait_seconds < trainer.fit_seconds
    assert set(trainer.compile_seconds) == {"train", "validate"}


def test_disabled_logs_nothing(tmp_path):
    _, logged = _fit(tmp_path, Throughput(enabled=False))
    assert not any("perf/steps_per_sec" in m for _, m in logged.logged())


def test_loaded_by_default_through_its_entry_point(tmp_path, monkeypatch):
    monkeypatch.delenv("NNX_TRAINER_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    trainer = nnx_trainer.Trainer(run_dir=tmp_path)
    assert isinstance(trainer.plugin_manager.get_plugin("throughput"), Throughput)


class Clockwork:
    """Moves a fake clock as a run would: 10 ms per train step, 2 s per evaluation batch,
    3 s per checkpoint save (saves asked for every ``save_every`` steps)."""

    name = "clockwork"

    def __init__(self, clock: FakeClock, save_every: int) -> None:
        self.clock, self.save_every = clock, save_every

    @nnx_trainer.hookimpl(tryfirst=True)  # the step's time, before the window closes
    def on_train_batch_end(self):
        self.clock.seconds += 0.01

    @nnx_trainer.hookimpl
    def on_validation_batch_end(self):
        self.clock.seconds += 2.0

    @nnx_trainer.hookimpl
    def should_save_checkpoint(self, step):
        return step % self.save_every == 0

    @nnx_trainer.hookimpl(trylast=True)  # after the throughput plugin saw the save start
    def on_save_checkpoint(self):
        self.clock.seconds += 3.0


def test_a_window_with_a_validation_or_a_save_reports_the_same_training_rate(
        tmp_path, monkeypatch):
    # The data wait is real time; on a fake clock it would be a (tiny) stray term.
    monkeypatch.setattr(nnx_trainer.Trainer, "data_wait_seconds", property(lambda self: 0.0))
    clock, logged, out = FakeClock(), HookRecorder("log_metrics"), io.StringIO()
    throughput = Throughput(clock=lambda: clock.seconds)
    progress = RichProgress(console=Console(file=out, width=120), force=False)
    trainer = make_trainer(
        tmp_path, throughput, Clockwork(clock, save_every=15), logged, progress,
        batch_size=8, eval_batch_size=10, max_epochs=3, log_every_n_steps=10,
    )
    # 160 examples / 8 = 20 steps per epoch: validations after steps 20, 40, 60 (2
    # batches, 4 s each) and saves after 15, 30, 45, 60 (+ the end-of-fit save), 3 s each.
    trainer.fit(TinyTask(n_train=160, n_val=20))
    perf = {step: m for step, m in logged.logged() if "perf/steps_per_sec" in m}
    assert sorted(perf) == [20, 30, 40, 50, 60]  # the window ending at 10 holds compilation
    for m in perf.values():  # 10 ms a step in every window, whatever else ran in it
        assert m["perf/steps_per_sec"] == pytest.approx(100.0)
        assert m["perf/examples_per_sec"] == pytest.approx(800.0)
    away = {step: {k: v for k, v in m.items() if k in ("perf/val_seconds",
                                                        "perf/checkpoint_seconds")}
            for step, m in perf.items()}
    assert away == {
        20: {"perf/checkpoint_seconds": pytest.approx(3.0)},  # the save after step 15
        30: {"perf/val_seconds": pytest.approx(4.0)},  # step 20's epoch-end validation
        40: {"perf/checkpoint_seconds": pytest.approx(3.0)},  # step 30's save
        50: {"perf/val_seconds": pytest.approx(4.0),  # step 40's validation
             "perf/checkpoint_seconds": pytest.approx(3.0)},  # and step 45's save
        60: {},
    }
    # Over the fit, after compilation: 50 steps in 0.5 s; step 60's validation and its
    # two saves (periodic, then the end of fit) after the last window count too.
    assert throughput.totals == pytest.approx({
        "train_seconds": 0.5, "train_steps": 50, "val_seconds": 12.0,
        "checkpoint_seconds": 15.0})
    # The fit summary's rates are the same training-time figures (no compilation,
    # evaluation or saves in them); the time away is on the wall-time row.
    summary = out.getvalue()[out.getvalue().index("fit summary"):]
    assert re.search(r"\n  steps/s +100\.00\n  examples/s +800\.0\n", summary)
    assert re.search(r"\n  wall time +[\d.]+ s \(validation 12\.0 s, checkpoints 15\.0 s\)\n",
                     summary)
