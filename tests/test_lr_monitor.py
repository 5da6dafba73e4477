"""LearningRateMonitor: train/lr from a schedule attribute or inject_hyperparams, warnings."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import jax
import numpy as np
import optax
import pytest
from hook_recorder import HookRecorder
from tiny_task import TinyTask, make_trainer

from nnx_trainer_plugins.lr_monitor import LearningRateMonitor


def logged_lr(recorder: HookRecorder) -> list[tuple[int, float]]:
    """The ``train/lr`` values logged, kept raw (device arrays) and read only now."""
    return [(s, float(m["train/lr"])) for s, m in recorder.logged() if "train/lr" in m]


def schedule(total_steps: int):
    return optax.linear_schedule(1.0, 0.0, transition_steps=total_steps)


class ScheduleAttribute(TinyTask):
    """Exposes its schedule, as ResNetTask does."""

    def configure_optimizer(self, total_steps):
        self.learning_rate_schedule = schedule(total_steps)
        return optax.sgd(self.learning_rate_schedule)


class Injected(TinyTask):
    """No attribute: the schedule is only visible through inject_hyperparams' state."""

    def configure_optimizer(self, total_steps):
        sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=schedule(total_steps))
        return optax.chain(optax.clip(10.0), sgd)


def run(tmp_path, task, **kwargs):
    keep = HookRecorder("log_metrics")
    trainer = make_trainer(tmp_path, LearningRateMonitor(**kwargs), keep, max_steps=8,
                           accumulate_grad_batches=2, log_every_n_steps=3)
    trainer.fit(task)
    return trainer, keep


def test_schedule_attribute_and_inject_hyperparams_report_the_same_optax_values(tmp_path):
    # 8 steps, 2 batches per update: 4 updates, lr 1.0, 0.75, 0.5, 0.25.
    trainer, by_attribute = run(tmp_path / "a", ScheduleAttribute(n_val=0))
    _, by_state = run(tmp_path / "b", Injected(n_val=0))
    sched = schedule(4)
    # Logged at steps 3 and 6 (log_every_n_steps=3): after 1 and 3 updates, the
    # latest update used schedule(0) and schedule(2).
    expected = [(3, float(sched(0))), (6, float(sched(2)))]
    assert logged_lr(by_attribute) == expected  # read after the fit: the values outlived donation
    assert logged_lr(by_state) == expected
    assert trainer.callback_metrics["train/lr"] == pytest.approx(float(sched(2)))
    # A call of its own, next to (not inside) the trainer's training metrics.
    steps = [(s, sorted(m)) for s, m in by_attribute.logged()]
    assert steps == [
        (3, ["train/lr"]), (3, ["epoch", "train/loss"]),
        (6, ["train/lr"]), (6, ["epoch", "train/loss"]),
        (8, ["epoch", "train/loss"]),
    ]


def fake_trainer(task, state, sink, global_step=0, accumulate=1):
    return SimpleNamespace(
        task=task, state=state, global_step=global_step, accumulate_grad_batches=accumulate,
        log_every_n_steps=5, callback_metrics={},
        hook=SimpleNamespace(log_metrics=lambda trainer, metrics, step: sink.append(
            (step, {k: float(v) for k, v in metrics.items()})
        )),
    )


def test_epoch_interval_logs_at_epoch_ends_only():
    sink = []
    sched = optax.exponential_decay(0.5, transition_steps=1, decay_rate=0.5)
    monitor = LearningRateMonitor(logging_interval="epoch")
    trainer = fake_trainer(SimpleNamespace(learning_rate_schedule=sched), (None, {}), sink)
    monitor.on_fit_start(trainer=trainer)
    for step in range(1, 11):
        trainer.global_step = step
        monitor.on_train_batch_end(trainer=trainer)
        if step % 4 == 0:
            monitor.on_train_epoch_end(trainer=trainer)
    assert sink == [(4, {"train/lr": float(sched(3))}), (8, {"train/lr": float(sched(7))})]


def test_constant_attribute_and_several_injected_rates():
    sink = []
    monitor = LearningRateMonitor()
    trainer = fake_trainer(SimpleNamespace(learning_rate_schedule=0.01), (None, {}), sink, 5)
    monitor.on_fit_start(trainer=trainer)
    monitor.on_train_batch_end(trainer=trainer)
    assert sink == [(5, {"train/lr": 0.01})]

    tx = optax.multi_transform(
        {"a": optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
         "b": optax.inject_hyperparams(optax.adam)(learning_rate=0.2)},
        {"w": "a", "v": "b"},
    )
    opt_state = tx.init({"w": np.zeros(2, np.float32), "v": np.zeros(2, np.float32)})
    trainer = fake_trainer(SimpleNamespace(), (None, jax.device_put(opt_state)), sink, 10)
    monitor.on_fit_start(trainer=trainer)
    assert monitor.source == "inject_hyperparams"
    monitor.on_train_batch_end(trainer=trainer)
    assert sink[-1] == (10, pytest.approx({"train/lr": 0.1, "train/lr_1": 0.2}))


def test_warns_once_and_stays_silent_when_the_rate_is_unknown(caplog):
    sink = []
    monitor = LearningRateMonitor()
    trainer = fake_trainer(TinyTask(), (None, {"momentum": np.zeros(3)}), sink, 5)
    with caplog.at_level(logging.WARNING, logger="nnx_trainer.lr_monitor"):
        monitor.on_fit_start(trainer=trainer)
        monitor.on_fit_start(trainer=trainer)
        monitor.on_train_batch_end(trainer=trainer)
    warnings = [r for r in caplog.records if "cannot determine the learning rate" in r.message]
    assert len(warnings) == 1 and "TinyTask" in warnings[0].message
    assert "inject_hyperparams" in warnings[0].message and sink == []


def test_bad_interval_is_rejected():
    with pytest.raises(ValueError, match="logging_interval must be 'step'"):
        LearningRateMonitor(logging_interval="batch")
