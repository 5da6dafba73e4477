"""Timer: max_time parsing, the stop decision on a fake clock, stage times, resumed time."""

from __future__ import annotations

import datetime
import json
from types import SimpleNamespace

import pytest
from fake_clock import FakeClock
from tiny_task import TinyTask, make_trainer

import nnx_trainer
from nnx_trainer_plugins.timer import Timer, parse_max_time


def fake_trainer() -> SimpleNamespace:
    return SimpleNamespace(
        global_step=0, log_every_n_steps=50, should_stop=False, stop_reason=None,
        is_main_process=True,
    )


@pytest.mark.parametrize(
    ("max_time", "seconds"),
    [
        (90, 90.0),
        (1.5, 1.5),
        ("00:12:00:00", 12 * 3600.0),
        ("01:02:03:04", 86400.0 + 2 * 3600 + 3 * 60 + 4),
        ({"hours": 1, "minutes": 30}, 5400.0),
        ({"days": 2}, 172800.0),
        (datetime.timedelta(minutes=5), 300.0),
        (None, None),
    ],
)
def test_max_time_forms(max_time, seconds):
    assert parse_max_time(max_time) == seconds
    assert Timer(max_time).max_seconds == seconds


@pytest.mark.parametrize(
    ("max_time", "message"),
    [
        ("12:00:00", "must be 'DD:HH:MM:SS'"),
        ("1h", "must be 'DD:HH:MM:SS'"),
        ("aa:bb:cc:dd", "must be 'DD:HH:MM:SS'"),
        ("-1:00:00:00", "must be 'DD:HH:MM:SS'"),
        ("00:25:00:00", "hours must be < 24"),
        ("00:00:90:00", "minutes, seconds < 60"),
        ("00:00:00:00", "positive, finite duration"),
        (0, "positive, finite duration"),
        (-5, "positive, finite duration"),
        (float("inf"), "positive, finite duration"),
        ({"hour": 1}, r"unknown keys \['hour'\]; use weeks, days, hours"),
        ({"hours": "1"}, "values must be numbers"),
        (True, "max_time must be seconds"),
        ([60], "max_time must be seconds"),
    ],
)
def test_bad_max_time_is_rejected(max_time, message):
    with pytest.raises(ValueError, match=message):
        Timer(max_time)


def test_bad_interval_is_rejected():
    with pytest.raises(ValueError, match="interval must be 'step'"):
        Timer(60, interval="batch")


def test_stops_after_the_step_that_crosses_max_time():
    clock = FakeClock(1000.0)
    timer = Timer(max_time=35, clock=clock, verbose=False)
    trainer = fake_trainer()
    timer.on_fit_start(trainer=trainer)
    stopped_at = None
    for step in range(1, 10):
        clock.seconds += 10
        trainer.global_step = step
        timer.on_train_batch_end(trainer=trainer)
        if trainer.should_stop:
            stopped_at = step
            break
    assert stopped_at == 4 and trainer.stop_reason == "max_time"
    assert timer.time_elapsed() == 40 and timer.time_remaining() == 0


def test_epoch_interval_checks_at_epoch_ends_only():
    clock = FakeClock(1000.0)
    timer = Timer(max_time={"seconds": 15}, interval="epoch", clock=clock)
    trainer = fake_trainer()
    timer.on_fit_start(trainer=trainer)
    clock.seconds += 20
    timer.on_train_batch_end(trainer=trainer)
    assert not trainer.should_stop
    timer.on_train_epoch_end(trainer=trainer)
    assert trainer.should_stop


def test_records_fit_and_validation_time():
    clock = FakeClock(1000.0)
    timer = Timer(clock=clock)  # default: no budget, times only
    trainer = fake_trainer()
    timer.on_fit_start(trainer=trainer)
    for _ in range(2):
        clock.seconds += 10  # training
        timer.on_validation_start(stage="validate")
        clock.seconds += 3
        timer.on_validation_end(stage="validate")
    timer.on_run_end(stage="fit")
    clock.seconds += 100  # after the fit: not counted
    timer.on_validation_start(stage="test")
    clock.seconds += 4
    timer.on_validation_end(stage="test")
    assert timer.time_elapsed("fit") == 26
    assert timer.time_elapsed("validate") == 6 and timer.time_elapsed("test") == 4
    assert not trainer.should_stop and timer.time_remaining() is None


