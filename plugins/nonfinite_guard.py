"""Stop training with a clear error when the loss or the training state becomes NaN/Inf.

The Trainer's compiled train step keeps a small device-side record of the first step
whose loss was not finite (``Trainer.first_nonfinite_loss``): no extra device work
per step and nothing read back. The loss can stay finite while the state is not (at a
huge learning rate batch-norm statistics overflow first, and the training loss, which
uses batch statistics, never shows it), so each check also reduces the model and
optimizer state on the device (``Trainer.first_nonfinite_state``: one read of the state,
a flag per array back). This plugin runs both, and raises
:class:`NonFiniteLossError` or :class:`NonFiniteStateError`, only:

- every ``check_every_n_steps`` steps (default: the trainer's ``log_every_n_steps``,
  when the loggers read the device anyway),
- at the end of each training epoch,
- before every checkpoint save (``on_save_checkpoint`` runs this plugin first, so a
  diverged state is never written, and the save it stops counts as refused), and
- at the end of fit.

So a run that diverges stops at most ``check_every_n_steps - 1`` steps after the
bad one; the message names the exact first bad step of the loss, or the two checks
between which the state went bad. The plugin keeps no state worth checkpointing: a
resumed run starts a fresh record. Both errors are :class:`NonFiniteError` (a
``FloatingPointError``): catch that to handle any divergence.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from nnx_trainer import hookimpl
from nnx_trainer.nonfinite import (
    NonFiniteError,
    NonFiniteLossError,
    NonFiniteStateError,
    state_message,
)

if TYPE_CHECKING:
    from nnx_trainer import RunView

# The errors live in the engine (the checkpoint plugin and the display use them too);
# importing them from here keeps working.
__all__ = ["NonFiniteError", "NonFiniteGuard", "NonFiniteLossError", "NonFiniteStateError"]

log = logging.getLogger("nnx_trainer.nonfinite_guard")


class NonFiniteGuard:
    """Raise :class:`NonFiniteLossError` / :class:`NonFiniteStateError` soon after the
    training loss or state turns NaN/Inf.

    On by default; costs two scalar reads per check (the loss record is kept by the
    train step itself; the state check is one reduction over the state on device).
    Disable with ``Trainer(disable_plugins=["nonfinite_guard"])``: the checkpoint plugin
    then still refuses a non-finite state, and that refusal fails the run.

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
        self._resumed_at: int | None = None  # the step this fit resumed from, if it did
        self._saved: list[int] = []  # steps the checkpoint plugin saved in this fit

    def cadence(self, trainer: RunView) -> int:
        """How many steps apart the record is read for ``trainer``."""
        return self.check_every_n_steps or trainer.log_every_n_steps

    @hookimpl
    def on_fit_start(self, trainer: RunView) -> None:
        """Forget any earlier fit; check the state the fit starts from (this also compiles
        the state check now, not inside a measured window)."""
        self._checked_through = trainer.global_step
        self._saved = []
        resumed = getattr(trainer, "resumed_from", None) is not None
        self._resumed_at = trainer.global_step if resumed else None
        array = trainer.first_nonfinite_state()
        if array is not None:
            message = (f"the training state is not finite at the start of the fit (step "
                       f"{trainer.global_step}): NaN or Inf in {array}; check the model's "
                       "initialisation" + (" and the checkpoint resumed from" if resumed else ""))
            self._stop(trainer, "non_finite_state", message)
            raise NonFiniteStateError(message, last_finite=None, step=trainer.global_step,
                                      array=array)

    @hookimpl
    def on_train_batch_end(self, trainer: RunView) -> None:
        """Read the record at the cadence only."""
        if trainer.global_step % self.cadence(trainer) == 0:
            self.check(trainer)

    @hookimpl
    def on_train_epoch_end(self, trainer: RunView) -> None:
        """Check before end-of-epoch validation spends time on a diverged model."""
        self.check(trainer)

    @hookimpl(tryfirst=True)
    def on_save_checkpoint(self, trainer: RunView, step: int) -> None:
        """Runs before the checkpoint plugin: raising here means no diverged checkpoint."""
        self.check(trainer, saving=step)

    @hookimpl
    def on_fit_end(self, trainer: RunView) -> None:
        """Last check (a no-op when the end-of-fit save already checked this step)."""
        self.check(trainer)

    @hookimpl
    def on_checkpoint_saved(self, step: int) -> None:
        """Remember the saves, for the message of a later divergence."""
        self._saved.append(step)

    def latest_saved(self, trainer: RunView) -> int | None:
        """The newest checkpoint step of this run: saved in this fit, else the step the fit
        resumed from (if it did)."""
        saved = [s for s in self._saved if s <= trainer.global_step]
        return max(saved) if saved else self._resumed_at

    @hookimpl
    def on_run_end(self, stage: str) -> None:
        """The fit is over, however it ended: nothing to check until the next one starts."""
        if stage == "fit":
            self._checked_through = None

    def check(self, trainer: RunView, saving: int | None = None) -> None:
        """Read the loss record and the state's finiteness (waits for the device); raise
        :class:`NonFiniteLossError` or :class:`NonFiniteStateError` if either went bad.

        :param saving: the step about to be saved (its checkpoint is refused on error).
        """
        if self._checked_through in (None, trainer.global_step):
            return  # not fitting, or no step since the last check
        # Scalar reads of replicated values: every process reads the same answers and
        # all of them raise together (no process is left waiting).
        bad = trainer.first_nonfinite_loss()
        if bad is not None:
            first, loss_value = bad
            last = trainer.global_step - 1
            refused = "" if saving is None else f"; the checkpoint of step {saving} was refused"
            message = (
                f"non-finite loss ({loss_value}) at step {first}, found between step "
                f"{self._checked_through} and step {last} "
                f"(checked every {self.cadence(trainer)} steps){refused}; lower the learning "
                "rate, enable gradient_clip_norm, or check the data around that step "
                "(set check_every_n_steps=1 to stop at the bad step itself)"
            )
            self._stop(trainer, "non_finite_loss", message)
            raise NonFiniteLossError(message, step=first, loss=loss_value, refused_save=saving)
        array = trainer.first_nonfinite_state()
        if array is None:
            self._checked_through = trainer.global_step
            return
        message = state_message(self._checked_through, trainer.global_step, array, saving,
                                self.latest_saved(trainer), loss_finite=True)
        self._stop(trainer, "non_finite_state", message)
        raise NonFiniteStateError(message, last_finite=self._checked_through,
                                  step=trainer.global_step, array=array, refused_save=saving)

    @staticmethod
    def _stop(trainer: RunView, reason: str, message: str) -> None:
        trainer.should_stop = True
        trainer.stop_reason = reason
        log.error(message)
