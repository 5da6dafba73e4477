"""The train step's FLOPs: the count every plugin receives, devices' peaks, achieved rates.

The ``model_summary`` plugin counts the FLOPs of the train step and hands them to every
plugin through the :func:`~nnx_trainer.hookspecs.log_model_summary` hook as a
:class:`StepFlops`; the loggers record it, and the displays turn it into FLOP/s and MFU
with :func:`achieved`. This module is what those plugins share, so none of them imports
another.

XLA counts a multiply-add as 2 FLOPs, and a train step (forward, backward, update) is
about 3x the forward pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from nnx_trainer.summary import flops_from_cost, flops_of

__all__ = ["PEAK_FLOPS", "StepFlops", "achieved", "device_kind", "format_count",
           "peak_flops", "step_flops"]


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """XLA's FLOP count of one train step.

    :param per_step: FLOPs of one step over one global batch, the whole mesh.
    :param per_example: ``per_step`` / the global batch size.
    :param counted_from: ``"lowered"`` (the lowered module) or ``"compiled"`` (the compiled
        executable, one device's share scaled by the device count).
    """

    per_step: float
    per_example: float
    counted_from: str

    def as_dict(self) -> dict[str, Any]:
        """``{"per_step", "per_example", "counted_from"}``, as the loggers record it."""
        return dataclasses.asdict(self)


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


def step_flops(lowered: Any, num_devices: int) -> tuple[float | None, str]:
    """``(FLOPs of one step for the whole mesh, how they were counted)`` for a lowered step.

    Where the lowered module cannot be costed (GPU and TPU backends behind PJRT's C API
    raise ``NotImplementedError`` there), the step is compiled and the executable costed:
    jit reuses that executable for the real step, so nothing is compiled twice.
    """
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


def achieved(flops_per_step: float | None, steps_per_sec: float, num_devices: int,
             precision: str) -> dict[str, float]:
    """FLOP/s of the mesh and per device at ``steps_per_sec``, and the MFU where the
    device's peak is known (:data:`PEAK_FLOPS`); ``{}`` without a FLOP count or a rate."""
    if not flops_per_step or not steps_per_sec > 0:
        return {}
    devices = max(1, int(num_devices))
    total = flops_per_step * steps_per_sec
    out = {"flops_per_sec": total, "flops_per_sec_per_device": total / devices}
    peak = peak_flops(device_kind(), precision)
    if peak:
        out["mfu"] = total / devices / peak
    return out