def test_resumed_run_counts_the_checkpointed_time():
    clock = FakeClock(1000.0)
    first = Timer(max_time=100, clock=clock)
    trainer = fake_trainer()
    first.on_fit_start(trainer=trainer)
    clock.seconds += 60
    saved = json.loads(json.dumps(first.state_dict()))  # saved mid-fit (preemption)
    first.on_run_end(stage="fit")  # the preempted fit ends
    clock.seconds += 5
    assert first.time_elapsed("fit") == 60  # the clock stopped with the fit
    assert saved["timer"]["time_elapsed"]["fit"] == 60

    resumed = Timer(max_time=100, clock=clock, verbose=False)
    resumed.load_state_dict(state=saved)
    trainer = fake_trainer()
    resumed.on_fit_start(trainer=trainer)
    clock.seconds += 30
    trainer.global_step = 1
    resumed.on_train_batch_end(trainer=trainer)
    assert resumed.time_elapsed() == 90 and not trainer.should_stop
    clock.seconds += 10
    resumed.on_train_batch_end(trainer=trainer)
    assert trainer.should_stop

    over = Timer(max_time=50, clock=clock, verbose=False)  # already over budget
    over.load_state_dict(state=saved)
    trainer = fake_trainer()
    over.on_fit_start(trainer=trainer)
    assert trainer.should_stop and trainer.stop_reason == "max_time"

    fresh = Timer(max_time=100, clock=clock)  # no checkpoint: a fresh fit starts at zero
    fresh.on_fit_start(trainer=fake_trainer())
    assert fresh.time_elapsed() == 0


def test_stops_a_real_fit_and_the_run_ends_normally(tmp_path):
    clock = FakeClock(1000.0)
    ended = []

    class Tick:
        """Each training step 'takes' 10 seconds of the fake clock."""

        @nnx_trainer.hookimpl
        def on_train_batch_start(self):
            clock.seconds += 10

        @nnx_trainer.hookimpl
        def on_fit_end(self, trainer):
            ended.append(trainer.stop_reason)

    timer = Timer(max_time=35, clock=clock)
    trainer = make_trainer(tmp_path, timer, Tick(), max_epochs=5)
    trainer.fit(TinyTask(n_val=0))
    assert trainer.global_step == 4 and ended == ["max_time"]
    assert timer.time_elapsed("fit") == 40


@pytest.mark.parametrize("outcome", ["preempted", "exception"])
def test_the_fit_clock_stops_when_the_fit_ends_however_it_ends(tmp_path, outcome):
    clock = FakeClock(1000.0)

    class EndEarly:
        @nnx_trainer.hookimpl
        def on_train_batch_start(self, trainer, step):
            clock.seconds += 10
            if step == 2 and outcome == "exception":
                raise RuntimeError("crash")

        @nnx_trainer.hookimpl
        def on_train_batch_end(self, trainer, step):
            if step == 2 and outcome == "preempted":
                trainer.preempted, trainer.stop_reason = True, "SIGTERM"

    timer = Timer(clock=clock)
    trainer = make_trainer(tmp_path, timer, EndEarly())
    if outcome == "exception":
        with pytest.raises(RuntimeError, match="crash"):
            trainer.fit(TinyTask(n_val=0))
    else:
        trainer.fit(TinyTask(n_val=0))
    clock.seconds += 1000  # after the fit: not counted
    assert timer.time_elapsed("fit") == 30


def test_opt_in_registered_only_when_configured_or_requested(tmp_path, monkeypatch):
    monkeypatch.delenv("NNX_TRAINER_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    assert Timer.from_environment() is None
    trainer = nnx_trainer.Trainer(run_dir=tmp_path)
    assert trainer.plugin_manager.get_plugin("timer") is None
    assert trainer.plugin_manager.inactive["timer"] == Timer.activation
    by_name = nnx_trainer.Trainer(run_dir=tmp_path, plugin_autoload=False, plugins=["timer"])
    assert by_name.plugin_manager.get_plugin("timer").max_seconds is None
