"""Placeholder: being written."""


class EMA:
    """Not implemented yet."""

    name = "ema"
