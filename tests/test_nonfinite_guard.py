"""NonFiniteGuard: stops a diverged run within the cadence, names the step, never syncs per step."""

from __future__ import annotations

from types import SimpleNamespace

import jax.numpy as jnp
import pytest
from flax import nnx
from tiny_task import TinyModel, TinyTask, make_trainer

import nnx_trainer
from nnx_trainer.plugin_manager import create_plugin_manager
from nnx_trainer.state import first_nonfinite
from nnx_trainer.steps import record_nonfinite as _record_nonfinite
from nnx_trainer_plugins.nonfinite_guard import NonFiniteGuard, NonFiniteLossError


class StepCount(nnx.Variable):
    """A non-trainable counter the training step bumps, so the loss knows its step."""


class CountingModel(TinyModel):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps = StepCount(jnp.zeros((), jnp.int32))


class NaNFrom(TinyTask):
    """TinyTask whose loss is NaN from zero-based step ``bad_step`` on (None: never)."""

    def __init__(self, bad_step: int | None, **kwargs) -> None:
        super().__init__(n_val=0, **kwargs)
        self.bad_step = bad_step

    def configure_model(self, rngs):
        return CountingModel(self.dim, 3, rngs=rngs)

    def training_step(self, model, batch):
        loss, aux = super().training_step(model, batch)
        step = model.steps[...]
        model.steps[...] = step + 1
        if self.bad_step is not None:
            loss = loss * jnp.where(step >= self.bad_step, jnp.nan, 1.0)
        return loss, aux


class Events:
    """Records saves and exceptions, registered after the guard (so pluggy would call it first)."""

    name = "events"

    def __init__(self) -> None:
        self.saved: list[tuple[int, str]] = []
        self.exceptions: list[BaseException] = []

    @nnx_trainer.hookimpl
    def on_save_checkpoint(self, step, reason):
        self.saved.append((step, reason))

    @nnx_trainer.hookimpl
    def on_exception(self, exception):
        self.exceptions.append(exception)


def test_stops_within_the_cadence_and_names_the_first_bad_step(tmp_path):
    events = Events()
    trainer = make_trainer(tmp_path, NonFiniteGuard(check_every_n_steps=10), events,
                           max_epochs=5)
    with pytest.raises(NonFiniteLossError) as info:
        # 256 examples / 16 = 16 steps per epoch: no epoch end before step 30.
        trainer.fit(NaNFrom(23, n_train=256))
    message = str(info.value)
    assert "non-finite loss (nan) at step 23" in message
    assert "between step 20 and step 29 (checked every 10 steps)" in message
    assert "lower the learning rate, enable gradient_clip_norm" in message
    assert info.value.step == 23
    # The check after step 29 raised: no step ran past the cadence, nothing was saved.
    assert trainer.global_step == 30
    assert trainer.stop_reason == "non_finite_loss"
    assert events.saved == []
    assert events.exceptions == [info.value]


def drive_steps(hook, trainer, losses) -> None:
    """Run the per-step hook as the engine does, folding each loss as its train step does."""
    for loss in losses:
        trainer.record = _record_nonfinite(trainer.record, loss)
        trainer.global_step += 1
        hook.on_train_batch_end(trainer=trainer, step=trainer.global_step - 1, loss=loss)


class FakeTrainer(SimpleNamespace):
    """What the guard uses of a Trainer, with the engine's own device record."""

    def start_fit(self) -> None:
        self.record = (jnp.int32(-1), jnp.float32(0.0), jnp.int32(self.global_step))

    def first_nonfinite_loss(self):
        first = int(self.record[0])
        return None if first < 0 else (first, float(self.record[1]))

    def first_nonfinite_state(self):
        return first_nonfinite(self.state)


def fake_trainer(pm) -> FakeTrainer:
    trainer = FakeTrainer(
        global_step=0, log_every_n_steps=50, should_stop=False, stop_reason=None, hook=pm.hook,
        state={"model": {"w": jnp.ones(3)}},
    )
    trainer.start_fit()
    return trainer


