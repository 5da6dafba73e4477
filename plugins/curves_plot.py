"""Placeholder: being written."""


class CurvesPlot:
    """Not implemented yet."""

    name = "curves_plot"
