"""Placeholder: being written."""


class Timer:
    """Not implemented yet."""

    name = "timer"
