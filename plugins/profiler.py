"""Profile a range of training steps with the JAX profiler (XLA's trace, for TensorBoard/xprof).

``Trainer(plugins=[Profiler(steps="10-20")])`` (CLI: ``--plugins.profiler.steps 10-20``)
starts ``jax.profiler.start_trace`` before step 10 and stops it after step 20: steps are
the 0-based global step indices the hooks see, both ends included. ``steps`` is also a
single step (``12`` or ``"12"``) or a pair (``(10, 20)``, ``[10, 20]``). Each profiled
step is wrapped in ``jax.profiler.StepTraceAnnotation("train", step_num=step)``, so the
profile tools show one row per step. The trace is written under ``dir`` (default
``run_dir/profile``) as ``plugins/profile/<timestamp>/<host>.xplane.pb``; open it with
``tensorboard --logdir run_dir/profile`` (needs ``tensorboard-plugin-profile``) or xprof;
``perfetto_trace=True`` also writes a ``.trace.json.gz`` for https://ui.perfetto.dev.

Before stopping, the plugin waits for the last profiled step to finish on the device
(its loss), so the trace holds its device work. A fit that ends (or fails) inside the
range stops the trace in ``on_run_end``, so none is ever left running. Early steps
include compilation (step 0 traces and compiles): profile later steps for steady state.

Only the main process traces, unless ``all_processes=True`` (then each process writes
into ``dir/process_<i>``).

Opt-in: installing the package registers nothing (``from_environment`` returns None).
Pass a configured instance or request it by name (``plugins=["profiler"]``: steps 10-20).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax

from nnx_trainer import hookimpl

if TYPE_CHECKING:
    from nnx_trainer import RunView

log = logging.getLogger("nnx_trainer.profiler")

_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_steps(steps: Any) -> tuple[int, int]:
    """``(first, last)`` (inclusive) from ``"10-20"``, ``"12"``, ``12`` or ``(10, 20)``;
    a ValueError names the accepted forms."""
    forms = "a range '10-20', a step 12, or a pair (10, 20) of 0-based steps"
    if isinstance(steps, bool):
        raise ValueError(f"steps must be {forms}; got {steps!r}")
    if isinstance(steps, int):
        first = last = steps
    elif isinstance(steps, str):
        match = _RANGE.match(steps)
        if match is None:
            raise ValueError(f"steps must be {forms}; got {steps!r}")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
    elif isinstance(steps, Sequence) and len(steps) == 2 and all(
        isinstance(s, int) and not isinstance(s, bool) for s in steps
    ):
        first, last = steps
    else:
        raise ValueError(f"steps must be {forms}; got {steps!r}")
    if first < 0:
        raise ValueError(f"steps must be >= 0 (0-based global steps); got {steps!r}")
    if last < first:
        raise ValueError(f"steps {steps!r}: the last step ({last}) is before the first "
                         f"({first}); write the range first-last, e.g. '{last}-{first}'")
    return first, last


class Profiler:
    """Traces training steps ``first..last`` with the JAX profiler (see the module).

    :param steps: the steps to trace: ``"10-20"``, ``12``, ``(10, 20)``.
    :param dir: trace directory (default ``run_dir/profile``).
    :param all_processes: trace in every process, not only the main one.
    :param perfetto_trace: also write a Perfetto ``.trace.json.gz``.
    """

    name = "profiler"
    activation = (
        "opt-in: pass Trainer(plugins=[Profiler(steps='10-20')]), or request it by name "
        "(plugins=['profiler'], CLI --plugins.profiler.steps 10-20)"
    )

    @classmethod
    def from_environment(cls) -> Profiler | None:
        """Never on by itself: profiling slows the profiled steps and writes large files."""
        return None

    def __init__(self, steps: str | int | tuple[int, int] | list[int] = "10-20",
                 dir: str | os.PathLike | None = None, all_processes: bool = False,
                 perfetto_trace: bool = False) -> None:
        self.first, self.last = parse_steps(steps)
        self.dir = dir
        self.all_processes = all_processes
        self.perfetto_trace = perfetto_trace
        self.trace_dir: Path | None = None  # where the latest fit's trace goes
        self.traced_steps: list[int] = []  # the steps annotated in the latest fit's trace
        self._tracing = False
        self._done = False  # this fit's range is traced (or could not be)
        self._annotation: Any = None

    def _traces_here(self, trainer: RunView) -> bool:
        return self.all_processes or trainer.is_main_process

    def _stop(self) -> None:
        """Close the open step annotation and stop the trace (safe to call twice)."""
        annotation, self._annotation = self._annotation, None
        if annotation is not None:
            annotation.__exit__(None, None, None)
        if self._tracing:
            self._tracing, self._done = False, True
            jax.profiler.stop_trace()
            log.info("profiler: steps %s traced into %s (tensorboard --logdir %s)",
                     _span(self.traced_steps), self.trace_dir, self.trace_dir)

    @hookimpl
    def on_fit_start(self, trainer: RunView) -> None:
        """Forget the previous fit; choose this fit's trace directory."""
        self._stop()  # a trace left open by an earlier fit that never reached its end
        self._done, self.traced_steps = False, []
        root = Path(self.dir) if self.dir is not None else Path(trainer.run_dir) / "profile"
        if self.all_processes and trainer.strategy.process_count > 1:
            root = root / f"process_{trainer.strategy.process_index}"
        self.trace_dir = root

    @hookimpl
    def on_train_batch_start(self, trainer: RunView, step: int) -> None:
        """Start the trace at the first step of the range; open this step's annotation."""
        if self._done or not self.first <= step <= self.last or not self._traces_here(trainer):
            return
        if not self._tracing:
            self.trace_dir.mkdir(parents=True, exist_ok=True)
            try:
                jax.profiler.start_trace(str(self.trace_dir),
                                         create_perfetto_trace=self.perfetto_trace)
            except RuntimeError as exc:  # e.g. the user's own trace is already running
                log.warning("profiler: could not start a trace (%s); not profiling", exc)
                self._done = True
                return
            self._tracing = True
        self._annotation = jax.profiler.StepTraceAnnotation("train", step_num=step)
        self._annotation.__enter__()
        self.traced_steps.append(step)

    @hookimpl
    def on_train_batch_end(self, trainer: RunView, step: int, loss: Any) -> None:
        """Close the step's annotation; after the range's last step, wait for it and stop."""
        if self._annotation is not None:
            annotation, self._annotation = self._annotation, None
            annotation.__exit__(None, None, None)
        if self._tracing and step >= self.last:
            jax.block_until_ready(loss)  # the last step's device work belongs in the trace
            self._stop()

    @hookimpl
    def on_run_end(self, trainer: RunView) -> None:
        """However the run ended, no trace stays running."""
        with contextlib.suppress(Exception):  # never replace the exception being reported
            self._stop()


def _span(steps: list[int]) -> str:
    return f"{steps[0]}-{steps[-1]}" if steps else "(none)"
