"""Turning the device values hooks receive into host values loggers can write."""

from __future__ import annotations

from typing import Any

import numpy as np


def metric_value(value: Any) -> Any:
    """A metric as a float (device scalars and NumPy numbers included), nested lists, or text.

    Reading a device array waits for the computation that produces it: call this
    only at a logger's own cadence, never once per step.
    """
    try:
        return float(value)
    except (TypeError, ValueError):
        pass
    try:
        # A vector metric (e.g. per-class accuracy): keep it rather than crash the run.
        return np.asarray(value, dtype=np.float64).tolist()
    except (TypeError, ValueError):
        return str(value)
