"""Stop training after a wall-time budget, and record how long each stage took.

``Trainer(plugins=[Timer(max_time="00:12:00:00")])`` stops a fit once 12 hours have
passed since it started (``trainer.should_stop``, ``trainer.stop_reason = "max_time"``);
the trainer then finishes the current step, saves its end checkpoint and calls
``on_fit_end`` as usual, so the run can be resumed later.

``max_time`` is seconds (``3600``), a ``"DD:HH:MM:SS"`` string, a dict of
``datetime.timedelta`` arguments (``{"hours": 1, "minutes": 30}``) or a ``timedelta``.
The check compares host clock readings after each step (``interval="step"``) or
epoch (``"epoch"``); it never waits for the device. Time spent in end-of-epoch
validation counts towards the budget.

Checkpoints carry the elapsed time per stage, so a resumed fit counts the time of
the runs before it (as Lightning's Timer does): a 12-hour budget is 12 hours in
total, however many times the run is resumed.

``time_elapsed("fit")`` is the fit's wall time; ``time_elapsed("validate")`` /
``("test")`` the total time spent in those evaluations since the latest fit
started. ``Timer()`` (``max_time=None``) only records these times.

Opt-in: installing the package registers nothing (``from_environment`` returns None;
``nnx-trainer-plugins`` lists it as inactive with its ``activation`` sentence). Pass a
configured instance, or request it by name (``plugins=["timer"]``: record times only).

In multi-process runs the processes' clocks disagree slightly, so the decision is
taken by process 0 and broadcast, at the trainer's log cadence and at epoch ends
(a sync the loggers make anyway): all processes stop after the same step.
"""

from __future__ import annotations

import datetime
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from nnx_trainer import hookimpl

if TYPE_CHECKING:
    from nnx_trainer import RunView

log = logging.getLogger("nnx_trainer.timer")

STAGES = ("fit", "validate", "test")
INTERVALS = ("step", "epoch")
_DHMS = re.compile(r"^\s*(\d+):(\d{1,2}):(\d{1,2}):(\d{1,2})\s*$")
_TIMEDELTA_KEYS = ("weeks", "days", "hours", "minutes", "seconds", "milliseconds")


def parse_max_time(max_time: Any) -> float | None:
    """``max_time`` in seconds (None stays None); a ValueError says which forms are accepted."""
    if max_time is None:
        return None
    if isinstance(max_time, datetime.timedelta):
        seconds = max_time.total_seconds()
    elif isinstance(max_time, (int, float)) and not isinstance(max_time, bool):
        seconds = float(max_time)
    elif isinstance(max_time, str):
        match = _DHMS.match(max_time)
        if match is None:
            raise ValueError(
                f"max_time string must be 'DD:HH:MM:SS' (e.g. '00:12:00:00' for 12 hours), "
                f"got {max_time!r}"
            )
        days, hours, minutes, secs = (int(g) for g in match.groups())
        if hours >= 24 or minutes >= 60 or secs >= 60:
            raise ValueError(
                f"max_time {max_time!r}: hours must be < 24 and minutes, seconds < 60 "
                "(put whole days in the DD field)"
            )
        seconds = float(((days * 24 + hours) * 60 + minutes) * 60 + secs)
    elif isinstance(max_time, Mapping):
        unknown = sorted(set(max_time) - set(_TIMEDELTA_KEYS))
        if unknown:
            raise ValueError(
                f"max_time dict has unknown keys {unknown}; use {', '.join(_TIMEDELTA_KEYS)}"
            )
        values = list(max_time.values())
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ValueError(f"max_time dict values must be numbers, got {dict(max_time)!r}")
        seconds = datetime.timedelta(**max_time).total_seconds()
    else:
        raise ValueError(
            "max_time must be seconds, a 'DD:HH:MM:SS' string, a dict such as "
            f"{{'hours': 1}}, a datetime.timedelta or None, got {max_time!r}"
        )
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"max_time must be a positive, finite duration, got {max_time!r}")
    return seconds


