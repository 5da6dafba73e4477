"""Stop training when a validation metric stops improving.

``Trainer(plugins=[EarlyStopping(monitor="val/loss", patience=3)])`` checks
``val/loss`` after every validation run inside ``fit`` (end of epoch, and every
``val_check_interval`` steps): a validation whose value is not better than the best
so far by more than ``min_delta`` adds one to a wait count, a better one resets it,
and once the wait count reaches ``patience`` the plugin sets ``trainer.should_stop``
(``trainer.stop_reason = "early_stopping"``). The trainer then stops after the
current step or epoch, saves its end checkpoint and calls ``on_fit_end`` as usual.

The metric is read once per validation (one host read, at a point where the engine
reads evaluation results anyway). Standalone ``trainer.validate()`` / ``test()``
calls are not counted, so they can never stop a later ``fit``.

Checkpoints carry ``{"early_stopping": {"best", "wait", "stopped_epoch", ...}}``, so a
resumed run keeps counting where the interrupted one left off.

Opt-in: installing the package registers nothing (``from_environment`` returns None,
and ``nnx-trainer-plugins`` lists it as inactive with its ``activation`` sentence); it
exists only as a configured instance, since it needs to know what to monitor.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from nnx_trainer import hookimpl
from nnx_trainer.option_checks import check_monitor_validated, metric_mode

if TYPE_CHECKING:
    from nnx_trainer import RunView

log = logging.getLogger("nnx_trainer.early_stopping")


class EarlyStopping:
    """Set ``trainer.should_stop`` when ``monitor`` has not improved for ``patience`` validations.

    :param monitor: metric name as logged (``"val/loss"``, ``"val/accuracy"``, or any name
        in ``trainer.callback_metrics``); required.
    :param mode: ``"min"`` if lower is better, ``"max"`` if higher is better, ``"auto"``
        (default) from the metric's name: ``"max"`` for accuracy-like names (``accuracy``,
        ``acc``, ``top5``, ``f1``, ``auc``, ...), else ``"min"``.
    :param patience: validations without improvement before stopping (0: stop at the
        first validation that does not improve).
    :param min_delta: an improvement must beat the best value by more than this.
    :param check_finite: stop at once when the metric is NaN or infinite (otherwise a
        non-finite value just counts as "no improvement").
    :param verbose: log improvements and the stop decision (main process only).

    After a run, ``best`` holds the best value seen, ``wait`` the current count of
    validations without improvement, and ``stopped_epoch`` / ``stopped_step`` the
    trainer's ``current_epoch`` / ``global_step`` when it decided to stop (``None`` if it
    did not). For end-of-epoch validation ``stopped_epoch`` is the number of completed
    epochs.
    """

    name = "early_stopping"
    activation = (
        "opt-in: pass a configured instance, e.g. "
        "Trainer(plugins=[EarlyStopping(monitor='val/loss', patience=3)])"
    )

    @classmethod
    def from_environment(cls) -> EarlyStopping | None:
        """Never on by itself: it needs ``monitor`` (see :attr:`activation`)."""
        return None

    def __init__(
        self,
        monitor: str,
        mode: str = "auto",
        patience: int = 3,
        min_delta: float = 0.0,
        check_finite: bool = True,
        verbose: bool = True,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(
                f"EarlyStopping needs monitor=, a metric name such as 'val/loss', got "
                f"{monitor!r}; configure it as Trainer(plugins=[EarlyStopping(monitor=...)])"
            )
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(
                f"patience must be an integer >= 0 (validations without improvement), "
                f"got {patience!r}"
            )
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or not (
            math.isfinite(min_delta) and min_delta >= 0
        ):
            raise ValueError(
                f"min_delta must be a finite number >= 0 (the direction comes from mode), "
                f"got {min_delta!r}"
            )
        self.monitor = monitor
        self.mode = metric_mode(monitor, mode, "EarlyStopping")
        self.patience = patience
        self.min_delta = float(min_delta)
        self.check_finite = check_finite
        self.verbose = verbose
        self._reset()
        self._fitting = False
        self._restored = False  # load_state_dict ran: the next fit continues its counts
        self._checks_this_fit = 0

    def _reset(self) -> None:
        self.best: float | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None
        self.stopped_step: int | None = None

    # ---------------------------------------------------------------- decision

    def improves(self, value: float) -> bool:
        """Whether ``value`` beats the best so far by more than ``min_delta``."""
        if not math.isfinite(value):
            return False  # never let NaN/Inf become the best value
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def _read(self, trainer: RunView, metrics: Mapping[str, Any]) -> float:
        if self.monitor in metrics:
            raw = metrics[self.monitor]
        elif self.monitor in trainer.callback_metrics:
            raw = trainer.callback_metrics[self.monitor]
        else:
            names = sorted({*metrics, *trainer.callback_metrics})
            raise ValueError(
                f"EarlyStopping(monitor={self.monitor!r}): no metric of that name after "
                f"validation; available: {', '.join(names) or '(none)'}. Set monitor to one "
                "of these (validation metrics are prefixed 'val/')"
            )
        return float(raw)  # one host read per validation

    def _stop(self, trainer: RunView, why: str) -> None:
        trainer.should_stop = True
        trainer.stop_reason = "early_stopping"
        self.stopped_epoch = trainer.current_epoch
        self.stopped_step = trainer.global_step
        if self.verbose and trainer.is_main_process:
            log.info("early stopping at step %d: %s", trainer.global_step, why)

    # ------------------------------------------------------------------- hooks

    @hookimpl
    def on_fit_start(self, trainer: RunView) -> None:
        """Start counting; a fresh fit forgets an earlier one, a resumed fit continues."""
        check_monitor_validated(self.monitor, trainer, "EarlyStopping")
        if not self._restored:
            self._reset()
        self._restored = False
        self._fitting = True
        self._checks_this_fit = 0

    @hookimpl
    def on_validation_end(self, trainer: RunView, stage: str, metrics: Mapping[str, Any]) -> None:
        """Compare the monitored value with the best so far; stop once patience runs out."""
        if stage != "validate" or not self._fitting:
            return
        value = self._read(trainer, metrics)
        self._checks_this_fit += 1
        if self.check_finite and not math.isfinite(value):
            self._stop(trainer, f"{self.monitor} = {value} is not finite")
            return
        if self.improves(value):
            if self.verbose and trainer.is_main_process:
                previous = "" if self.best is None else f" (was {self.best:.6g})"
                log.info("%s improved to %.6g%s", self.monitor, value, previous)
            self.best = value
            self.wait = 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self._stop(
                trainer,
                f"{self.monitor} did not improve on {self.best} (mode {self.mode}, "
                f"min_delta {self.min_delta}) for {self.wait} validations",
            )

    @hookimpl
    def on_run_end(self, trainer: RunView, stage: str, outcome: str) -> None:
        """The fit is over, however it ended: later standalone validations do not count.

        After a fit that ran to its end, say so when the monitor was never checked (no
        validation data, or none was due).
        """
        if stage != "fit":
            return
        self._fitting = False
        if (outcome in ("completed", "stopped") and self._checks_this_fit == 0
                and trainer.is_main_process):
            log.warning(
                "EarlyStopping(monitor=%r) never ran: no validation happened during fit "
                "(give the task val_data(), or set check_val_every_n_epoch/val_check_interval)",
                self.monitor,
            )

    # -------------------------------------------------------------- checkpoint

    @hookimpl
    def state_dict(self) -> dict[str, Any]:
        """The counts, as JSON (``best`` is always finite or None)."""
        return {
            self.name: {
                "monitor": self.monitor, "mode": self.mode, "best": self.best,
                "wait": self.wait, "stopped_epoch": self.stopped_epoch,
                "stopped_step": self.stopped_step,
            }
        }

    @hookimpl
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the counts of the checkpointed run (same monitor and mode only)."""
        saved = state.get(self.name)
        if not saved:
            return
        if saved.get("monitor") != self.monitor or saved.get("mode") != self.mode:
            log.warning(
                "EarlyStopping: the checkpoint tracked %r (mode %s), this run tracks %r "
                "(mode %s); starting the count afresh",
                saved.get("monitor"), saved.get("mode"), self.monitor, self.mode,
            )
            return
        best = saved.get("best")
        self.best = None if best is None else float(best)
        self.wait = int(saved.get("wait", 0))
        self.stopped_epoch = saved.get("stopped_epoch")
        self.stopped_step = saved.get("stopped_step")
        self._restored = True
