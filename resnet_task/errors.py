"""The error every data loader raises for data it cannot use (one class, shared by loaders)."""

from __future__ import annotations


class DataError(ValueError):
    """The data a loader was pointed at is missing or malformed; the message says the fix."""
