"""Divergence as errors: the loss or the training state became NaN or infinite.

Raised by the ``nonfinite_guard`` plugin (soon after the bad step) and by the checkpoint
plugin (a save refused because the state it would write is not finite), and read by the
progress display (a diverged fit still gets its summary). They live in the engine so
that those plugins share them without importing each other. Catch
:class:`NonFiniteError` (a ``FloatingPointError``) to handle any divergence.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from nnx_trainer.state import first_nonfinite

if TYPE_CHECKING:
    from nnx_trainer.run_view import RunView

__all__ = ["NonFiniteError", "NonFiniteLossError", "NonFiniteStateError",
           "refused_save_error", "state_message"]

log = logging.getLogger("nnx_trainer.nonfinite_guard")


class NonFiniteError(FloatingPointError):
    """Training diverged: the loss or the training state became NaN or infinite.

    :ivar refused_save: the step whose checkpoint was not written because of it
        (``None``: found between saves).
    """

    refused_save: int | None = None


class NonFiniteLossError(NonFiniteError):
    """The training loss became NaN or infinite.

    :ivar step: the first zero-based step whose loss was not finite.
    :ivar loss: that step's loss (``nan``, ``inf`` or ``-inf``).
    """

    def __init__(self, message: str, step: int, loss: float,
                 refused_save: int | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.loss = loss
        self.refused_save = refused_save


class NonFiniteStateError(NonFiniteError):
    """The training state (model or optimizer arrays) became NaN or infinite.

    :ivar last_finite: the step (steps completed) at which it was last found finite.
    :ivar step: the step at which it was found not finite.
    :ivar array: the path of the first array holding a NaN/Inf, e.g.
        ``"model/bn1/var"`` (``None`` when not known).
    """

    def __init__(self, message: str, last_finite: int | None, step: int,
                 array: str | None = None, refused_save: int | None = None) -> None:
        super().__init__(message)
        self.last_finite = last_finite
        self.step = step
        self.array = array
        self.refused_save = refused_save


def state_message(last_finite: int | None, step: int, array: str | None,
                  refused_save: int | None, latest_saved: int | None,
                  loss_finite: bool = False) -> str:
    """The one message of a non-finite state, wherever it is found (guard or saver)."""
    since = "the start of this fit" if last_finite is None else f"step {last_finite}"
    where = f" (first in {array})" if array else ""
    loss = ", while the loss stayed finite" if loss_finite else ""
    saved = ("nothing was saved in this fit. Lower the learning rate or enable "
             "gradient_clip_norm and start again" if latest_saved is None else
             f"the latest checkpoint saved is step {latest_saved}. Lower the learning rate "
             "or enable gradient_clip_norm, then start again or resume from it")
    refused = (f"; the checkpoint of step {refused_save} was refused"
               if refused_save is not None else "")
    return (f"the training state became non-finite between {since} (last found finite) "
            f"and step {step}: NaN or Inf in the training state{where}{loss}"
            f"{refused}; {saved}")


def refused_save_error(trainer: RunView, step: int, arrays: Any,
                       saved_steps: list[int]) -> NonFiniteStateError:
    """The error of a checkpoint refused because ``arrays`` (what it would have written)
    hold a NaN/Inf: the checkpoint plugin raises it, so the run fails instead of ending
    "successfully" with nothing saved (this plugin disabled, or a plugin's arrays)."""
    last = max((s for s in saved_steps if s < step), default=None)
    array = first_nonfinite(arrays)
    message = state_message(last, step, array, step, last)
    log.error(message)
    trainer.should_stop = True
    trainer.stop_reason = "non_finite_state"
    return NonFiniteStateError(message, last_finite=last, step=step, array=array,
                               refused_save=step)
