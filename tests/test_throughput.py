"""The throughput plugin: host-clock rates at the log cadence, from the Trainer's own counters."""

from __future__ import annotations

import pytest
from tiny_task import TinyTask

import nnx_trainer
from nnx_trainer_plugins.throughput import Throughput


class Logged:
    def __init__(self) -> None:
        self.records: list[tuple[int, dict]] = []

    @nnx_trainer.hookimpl
    def log_metrics(self, metrics, step):
        self.records.append((step, dict(metrics)))


def _fit(tmp_path, plugin: Throughput) -> tuple[nnx_trainer.Trainer, Logged]:
    logged = Logged()
    trainer = nnx_trainer.Trainer(
        run_dir=tmp_path, batch_size=16, max_epochs=2, log_every_n_steps=2,
        plugin_autoload=False, plugins=[plugin, logged],
    )
    trainer.fit(TinyTask())
    return trainer, logged


def test_rates_are_logged_at_the_cadence_after_the_compile_window(tmp_path):
    trainer, logged = _fit(tmp_path, Throughput())
    perf = [(step, m) for step, m in logged.records if "perf/steps_per_sec" in m]
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
    assert not any("perf/steps_per_sec" in m for _, m in logged.records)


def test_loaded_by_default_through_its_entry_point(tmp_path, monkeypatch):
    monkeypatch.delenv("NNX_TRAINER_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    trainer = nnx_trainer.Trainer(run_dir=tmp_path)
    assert isinstance(trainer.plugin_manager.get_plugin("throughput"), Throughput)