def test_epoch_end_and_checkpoint_saves_check_between_cadence_steps():
    events = Events()
    # Registered after the guard, so pluggy would call the saver first without tryfirst.
    pm = create_plugin_manager(plugins=[NonFiniteGuard(), events], autoload=False)
    trainer = fake_trainer(pm)
    pm.hook.on_fit_start(trainer=trainer, task=None)
    drive_steps(pm.hook, trainer, [jnp.float32(1.0)] * 4)
    pm.hook.on_train_epoch_end(trainer=trainer, epoch=0)  # passes
    drive_steps(pm.hook, trainer, [jnp.float32(1.0), jnp.float32(jnp.inf), jnp.float32(2.0)])
    with pytest.raises(NonFiniteLossError, match=r"\(inf\) at step 5, found between step 4 and "
                       r"step 6 \(checked every 50 steps\)"):
        pm.hook.on_save_checkpoint(trainer=trainer, step=7, reason="end")
    assert events.saved == []  # the guard ran first and stopped the save

    trainer.start_fit()  # a new fit starts a fresh record
    pm.hook.on_fit_start(trainer=trainer, task=None)
    drive_steps(pm.hook, trainer, [jnp.float32(1.0), jnp.float32(jnp.nan)])
    with pytest.raises(NonFiniteLossError, match=r"\(nan\) at step 8, found between step 7 "):
        pm.hook.on_train_epoch_end(trainer=trainer, epoch=1)


def test_default_cadence_reads_the_device_only_at_checks(tmp_path, monkeypatch):
    """Count host reads of jax arrays: every float()/int()/item goes through ``_value``."""
    array_type = type(jnp.zeros(()))
    original = array_type._value
    reads: list[int] = []
    trainer_box: list[nnx_trainer.Trainer] = []

    def counting_value(self):
        reads.append(trainer_box[0].global_step)
        return original.fget(self)

    monkeypatch.setattr(array_type, "_value", property(counting_value))
    trainer = make_trainer(tmp_path, NonFiniteGuard(), max_epochs=3, log_every_n_steps=6)
    trainer_box.append(trainer)
    trainer.fit(NaNFrom(None))
    monkeypatch.undo()
    assert trainer.global_step == 12
    # The state the fit starts from, then cadence (log_every_n_steps=6) and epoch ends
    # (every 4 steps), two scalar reads each (the loss record, then the state's check);
    # the end-of-fit save and fit end find step 12 already checked.
    assert reads == [0, 4, 4, 6, 6, 8, 8, 12, 12]


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_bad_options_say_what_to_change(bad):
    with pytest.raises(ValueError, match="check_every_n_steps must be a positive integer or None"):
        NonFiniteGuard(check_every_n_steps=bad)


def test_default_instance_is_on_and_reads_nothing_without_steps():
    guard = NonFiniteGuard()
    assert guard.name == "nonfinite_guard" and guard.check_every_n_steps is None

    class FakeTrainer:
        global_step = 0
        log_every_n_steps = 50

        def first_nonfinite_state(self):
            return None  # the state the fit starts from is checked (and the check compiled)

    guard.on_fit_start(FakeTrainer())
    guard.check(FakeTrainer())  # nothing recorded: no read, no error


def test_the_train_step_records_the_first_nonfinite_loss_without_the_plugin(tmp_path):
    trainer = make_trainer(tmp_path, max_epochs=2)
    trainer.fit(NaNFrom(5))  # no guard: the run goes on, the engine's record remembers
    step, loss = trainer.first_nonfinite_loss()
    assert step == 5 and loss != loss  # NaN
    trainer.fit(NaNFrom(None))
    assert trainer.first_nonfinite_loss() is None  # a new fit starts a fresh record


def test_nothing_is_checked_after_the_fit_ended():
    guard = NonFiniteGuard(check_every_n_steps=1)

    class FakeTrainer:
        global_step = 0
        log_every_n_steps = 50

        def first_nonfinite_loss(self):
            return (0, float("nan"))  # a record a finished fit left behind

        def first_nonfinite_state(self):
            return None

    trainer = FakeTrainer()
    guard.on_fit_start(trainer)
    guard.on_run_end(stage="fit")
    trainer.global_step = 3
    guard.check(trainer)  # no fit running: no read, no error
    guard.on_train_batch_end(trainer)
