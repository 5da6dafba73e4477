"""Profiler: the trace holds exactly the steps asked for, and none is ever left running."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import jax
import pytest
from tiny_task import TinyTask, make_trainer

import nnx_trainer
from nnx_trainer.cli import main
from nnx_trainer_plugins.profiler import Profiler, parse_steps


def _fit(run_dir, *plugins, **options) -> nnx_trainer.Trainer:
    trainer = make_trainer(run_dir, *plugins, **{"max_epochs": 2, **options})  # 4 steps each
    return trainer.fit(TinyTask(n_val=0))


def _traces(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("plugins/profile/*/*.xplane.pb"))


def _annotated_steps(trace: Path) -> list[int]:
    """The ``step_num`` of every ``train`` step annotation in an XSpace file."""
    data = trace.read_bytes()
    assert data and b"train" in data and b"step_num" in data
    profile = jax.profiler.ProfileData.from_serialized_xspace(data)
    return sorted(
        int(dict(event.stats)["step_num"])
        for plane in profile.planes for line in plane.lines for event in line.events
        if event.name == "train"
    )


def _no_trace_running(tmp_path: Path) -> None:
    jax.profiler.start_trace(str(tmp_path / "probe"))  # raises if one is still running
    jax.profiler.stop_trace()


class RaiseAt:
    def __init__(self, step: int) -> None:
        self.step = step

    @nnx_trainer.hookimpl
    def on_train_batch_end(self, step):
        if step == self.step:
            raise RuntimeError("boom")


@pytest.mark.parametrize(("steps", "expected"), [
    ("10-20", (10, 20)), (" 3 - 4 ", (3, 4)), ("7", (7, 7)), (7, (7, 7)), (0, (0, 0)),
    ((2, 5), (2, 5)), ([2, 2], (2, 2)),
])
def test_steps_forms(steps, expected):
    assert parse_steps(steps) == expected
    assert (Profiler(steps=steps).first, Profiler(steps=steps).last) == expected


@pytest.mark.parametrize(("steps", "message"), [
    ("20-10", "the last step (10) is before the first (20)"),
    ("a-b", "must be a range '10-20'"), ("", "must be a range"), ("1-2-3", "must be"),
    (-1, ">= 0"), (True, "must be"), ((1, 2, 3), "must be"), ((1.0, 2), "must be"),
    (None, "must be"),
])
def test_bad_steps_fail_with_a_clear_message(steps, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Profiler(steps=steps)


def test_trace_holds_exactly_the_steps_asked_for_and_a_second_fit_traces_again(tmp_path):
    plugin = Profiler(steps="2-3")
    _fit(tmp_path / "one", plugin)
    (trace,) = _traces(tmp_path / "one" / "profile")  # default dir: run_dir/profile
    assert plugin.traced_steps == [2, 3]
    assert _annotated_steps(trace) == [2, 3]  # steps 0, 1 and 4-7 ran untraced
    _no_trace_running(tmp_path)

    _fit(tmp_path / "two", plugin, max_epochs=1)
    (trace,) = _traces(tmp_path / "two" / "profile")
    assert _annotated_steps(trace) == [2, 3]


def test_a_range_past_the_end_of_fit_stops_at_run_end(tmp_path):
    plugin = Profiler(steps=(6, 100), dir=tmp_path / "traces")
    _fit(tmp_path / "run", plugin)
    (trace,) = _traces(tmp_path / "traces")
    assert _annotated_steps(trace) == [6, 7]
    _no_trace_running(tmp_path)


def test_an_exception_inside_the_range_stops_the_trace(tmp_path):
    plugin = Profiler(steps="1-5")
    with pytest.raises(RuntimeError, match="boom"):
        _fit(tmp_path, plugin, RaiseAt(2))
    _no_trace_running(tmp_path)
    (trace,) = _traces(tmp_path / "profile")
    assert _annotated_steps(trace)[0] == 1


def test_only_the_main_process_traces_unless_asked(tmp_path):
    trainer = SimpleNamespace(run_dir=tmp_path, is_main_process=False,
                              strategy=SimpleNamespace(process_count=2, process_index=1))
    quiet, everywhere = Profiler(steps=0), Profiler(steps=0, all_processes=True)
    for plugin in (quiet, everywhere):
        plugin.on_fit_start(trainer=trainer)
        plugin.on_train_batch_start(trainer=trainer, step=0)
    assert quiet.traced_steps == [] and not quiet._tracing
    assert everywhere.traced_steps == [0] and everywhere._tracing
    assert everywhere.trace_dir == tmp_path / "profile" / "process_1"
    everywhere.on_run_end(trainer=trainer)
    _no_trace_running(tmp_path)


def test_off_by_default_and_on_by_name(tmp_path, monkeypatch):
    monkeypatch.delenv("NNX_TRAINER_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    trainer = nnx_trainer.Trainer(run_dir=tmp_path)
    assert trainer.plugin_manager.get_plugin("profiler") is None
    assert "opt-in" in trainer.plugin_manager.inactive["profiler"]
    requested = nnx_trainer.Trainer(run_dir=tmp_path, plugin_autoload=False, plugins=["profiler"])
    plugin = requested.plugin_manager.get_plugin("profiler")
    assert (plugin.first, plugin.last) == (10, 20)


def test_cli_option(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NNX_TRAINER_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    base = ["fit", "--task", "tiny_task:TinyTask", "--trainer.batch_size", "16",
            "--trainer.max_steps", "3", "--trainer.run_dir", str(tmp_path)]
    assert main([*base, "--plugins.profiler.steps", "1-2"]) == 0
    (trace,) = _traces(tmp_path / "profile")
    assert _annotated_steps(trace) == [1, 2]
    assert main([*base, "--plugins.profiler.steps", "20-10"]) != 0
    assert "is before the first" in capsys.readouterr().err
