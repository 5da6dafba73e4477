"""Throughput: steps/s, examples/s and the data-wait share, logged at the trainer's log cadence.

``perf/examples_per_sec`` counts the Task's examples, whatever they are (images, rows,
sequences): the engine names no modality; the progress display writes the Task's
``example_name`` (``images/s`` for ``ResNetTask``).

Host clock only: the plugin reads ``time.perf_counter`` and the Trainer's own
data-wait counter (time blocked on the Grain pipeline), never a device value, so it
adds no synchronisation. Between two log points the loop is synchronised by the
loggers reading the step's metrics, so a window's wall time is the device's time.
The first window of a fit includes compilation and is reported as such
(``perf/compile_seconds``) instead of as a throughput.

With the train step's FLOP count (the ``model_summary`` plugin), each window also has
``perf/flops_per_sec`` (the whole mesh: FLOPs per step x steps/s),
``perf/flops_per_sec_per_device`` and, where the device's peak is known
(``model_summary.PEAK_FLOPS``), ``perf/mfu`` (model FLOP utilisation, a fraction).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from nnx_trainer import hookimpl

from .model_summary import achieved

if TYPE_CHECKING:
    from nnx_trainer import Trainer


class Throughput:
    """Logs ``perf/steps_per_sec``, ``perf/examples_per_sec``, ``perf/data_wait_share`` and,
    with a FLOP count, ``perf/flops_per_sec`` (``_per_device``) and ``perf/mfu``."""

    name = "throughput"

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._window_start: tuple[float, int, float] | None = None
        self.last: dict[str, float] = {}

    def _mark(self, trainer: Trainer) -> None:
        self._window_start = (time.perf_counter(), trainer.global_step, trainer.data_wait_seconds)

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        """Start the first window (it will contain compilation)."""
        self._window_start = None
        self.last = {}

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer) -> None:
        """At the log cadence, close the window and log its rates as a separate record."""
        if not self.enabled or trainer.global_step % trainer.log_every_n_steps:
            return
        if self._window_start is None:  # first window: compile + first steps
            self._mark(trainer)
            return
        start, first_step, first_wait = self._window_start
        now, steps = time.perf_counter(), trainer.global_step - first_step
        seconds = now - start
        if steps <= 0 or seconds <= 0:
            return
        self.last = {
            "perf/steps_per_sec": steps / seconds,
            "perf/examples_per_sec": steps * trainer.batch_size / seconds,
            "perf/data_wait_share": (trainer.data_wait_seconds - first_wait) / seconds,
        }
        for key, value in achieved(trainer, steps / seconds).items():
            self.last[f"perf/{key}"] = value
        if "train" in trainer.compile_seconds:
            self.last["perf/compile_seconds"] = trainer.compile_seconds["train"]
        trainer.hook.log_metrics(trainer=trainer, metrics=dict(self.last),
                                 step=trainer.global_step)
        self._mark(trainer)

    @hookimpl
    def on_validation_end(self, trainer: Trainer) -> None:
        """Evaluation time is not training time: restart the window after it."""
        if self._window_start is not None:
            self._mark(trainer)
