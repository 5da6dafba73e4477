"""Placeholder: being written."""


class EarlyStopping:
    """Not implemented yet."""

    name = "early_stopping"
