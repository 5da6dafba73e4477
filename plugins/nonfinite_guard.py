"""Stop training with a clear error when the training loss becomes NaN or infinite.

Every step folds ``~isfinite(loss)`` into a small device-side record (the first bad
step and its loss) with a jitted function: nothing is read back to the host, so the
step pipeline keeps running ahead of the device. The record is read, and a
:class:`NonFiniteLossError` raised if a bad step was seen, only:

- every ``check_every_n_steps`` steps (default: the trainer's ``log_every_n_steps``,
  when the loggers read the device anyway),
- at the end of each training epoch,
- before every checkpoint save (``on_save_checkpoint`` runs this plugin first, so a
  diverged state is never written), and
- at the end of fit.

So a run that diverges stops at most ``check_every_n_steps - 1`` steps after the
bad one, and the message names the exact first bad step. The plugin keeps no state
worth checkpointing: a resumed run starts a fresh record.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from nnx_trainer import hookimpl

if TYPE_CHECKING:
    from nnx_trainer import Trainer

log = logging.getLogger("nnx_trainer.nonfinite_guard")

_NO_BAD_STEP = -1


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite.

    :ivar step: the first zero-based step whose loss was not finite.
    :ivar loss: that step's loss (``nan``, ``inf`` or ``-inf``).
    """

    def __init__(self, message: str, step: int, loss: float) -> None:
        super().__init__(message)
        self.step = step
        self.loss = loss


def _fold_impl(
    record: tuple[jax.Array, jax.Array, jax.Array], loss: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    first, bad_loss, step = record
    # Keep the first bad step only: later steps of a diverged run are all NaN.
    is_new = (first == _NO_BAD_STEP) & ~jnp.isfinite(loss)
    first = jnp.where(is_new, step, first)
    bad_loss = jnp.where(is_new, loss.astype(jnp.float32), bad_loss)
    return first, bad_loss, step + 1


# The step counter lives on device too, so a step costs one async dispatch and
# no host-to-device transfer.
_fold = jax.jit(_fold_impl)


@jax.jit
def _start(loss: jax.Array, step: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A fresh record ``(first bad step, its loss, next step)`` placed like the loss."""
    first = jnp.asarray(_NO_BAD_STEP, jnp.int32)
    return _fold_impl((first, jnp.zeros((), jnp.float32), step.astype(jnp.int32)), loss)


class NonFiniteGuard:
    """Raise :class:`NonFiniteLossError` soon after the training loss turns NaN/Inf.

    On by default; costs one tiny asynchronous device op per step and one scalar
    read per check. Disable with ``Trainer(disable_plugins=["nonfinite_guard"])``.

    :param check_every_n_steps: read the device record every N steps (``None``: the
        trainer's ``log_every_n_steps``). Smaller stops sooner after a bad step but
        makes the host wait for the device more often.
    """

    name = "nonfinite_guard"

    def __init__(self, check_every_n_steps: int | None = None) -> None:
        if check_every_n_steps is not None and (
            isinstance(check_every_n_steps, bool)
            or not isinstance(check_every_n_steps, int)
            or check_every_n_steps < 1
        ):
            raise ValueError(
                "check_every_n_steps must be a positive integer or None (the trainer's "
                f"log_every_n_steps), got {check_every_n_steps!r}"
            )
        self.check_every_n_steps = check_every_n_steps
        self._record: tuple[jax.Array, jax.Array, jax.Array] | None = None
        self._checked_through = 0  # global_step of the last passed check

    def cadence(self, trainer: Trainer) -> int:
        """How many steps apart the record is read for ``trainer``."""
        return self.check_every_n_steps or trainer.log_every_n_steps

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        """Forget any earlier fit: a resumed run starts checking at its first step."""
        self._record = None
        self._checked_through = trainer.global_step

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer, step: int, loss: Any) -> None:
        """Fold this step's loss into the device record; read it at the cadence only."""
        if self._record is None:
            self._record = _start(loss, jnp.asarray(step, jnp.int32))
        else:
            self._record = _fold(self._record, loss)
        if trainer.global_step % self.cadence(trainer) == 0:
            self.check(trainer)

    @hookimpl
    def on_train_epoch_end(self, trainer: Trainer) -> None:
        """Check before end-of-epoch validation spends time on a diverged model."""
        self.check(trainer)

    @hookimpl(tryfirst=True)
    def on_save_checkpoint(self, trainer: Trainer) -> None:
        """Runs before the checkpoint plugin: raising here means no diverged checkpoint."""
        self.check(trainer)

    @hookimpl
    def on_fit_end(self, trainer: Trainer) -> None:
        """Last check (a no-op when the end-of-fit save already checked this step)."""
        self.check(trainer)

    def check(self, trainer: Trainer) -> None:
        """Read the record (waits for the device) and raise if a step's loss was not finite."""
        if self._record is None or self._checked_through == trainer.global_step:
            return  # no step since the last check
        first_bad, bad_loss, _ = self._record
        # One scalar read; the record is replicated, so every process reads the
        # same value and all of them raise together (no process is left waiting).
        first = int(first_bad)
        if first == _NO_BAD_STEP:
            self._checked_through = trainer.global_step
            return
        loss_value = float(bad_loss)
        last = trainer.global_step - 1
        message = (
            f"non-finite loss ({loss_value}) at step {first}, found between step "
            f"{self._checked_through} and step {last} "
            f"(checked every {self.cadence(trainer)} steps); lower the learning rate, "
            "enable gradient_clip_norm, or check the data around that step "
            "(set check_every_n_steps=1 to stop at the bad step itself)"
        )
        trainer.should_stop = True
        trainer.stop_reason = "non_finite_loss"
        log.error(message)
        raise NonFiniteLossError(message, step=first, loss=loss_value)
