"""NonFiniteGuard: stops a diverged run within the cadence, names the step, never syncs per step."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from flax import nnx
from tiny_task import TinyModel, TinyTask

import nnx_trainer
from plugins.nonfinite_guard import NonFiniteGuard, NonFiniteLossError


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
    trainer = nnx_trainer.Trainer(
        run_dir=tmp_path, batch_size=16, max_epochs=5, plugin_autoload=False,
        plugins=[NonFiniteGuard(check_every_n_steps=10), events],
    )
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


def test_epoch_end_check_catches_a_bad_step_before_validation(tmp_path):
    events = Events()
    trainer = nnx_trainer.Trainer(
        run_dir=tmp_path, batch_size=16, max_epochs=3, plugin_autoload=False,
        plugins=[NonFiniteGuard(check_every_n_steps=100), events],
    )
    with pytest.raises(NonFiniteLossError, match=r"at step 2, found between step 0 and step 3"):
        trainer.fit(NaNFrom(2))  # 4 steps per epoch
    assert trainer.global_step == 4


def test_checks_before_the_checkpoint_plugin_saves(tmp_path):
    events = Events()
    trainer = nnx_trainer.Trainer(
        run_dir=tmp_path, batch_size=16, max_steps=7, plugin_autoload=False,
        plugins=[NonFiniteGuard(check_every_n_steps=100), events],
    )
    with pytest.raises(NonFiniteLossError, match=r"at step 5, found between step 4 and step 6"):
        trainer.fit(NaNFrom(5))
    # tryfirst: the guard raised before the (later registered) saver ran.
    assert events.saved == []


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
    trainer = nnx_trainer.Trainer(
        run_dir=tmp_path, batch_size=16, max_epochs=3, log_every_n_steps=6,
        plugin_autoload=False, plugins=[NonFiniteGuard()],
    )
    trainer_box.append(trainer)
    trainer.fit(NaNFrom(None))
    monkeypatch.undo()
    assert trainer.global_step == 12
    # Cadence (log_every_n_steps=6) and epoch ends (every 4 steps), one read each;
    # the end-of-fit save and fit end find step 12 already checked.
    assert reads == [4, 6, 8, 12]


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

    guard.on_fit_start(FakeTrainer())
    guard.check(FakeTrainer())  # nothing recorded: no read, no error
