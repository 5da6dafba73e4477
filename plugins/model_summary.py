"""Model summary at fit start, and the train step's FLOPs (XLA's count) from its first step.

At fit start, on the main process: a table of the model's top-level layers (parameters,
bytes) with totals, printed through the progress display's console when it runs (so the
live bar is not broken), else to stdout. At the first train step of a fit (the hook has
the batch): ``flops_per_step`` from ``flops_of(trainer.lower_train_step(batch))`` and
``flops_per_example`` (per step / global batch size). Others read them here:
``trainer.plugin_manager.get_plugin("model_summary").flops_per_step``. They go once into
the W&B config (``flops``, when the wandb plugin is active) and into the fit summary,
next to the achieved FLOP/s and, on an accelerator of :data:`PEAK_FLOPS`, the MFU.

Cost of the FLOP count: ``jax.jit`` caches the trace and the lowering of a call
signature, and the real first step has the same arguments, so it reuses both (measured:
after ``lower()``, the first call only runs the backend compile). The lowering time
moves from the step into this hook and is added back to ``trainer.compile_seconds``.
Where the lowered module cannot be costed (GPU and TPU backends behind PJRT's C API
raise ``NotImplementedError`` there), the step is compiled here instead and the
compiled executable costed; jit reuses that executable too, so nothing is done twice.
A compiled SPMD module is one device's share: it is scaled by the device count.

XLA counts a multiply-add as 2 FLOPs, and a train step (forward, backward, update) is
about 3x the forward pass.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
from rich.console import Console
from rich.table import Table

from nnx_trainer import hookimpl
from nnx_trainer.summary import flops_from_cost, flops_of, model_summary

from ._progress_parts import plain_rows

if TYPE_CHECKING:
    from nnx_trainer import Trainer

# Dense (no sparsity) peak FLOP/s per chip, by ``device_kind`` substring (matched
# case-insensitively, first match wins, so specific names come first), as
# ``{precision: peak}``. "fp32" is what a float32 matmul runs at under JAX's default
# precision: TF32 tensor cores on A100/H100-class GPUs and bfloat16 passes on TPUs (see
# ``jax.lax.Precision.DEFAULT``); with ``jax_default_matmul_precision="highest"`` the real
# fp32 peak is lower and the MFU shown understates the utilisation.
# Sources: NVIDIA A100 datasheet (BF16 312, TF32 156 TFLOP/s); NVIDIA H100 datasheet (SXM:
# BF16 989.4, TF32 494.7; PCIe: 756, 378; NVL: 835, 418); NVIDIA H200 datasheet (as H100
# SXM); GH200 datasheet (as H100 SXM); NVIDIA L40S, L4, A10 datasheets (dense BF16 362,
# 121, 125; TF32 181, 60, 62.5); Google Cloud TPU system architecture pages (per chip,
# bf16: v3 123, v4 275, v5e 197, v5p 459, v6e 918 TFLOP/s).
_T = 1e12
PEAK_FLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bf16": 756 * _T, "fp32": 378 * _T}),
    ("H100 NVL", {"bf16": 835 * _T, "fp32": 418 * _T}),
    ("H100", {"bf16": 989.4 * _T, "fp32": 494.7 * _T}),
    ("H200", {"bf16": 989.4 * _T, "fp32": 494.7 * _T}),
    ("GH200", {"bf16": 989.4 * _T, "fp32": 494.7 * _T}),
    ("A100", {"bf16": 312 * _T, "fp32": 156 * _T}),
    ("L40S", {"bf16": 362 * _T, "fp32": 181 * _T}),
    ("L4", {"bf16": 121 * _T, "fp32": 60 * _T}),
    ("A10", {"bf16": 125 * _T, "fp32": 62.5 * _T}),
    ("TPU v3", {"bf16": 123 * _T, "fp32": 123 * _T}),
    ("TPU v4", {"bf16": 275 * _T, "fp32": 275 * _T}),
    ("TPU v5 lite", {"bf16": 197 * _T, "fp32": 197 * _T}),  # v5e reports "TPU v5 lite"
    ("TPU v5e", {"bf16": 197 * _T, "fp32": 197 * _T}),
    ("TPU v5p", {"bf16": 459 * _T, "fp32": 459 * _T}),
    ("TPU v5", {"bf16": 459 * _T, "fp32": 459 * _T}),
    ("TPU v6 lite", {"bf16": 918 * _T, "fp32": 918 * _T}),  # v6e (Trillium)
    ("TPU v6e", {"bf16": 918 * _T, "fp32": 918 * _T}),
)


def device_kind() -> str:
    """The first device's kind (``"NVIDIA H100 80GB HBM3"``, ``"TPU v4"``, ``"cpu"``)."""
    return jax.devices()[0].device_kind