class Timer:
    """Stop the fit after ``max_time``; record the time spent per stage.

    :param max_time: the budget (see the module docs), or None: record times only.
    :param interval: check after every ``"step"`` or at every ``"epoch"`` end.
    :param verbose: log the stop decision (main process only).
    :param clock: seconds from a monotonic clock; tests pass a fake one.
    """

    name = "timer"
    activation = (
        "opt-in: pass a configured instance, e.g. "
        "Trainer(plugins=[Timer(max_time='00:12:00:00')]), or request it by name: "
        "plugins=['timer'] (records times only)"
    )

    @classmethod
    def from_environment(cls) -> Timer | None:
        """Never on by itself: it needs a budget (see :attr:`activation`)."""
        return None

    def __init__(
        self,
        max_time: float | str | Mapping[str, float] | datetime.timedelta | None = None,
        interval: str = "step",
        verbose: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval not in INTERVALS:
            raise ValueError(
                f"interval must be 'step' (check after every step) or 'epoch' (at epoch "
                f"ends), got {interval!r}"
            )
        self.max_seconds = parse_max_time(max_time)
        self.interval = interval
        self.verbose = verbose
        self.clock = clock
        self._offset = dict.fromkeys(STAGES, 0.0)  # time of earlier, checkpointed runs
        self._closed = dict.fromkeys(STAGES, 0.0)  # finished spans of this run
        self._running: dict[str, float] = {}  # stage -> clock at span start
        self._restored = False

    # ------------------------------------------------------------- queries

    def time_elapsed(self, stage: str = "fit") -> float:
        """Seconds spent in ``stage`` ("fit", "validate" or "test"), resumed runs included."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
        total = self._offset[stage] + self._closed[stage]
        if stage in self._running:
            total += self.clock() - self._running[stage]
        return total

    def time_remaining(self, stage: str = "fit") -> float | None:
        """Seconds left of the budget (never negative), or None without ``max_time``."""
        if self.max_seconds is None:
            return None
        return max(0.0, self.max_seconds - self.time_elapsed(stage))

    # -------------------------------------------------------------- spans

    def _begin(self, stage: str) -> None:
        self._running[stage] = self.clock()

    def _finish(self, stage: str) -> None:
        start = self._running.pop(stage, None)
        if start is not None:
            self._closed[stage] += self.clock() - start

    # ---------------------------------------------------------- the check

    def _check(self, trainer: RunView, may_sync: bool) -> None:
        if self.max_seconds is None or trainer.should_stop:
            return
        over = self.time_elapsed("fit") >= self.max_seconds
        strategy = getattr(trainer, "strategy", None)
        if getattr(strategy, "process_count", 1) > 1:
            if not may_sync:
                return  # decided together at the log cadence, not per step
            from jax.experimental import multihost_utils

            over = bool(multihost_utils.broadcast_one_to_all(np.int32(over)))
        if over:
            trainer.should_stop = True
            trainer.stop_reason = "max_time"
            if self.verbose and getattr(trainer, "is_main_process", True):
                log.info(
                    "max_time of %.0f s reached after %.1f s (step %d): stopping",
                    self.max_seconds, self.time_elapsed("fit"), trainer.global_step,
                )

    # --------------------------------------------------------------- hooks

    @hookimpl
    def on_fit_start(self, trainer: RunView) -> None:
        """Start the fit clock; a resumed fit continues from the checkpointed time."""
        if not self._restored:
            self._offset = dict.fromkeys(STAGES, 0.0)
        self._restored = False
        self._closed = dict.fromkeys(STAGES, 0.0)
        self._running = {}
        self._begin("fit")
        self._check(trainer, may_sync=True)  # a resumed run may already be over budget

    @hookimpl
    def on_train_batch_end(self, trainer: RunView) -> None:
        """Compare host clock readings only: no device work, no sync."""
        if self.max_seconds is not None and self.interval == "step":
            self._check(trainer, may_sync=trainer.global_step % trainer.log_every_n_steps == 0)

    @hookimpl
    def on_train_epoch_end(self, trainer: RunView) -> None:
        """Check at every epoch end (the only check with ``interval="epoch"``)."""
        self._check(trainer, may_sync=True)

    @hookimpl
    def on_validation_start(self, stage: str) -> None:
        """Time the evaluation."""
        self._begin(stage)

    @hookimpl
    def on_validation_end(self, stage: str) -> None:
        """Add the evaluation's time to its stage."""
        self._finish(stage)

    @hookimpl
    def on_run_end(self, stage: str) -> None:
        """Close the spans the run left open (the fit clock after a fit, however it ended)."""
        for running in list(self._running):
            if stage == "fit" or running == stage:
                self._finish(running)

    # ---------------------------------------------------------- checkpoint

    @hookimpl
    def state_dict(self) -> dict[str, Any]:
        """Elapsed seconds per stage, running spans included (JSON)."""
        return {self.name: {"time_elapsed": {s: self.time_elapsed(s) for s in STAGES}}}

    @hookimpl
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Count the checkpointed run's time in the next fit."""
        saved = (state.get(self.name) or {}).get("time_elapsed")
        if not saved:
            return
        self._offset = {s: float(saved.get(s, 0.0)) for s in STAGES}
        self._restored = True
