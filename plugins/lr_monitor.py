"""Placeholder: being written."""


class LearningRateMonitor:
    """Not implemented yet."""

    name = "lr_monitor"