def peak_flops(kind: str, precision: str) -> float | None:
    """Dense peak FLOP/s of one ``kind`` device at the Trainer's ``precision``, or None."""
    column = "bf16" if precision == "bf16" else "fp32"
    for key, peaks in PEAK_FLOPS:
        if key.lower() in kind.lower():
            return peaks.get(column)
    return None


def format_count(value: float, unit: str = "FLOP") -> str:
    """``value`` with an SI prefix: ``1.23 GFLOP``."""
    for prefix, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6),
                          ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def format_bytes(value: float) -> str:
    """Bytes in binary units: ``97.5 MiB``."""
    for prefix, scale in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if value >= scale:
            return f"{value / scale:.1f} {prefix}B"
    return f"{int(value)} B"


def step_flops(lowered: Any, num_devices: int) -> tuple[float | None, str]:
    """``(FLOPs of one step for the whole mesh, how they were counted)`` for a lowered step."""
    flops = flops_of(lowered)
    if flops is not None:
        return flops, "lowered"
    try:
        flops = flops_from_cost(lowered.compile().cost_analysis())
    except Exception:  # noqa: BLE001 - an estimate only; never fail the fit for it
        return None, "unavailable"
    if flops is None:
        return None, "unavailable"
    return flops * num_devices, "compiled"  # one device's share of the SPMD module


def counter(trainer: Any) -> ModelSummary | None:
    """The ``model_summary`` plugin of ``trainer``, or None."""
    manager = getattr(trainer, "plugin_manager", None)
    return manager.get_plugin("model_summary") if manager is not None else None


def achieved(trainer: Trainer, steps_per_sec: float) -> dict[str, float]:
    """FLOP/s of the mesh and per device at ``steps_per_sec``, and the MFU where the
    device's peak is known; ``{}`` without the model_summary plugin's FLOP count."""
    flops = getattr(counter(trainer), "flops_per_step", None)
    if not flops or not steps_per_sec > 0:
        return {}
    devices = max(1, int(getattr(trainer.strategy, "num_devices", 1)))
    total = flops * steps_per_sec
    out = {"flops_per_sec": total, "flops_per_sec_per_device": total / devices}
    peak = peak_flops(device_kind(), trainer.precision)
    if peak:
        out["mfu"] = total / devices / peak
    return out


