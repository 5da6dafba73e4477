"""Placeholder: being written."""


class OrbaxCheckpoint:
    """Not implemented yet."""

    name = "checkpoint"
