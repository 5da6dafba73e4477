"""Model summary at fit start, and the train step's FLOPs (XLA's count) from its first step.

At fit start, on the main process: a table of the model's top-level layers (parameters,
bytes) with totals, printed on ``console`` when one is given, else on stdout. At the
first train step of a fit (the hook has the batch): ``flops_per_step`` from
``step_flops(trainer.lower_train_step(batch))`` and ``flops_per_example`` (per step /
global batch size). Both reach every plugin through the
:func:`~nnx_trainer.hookspecs.log_model_summary` hook, called once per fit with the
summary and a :class:`~nnx_trainer.flops.StepFlops`: the loggers add them to the
configuration they recorded (``flops`` in ``hparams.json`` and the W&B config), the
progress display and the ``throughput`` plugin turn them into FLOP/s and, on an
accelerator of :data:`~nnx_trainer.flops.PEAK_FLOPS`, the MFU. No plugin asks this one
for them by name.

Cost of the FLOP count: ``jax.jit`` caches the trace and the lowering of a call
signature, and the real first step has the same arguments, so it reuses both (measured:
after ``lower()``, the first call only runs the backend compile). The lowering time
moves from the step into this hook and is added back to ``trainer.compile_seconds``.
Where the lowered module cannot be costed, the step is compiled here instead
(:func:`~nnx_trainer.flops.step_flops`); jit reuses that executable too.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from nnx_trainer import hookimpl
from nnx_trainer.flops import StepFlops, format_count, step_flops
from nnx_trainer.summary import model_summary

if TYPE_CHECKING:
    from nnx_trainer import RunView


def format_bytes(value: float) -> str:
    """Bytes in binary units: ``97.5 MiB``."""
    for prefix, scale in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if value >= scale:
            return f"{value / scale:.1f} {prefix}B"
    return f"{int(value)} B"


def summary_rows(summary: Mapping[str, Any], max_rows: int = 20) -> list[tuple[str, str, str]]:
    """``(layer, parameters, size)`` rows; layers after the first ``max_rows`` fold into one."""
    layers = list(summary["layers"].items())
    rows = [(name, f"{v['parameters']:,}", format_bytes(v["bytes"]))
            for name, v in layers[:max_rows]]
    rest = layers[max_rows:]
    if rest:
        rows.append((f"… {len(rest)} more", f"{sum(v['parameters'] for _, v in rest):,}",
                     format_bytes(sum(v["bytes"] for _, v in rest))))
    rows.append(("total", f"{summary['parameters']:,}", format_bytes(summary["parameter_bytes"])))
    if summary["other_state_bytes"]:
        rows.append(("other state", "", format_bytes(summary["other_state_bytes"])))
    return rows


class ModelSummary:
    """Prints the model summary at fit start; counts the train step's FLOPs at its first step
    and hands both to every plugin (:func:`~nnx_trainer.hookspecs.log_model_summary`).

    :param enabled: ``False``: print, count and announce nothing.
    :param flops: count the train step's FLOPs at the first step (see the module).
    :param max_rows: layers shown; the rest are folded into one row.
    :param console: where to print (default: the console of the run's display, from the
        :func:`~nnx_trainer.hookspecs.report_console` hook, else stdout).
    """

    name = "model_summary"

    def __init__(self, enabled: bool = True, flops: bool = True, max_rows: int = 20,
                 console: Console | None = None) -> None:
        self.enabled, self.count_flops, self.max_rows = enabled, flops, max_rows
        self.console = console
        self.summary: dict[str, Any] | None = None  # model_summary() of the latest fit
        self.flops: StepFlops | None = None  # this fit's count, once taken
        self._pending = False  # this fit's first step is still to come
        self._lowering_seconds: float | None = None

    @property
    def flops_per_step(self) -> float | None:
        """FLOPs of one step, whole mesh, one global batch (None until counted)."""
        return None if self.flops is None else self.flops.per_step

    @property
    def flops_per_example(self) -> float | None:
        """:attr:`flops_per_step` over the global batch size."""
        return None if self.flops is None else self.flops.per_example

    @property
    def flops_source(self) -> str:
        """``"lowered"``, ``"compiled"`` or ``"unavailable"``."""
        return "unavailable" if self.flops is None else self.flops.counted_from

    def _console(self, trainer: RunView) -> Console:
        """Ours, else the display's (its live bar stays whole), else a new one on stdout."""
        if self.console is not None:
            return self.console
        return trainer.hook.report_console(trainer=trainer) or Console()

    def _print(self, trainer: RunView, title: str, rows: list[tuple[str, ...]]) -> None:
        console = self._console(trainer)
        if console.is_terminal:
            table = Table(title=title, title_justify="left")
            for column, justify in (("layer", "left"), ("parameters", "right"),
                                    ("size", "right")):
                table.add_column(column, justify=justify)
            for row in rows:
                table.add_row(*row, style="bold" if row[0] == "total" else None)
            console.print(table, markup=False)
        else:  # plain lines: the title, then the rows, counts right-aligned as in the table
            key_width, count_width = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
            console.print(title, markup=False, soft_wrap=True)
            for row in rows:
                console.print(f"  {row[0]:<{key_width}}  {row[1]:>{count_width}}  {row[2]}",
                              markup=False, soft_wrap=True)

    @hookimpl
    def on_fit_start(self, trainer: RunView) -> None:
        """Count the model's parameters and print the table (main process only)."""
        self.flops, self._lowering_seconds = None, None
        self._pending = self.enabled
        if not self.enabled:
            return
        self.summary = model_summary(trainer.state.model)
        if trainer.is_main_process:
            self._print(trainer, "Model summary", summary_rows(self.summary, self.max_rows))

    @hookimpl
    def on_train_batch_start(self, trainer: RunView, batch: Mapping[str, Any]) -> None:
        """At this fit's first step: count the step's FLOPs for ``batch``, then hand the
        summary and the count to every plugin (``log_model_summary``)."""
        if not self._pending:
            return
        self._pending = False
        if self.count_flops:
            self.flops = self._count(trainer, batch)
        if self.flops is not None and trainer.is_main_process:
            self._console(trainer).print(
                f"train step: {format_count(self.flops.per_step)} "
                f"({format_count(self.flops.per_example)} per example; XLA's estimate, "
                "a multiply-add counts 2)", markup=False, soft_wrap=True)
        # Known only now, after log_hyperparams: the loggers add it to what they recorded.
        trainer.hook.log_model_summary(trainer=trainer, summary=self.summary, flops=self.flops)

    def _count(self, trainer: RunView, batch: Mapping[str, Any]) -> StepFlops | None:
        start = time.perf_counter()
        devices = max(1, int(trainer.strategy.num_devices))
        per_step, source = step_flops(trainer.lower_train_step(batch), devices)
        self._lowering_seconds = time.perf_counter() - start
        if per_step is None:
            return None
        return StepFlops(per_step=per_step, per_example=per_step / trainer.batch_size,
                         counted_from=source)

    @hookimpl
    def on_train_batch_end(self, trainer: RunView) -> None:
        """The lowering (and any compile) done in our hook is the step's compile time."""
        seconds, self._lowering_seconds = self._lowering_seconds, None
        if seconds is not None and "train" in trainer.compile_seconds:
            trainer.compile_seconds["train"] += seconds
