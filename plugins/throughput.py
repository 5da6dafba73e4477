"""Throughput: training rates over training time only, and evaluation and checkpoint time
as their own figures, logged at the trainer's log cadence.

``perf/examples_per_sec`` counts the Task's examples, whatever they are (images, rows,
sequences): the engine names no modality; the progress display writes the Task's
``example_name`` (``images/s`` for ``ResNetTask``).

**Training time only** (as Lightning's ``ThroughputMonitor``): a window runs from one
log step to the next, and the time the loop spends away from training inside it is
taken out and reported on its own:

- ``perf/val_seconds``: evaluation during the fit, from ``on_validation_start`` until
  training resumes (or a save starts);
- ``perf/checkpoint_seconds``: checkpoint saves, from ``on_save_checkpoint`` until
  training resumes (the copy off the device; an asynchronous save then writes in the
  background, which training shares the host with).

Each is logged in the record of the window that contained it (absent when nothing
ran), and :attr:`Throughput.totals` sums them over the fit for the fit summary. Time
blocked on the data pipeline inside those spans stays training time (the pipeline
feeds training), so ``perf/data_wait_share`` is the data wait over training time. So a
window with an epoch-end validation and a save reports the same rate as one without.

**Synchronised boundaries.** Steps are dispatched ahead of the device, so a window
measured at dispatch time would end before its steps ran (and a window after an
evaluation, which drains the device, would look fast). At each boundary (the log step,
the start of an evaluation or a save) the plugin waits for the latest step's loss:
each of those points waits for the device anyway a moment later (the loggers read that
step's metrics, evaluation and saving read the state), so this adds no idle time; it
only puts the clock reading after the wait. The first window of a fit includes
compilation and is reported as such (``perf/compile_seconds``) instead of as a
throughput.

With the train step's FLOP count (the ``log_model_summary`` hook, which the
``model_summary`` plugin calls), each window also has ``perf/flops_per_sec`` (the whole
mesh: FLOPs per step x steps/s), ``perf/flops_per_sec_per_device`` and, where the
device's peak is known (:data:`nnx_trainer.flops.PEAK_FLOPS`), ``perf/mfu`` (model FLOP
utilisation, a fraction), from the same training-only rate.

The fit summary of the progress display reads :meth:`Throughput.fit_totals` through the
``training_time`` hook, which this plugin answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jax

from nnx_trainer import hookimpl
from nnx_trainer.flops import StepFlops, achieved

if TYPE_CHECKING:
    from nnx_trainer import RunView

PAUSES = ("val", "checkpoint")  # the loop's time away from training, by kind


class Throughput:
    """Logs ``perf/steps_per_sec``, ``perf/examples_per_sec``, ``perf/data_wait_share``
    over training time, ``perf/val_seconds`` and ``perf/checkpoint_seconds`` for the
    time away from it, and with a FLOP count ``perf/flops_per_sec`` (``_per_device``)
    and ``perf/mfu``.

    :param enabled: log at all (False makes the plugin a no-op).
    :param clock: time source in seconds (tests inject a fake one).
    """

    name = "throughput"

    def __init__(self, enabled: bool = True,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.enabled = enabled
        self.clock = clock
        self.last: dict[str, float] = {}
        self._flops: StepFlops | None = None  # this fit's train step count, once announced
        self._reset()

    def _reset(self) -> None:
        # (clock, global_step, data wait) at the window's start; None until the first log step.
        self._window_start: tuple[float, int, float] | None = None
        self._window_away = dict.fromkeys(PAUSES, 0.0)  # this window's time away, by kind
        self._pause: tuple[str, float, float] | None = None  # (kind, clock, data wait)
        self._loss: Any = None  # the latest step's loss (a device scalar): what to wait for
        #: This fit's sums after compilation: training seconds and steps, and the time away.
        self.totals: dict[str, float] = {"train_seconds": 0.0, "train_steps": 0,
                                         **{f"{kind}_seconds": 0.0 for kind in PAUSES}}

    def _synced_now(self) -> float:
        """The clock once the latest dispatched step has finished on the device."""
        if self._loss is not None:
            jax.block_until_ready(self._loss)
        return self.clock()

    def _start_pause(self, trainer: RunView, kind: str) -> None:
        if not self.enabled or self._window_start is None:
            return  # no window yet (compilation) or not fitting: nothing to take out
        now = self._synced_now() if self._pause is None else self._end_pause(trainer)
        self._pause = (kind, now, trainer.data_wait_seconds)

    def _paused(self, trainer: RunView, now: float) -> tuple[str, float]:
        """The running pause's kind and its seconds away from training up to ``now``."""
        kind, start, wait = self._pause
        # Waiting for data is training's own time, wherever the loop was.
        return kind, max(0.0, (now - start) - (trainer.data_wait_seconds - wait))

    def _end_pause(self, trainer: RunView) -> float:
        """Close the running pause (if any) into its kind; returns the clock."""
        now = self.clock()
        if self._pause is not None:
            kind, away = self._paused(trainer, now)
            self._window_away[kind] += away
            self.totals[f"{kind}_seconds"] += away
            self._pause = None
        return now

    # --------------------------------------------------------------- hooks

    @hookimpl
    def on_fit_start(self, trainer: RunView) -> None:
        """Start afresh: the first window will contain compilation."""
        self._reset()
        self.last, self._flops = {}, None

    @hookimpl
    def log_model_summary(self, flops: StepFlops | None) -> None:
        """Keep the train step's FLOP count: FLOP/s and MFU from the next window on."""
        self._flops = flops

    @hookimpl
    def on_train_batch_start(self, trainer: RunView) -> None:
        """Training resumes: the evaluation or save before this step is over."""
        if self._pause is not None:
            self._end_pause(trainer)

    @hookimpl
    def on_train_batch_end(self, trainer: RunView, loss: Any) -> None:
        """At the log cadence, close the window and log its rates as a separate record."""
        if not self.enabled:
            return
        self._loss = loss
        if trainer.global_step % trainer.log_every_n_steps:
            return
        if self._window_start is None:  # first window: compile + first steps
            self._mark(trainer, self._synced_now())
            return
        start, first_step, first_wait = self._window_start
        now, steps = self._synced_now(), trainer.global_step - first_step
        away = dict(self._window_away)
        seconds = now - start - sum(away.values())
        if steps <= 0 or seconds <= 0:
            return
        self.totals["train_seconds"] += seconds
        self.totals["train_steps"] += steps
        self.last = {
            "perf/steps_per_sec": steps / seconds,
            "perf/examples_per_sec": steps * trainer.batch_size / seconds,
            "perf/data_wait_share": min(1.0, (trainer.data_wait_seconds - first_wait) / seconds),
        }
        if self._flops is not None:  # FLOP/s and MFU from the same training-only rate
            rates = achieved(self._flops.per_step, steps / seconds,
                             trainer.strategy.num_devices, trainer.precision)
            self.last.update({f"perf/{key}": value for key, value in rates.items()})
        self.last.update({f"perf/{kind}_seconds": s for kind, s in away.items() if s > 0})
        if "train" in trainer.compile_seconds:
            self.last["perf/compile_seconds"] = trainer.compile_seconds["train"]
        trainer.hook.log_metrics(trainer=trainer, metrics=dict(self.last),
                                 step=trainer.global_step)
        self._mark(trainer, now)  # logging this record is the next window's time

    def _mark(self, trainer: RunView, now: float) -> None:
        self._window_start = (now, trainer.global_step, trainer.data_wait_seconds)
        self._window_away = dict.fromkeys(PAUSES, 0.0)

    @hookimpl
    def on_validation_start(self, trainer: RunView, stage: str) -> None:
        """Evaluation is not training time: it counts as ``perf/val_seconds``."""
        self._start_pause(trainer, "val")

    @hookimpl
    def on_save_checkpoint(self, trainer: RunView) -> None:
        """Saving is not training time: it counts as ``perf/checkpoint_seconds``."""
        self._start_pause(trainer, "checkpoint")

    @hookimpl
    def on_run_end(self, trainer: RunView, stage: str) -> None:
        """The end-of-fit validation and save count in :attr:`totals` too; evaluations
        after the fit are not paused training."""
        if stage == "fit":
            if self._pause is not None:
                self._end_pause(trainer)
            self._window_start = None

    @hookimpl
    def training_time(self, trainer: RunView) -> Mapping[str, float]:
        """This fit's training-only time for the fit summary: :meth:`fit_totals`."""
        return self.fit_totals(trainer)

    def fit_totals(self, trainer: RunView) -> dict[str, float]:
        """:attr:`totals` with the evaluation or save running now counted up to now."""
        totals = dict(self.totals)
        if self._pause is not None:
            kind, away = self._paused(trainer, self.clock())
            totals[f"{kind}_seconds"] += away
        return totals