def fit_summary_rows(trainer: Trainer, steps_per_sec: float) -> list[tuple[str, str]]:
    """The fit summary's FLOP rows (none without a FLOP count)."""
    plugin = counter(trainer)
    flops = getattr(plugin, "flops_per_step", None)
    if not flops:
        return []
    rows = [("FLOPs/step", f"{format_count(flops)} "
                           f"({format_count(plugin.flops_per_example)}/example)")]
    rates = achieved(trainer, steps_per_sec)
    if rates:
        rows.append(("FLOP/s", f"{format_count(rates['flops_per_sec'], 'FLOP/s')} "
                               f"({format_count(rates['flops_per_sec_per_device'], 'FLOP/s')}"
                               " per device)"))
    if "mfu" in rates:
        peak = peak_flops(device_kind(), trainer.precision)
        rows.append(("MFU", f"{rates['mfu']:.1%} of {format_count(peak, 'FLOP/s')} "
                            f"({device_kind()}, {trainer.precision})"))
    return rows


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
    """Prints the model summary at fit start; counts the train step's FLOPs at its first step.

    :param enabled: ``False``: print and count nothing.
    :param flops: count the train step's FLOPs at the first step (see the module).
    :param max_rows: layers shown; the rest are folded into one row.
    :param console: where to print (default: the progress plugin's console, else stdout).
    """

    name = "model_summary"

    def __init__(self, enabled: bool = True, flops: bool = True, max_rows: int = 20,
                 console: Console | None = None) -> None:
        self.enabled, self.count_flops, self.max_rows = enabled, flops, max_rows
        self.console = console
        self.summary: dict[str, Any] | None = None  # model_summary() of the latest fit
        self.flops_per_step: float | None = None  # whole mesh, one global batch
        self.flops_per_example: float | None = None
        self.flops_source = "unavailable"  # "lowered", "compiled" or "unavailable"
        self._pending = False  # the FLOPs of this fit are still to be counted
        self._lowering_seconds: float | None = None

    def _console(self, trainer: Trainer) -> tuple[Console, bool]:
        """The console to print on and whether it shows Rich tables (else plain lines)."""
        if self.console is not None:
            return self.console, self.console.is_terminal
        progress = trainer.plugin_manager.get_plugin("progress")
        console = getattr(progress, "console", None)
        if console is None:
            console = Console()
            return console, console.is_terminal
        rich = getattr(progress, "rich_output", None)  # its own terminal/force rule
        return console, rich() if callable(rich) else console.is_terminal

    def _print(self, trainer: Trainer, title: str, rows: list[tuple[str, ...]]) -> None:
        console, rich = self._console(trainer)
        if rich:
            table = Table(title=title, title_justify="left")
            for column, justify in (("layer", "left"), ("parameters", "right"),
                                    ("size", "right")):
                table.add_column(column, justify=justify)
            for row in rows:
                table.add_row(*row, style="bold" if row[0] == "total" else None)
            console.print(table, markup=False)
        else:
            width = max(len(r[1]) for r in rows)  # right-aligned counts, as in the table
            for line in plain_rows(title, [(r[0], f"{r[1]:>{width}}  {r[2]}") for r in rows]):
                console.print(line, markup=False, soft_wrap=True)

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        """Count the model's parameters and print the table (main process only)."""
        self.flops_per_step = self.flops_per_example = None
        self.flops_source, self._lowering_seconds = "unavailable", None
        self._pending = self.enabled and self.count_flops
        if not self.enabled:
            return
        self.summary = model_summary(trainer.state.model)
        if trainer.is_main_process:
            self._print(trainer, "Model summary", summary_rows(self.summary, self.max_rows))

    @hookimpl
    def on_train_batch_start(self, trainer: Trainer, batch: Mapping[str, Any]) -> None:
        """At this fit's first step: lower the step for ``batch`` and count its FLOPs."""
        if not self._pending:
            return
        self._pending = False
        start = time.perf_counter()
        devices = max(1, int(trainer.strategy.num_devices))
        self.flops_per_step, self.flops_source = step_flops(
            trainer.lower_train_step(batch), devices
        )
        self._lowering_seconds = time.perf_counter() - start
        if self.flops_per_step is None:
            return
        self.flops_per_example = self.flops_per_step / trainer.batch_size
        if not trainer.is_main_process:
            return
        console, _ = self._console(trainer)
        console.print(f"train step: {format_count(self.flops_per_step)} "
                      f"({format_count(self.flops_per_example)} per example; XLA's estimate, "
                      "a multiply-add counts 2)", markup=False, soft_wrap=True)
        flops = {"flops": {"per_step": self.flops_per_step,
                           "per_example": self.flops_per_example,
                           "counted_from": self.flops_source}}
        # Known only now, after log_hyperparams: added to what the loggers recorded.
        for name, method in (("wandb", "update_config"), ("metrics_jsonl", "update_hparams")):
            update = getattr(trainer.plugin_manager.get_plugin(name), method, None)
            if callable(update):
                update(trainer, flops)

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer) -> None:
        """The lowering (and any compile) done in our hook is the step's compile time."""
        seconds, self._lowering_seconds = self._lowering_seconds, None
        if seconds is not None and "train" in trainer.compile_seconds:
            trainer.compile_seconds["train"] += seconds
