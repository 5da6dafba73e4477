"""Placeholder: being written."""


class TensorBoardLogger:
    """Not implemented yet."""

    name = "tensorboard"
