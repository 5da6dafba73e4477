"""Stop training with a clear error when the training loss becomes NaN or infinite.

The Trainer's compiled train step keeps a small device-side record of the first step
whose loss was not finite (``Trainer.first_nonfinite_loss``): no extra device work
per step and nothing read back. This plugin reads that record, and raises
:class:`NonFiniteLossError` if a bad step was seen, only:

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
from typing import TYPE_CHECKING

from nnx_trainer import hookimpl

if TYPE_CHECKING:
    from nnx_trainer import Trainer

log = logging.getLogger("nnx_trainer.nonfinite_guard")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite.

    :ivar step: the first zero-based step whose loss was not finite.
    :ivar loss: that step's loss (``nan``, ``inf`` or ``-inf``).
    """

    def __init__(self, message: str, step: int, loss: float) -> None:
        super().__init__(message)
        self.step = step
        self.loss = loss


class NonFiniteGuard:
    """Raise :class:`NonFiniteLossError` soon after the training loss turns NaN/Inf.

    On by default; costs one scalar read per check (the record is kept by the
    train step itself). Disable with ``Trainer(disable_plugins=["nonfinite_guard"])``.

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
        self._checked_through: int | None = None  # global_step of the last passed check

    def cadence(self, trainer: Trainer) -> int:
        """How many steps apart the record is read for ``trainer``."""
        return self.check_every_n_steps or trainer.log_every_n_steps

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        """Forget any earlier fit: a resumed run starts checking at its first step."""
        self._checked_through = trainer.global_step

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer) -> None:
        """Read the record at the cadence only."""
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

    @hookimpl
    def on_run_end(self, stage: str) -> None:
        """The fit is over, however it ended: nothing to check until the next one starts."""
        if stage == "fit":
            self._checked_through = None

    def check(self, trainer: Trainer) -> None:
        """Read the record (waits for the device) and raise if a step's loss was not finite."""
        if self._checked_through in (None, trainer.global_step):
            return  # not fitting, or no step since the last check
        # One scalar read; the record is replicated, so every process reads the
        # same value and all of them raise together (no process is left waiting).
        bad = trainer.first_nonfinite_loss()
        if bad is None:
            self._checked_through = trainer.global_step
            return
        first, loss_value = bad
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
