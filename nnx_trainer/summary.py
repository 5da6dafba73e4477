"""What a model holds: parameter counts and bytes per top-level layer, from its state.

Counted from the ``nnx.State`` (no forward pass) rather than with ``nnx.tabulate``,
which needs an example input and runs the model: the Trainer has the state before
any batch exists, and logs these numbers in ``hparams.json`` at fit start.
``nnx.tabulate`` remains the tool for a per-call table with shapes and outputs.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx


def model_summary(model_state: nnx.State) -> dict[str, Any]:
    """``{"parameters": N, "parameter_bytes": B, "other_state_bytes": S, "layers":
    {top-level name: {"parameters": n, "bytes": b}}}`` for a model's state."""
    layers: dict[str, dict[str, int]] = {}
    totals = {"parameters": 0, "parameter_bytes": 0, "other_state_bytes": 0}
    for path, variable in nnx.to_flat_state(model_state):
        value = variable.get_value() if isinstance(variable, nnx.Variable) else variable
        size = int(np.prod(np.shape(value), dtype=np.int64))
        nbytes = size * itemsize_of(value)
        is_param = isinstance(variable, nnx.Param) or (
            isinstance(variable, nnx.Variable) and issubclass(variable.type, nnx.Param)
        )
        if not is_param:
            totals["other_state_bytes"] += nbytes
            continue
        layer = layers.setdefault(str(path[0]) if path else "", {"parameters": 0, "bytes": 0})
        layer["parameters"] += size
        layer["bytes"] += nbytes
        totals["parameters"] += size
        totals["parameter_bytes"] += nbytes
    return {**totals, "layers": layers}


def itemsize_of(value: Any) -> int:
    """Bytes per element of an array (4 for a Python number)."""
    # Not np.dtype(value.dtype): a typed PRNG key (the key of an nnx.RngStream, which
    # nnx.Dropout(rngs=...) holds) has JAX's extended dtype, which NumPy cannot
    # interpret; JAX's dtypes and NumPy's both carry their itemsize.
    dtype = getattr(value, "dtype", None)
    return int(dtype.itemsize) if dtype is not None else np.dtype(np.float32).itemsize


def flops_of(lowered: jax.stages.Lowered) -> float | None:
    """XLA's FLOP estimate of a lowered computation (None where the backend gives none)."""
    try:
        cost = lowered.cost_analysis()
    except Exception:  # noqa: BLE001 - an estimate: some backends do not provide one
        return None
    return flops_from_cost(cost)


def flops_from_cost(cost: Any) -> float | None:
    """The ``flops`` entry of a ``cost_analysis()`` result (of a lowered or a compiled
    computation), or None where it is missing or negative (not counted)."""
    if isinstance(cost, list | tuple):  # older JAX: one dict per computation
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops >= 0 else None
