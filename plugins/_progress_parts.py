"""Parts of the progress display (``rich_progress``): value formatting, bar columns,
tables, where the checkpoints go. Not a plugin."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.progress import Task as RichTask
from rich.table import Table
from rich.text import Text


def checkpoint_dir(trainer: Any) -> Any:
    """The checkpoint plugin's directory for ``trainer``, or None without one."""
    manager = getattr(trainer, "plugin_manager", None)
    plugin = manager.get_plugin("checkpoint") if manager is not None else None
    if plugin is None:
        return None
    locate = getattr(plugin, "checkpoint_dir", None)
    if callable(locate):
        return locate(trainer)
    return getattr(plugin, "directory", None)


def fmt(value: float | None) -> str:
    """Four decimals for ordinary values, scientific notation for huge or tiny ones."""
    if value is None:
        return "--"
    if value == 0 or not math.isfinite(value) or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4f}"
    return f"{value:.4g}"


def to_float(value: Any) -> float | None:
    """A metric as a Python float (this waits for the device), or None if it is not a scalar."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class LossColumn(ProgressColumn):
    """The latest fetched loss; empty for bars without a ``loss`` field (validation)."""

    def render(self, task: RichTask) -> Text:
        if "loss" not in task.fields:
            return Text("")
        return Text(f"loss {fmt(task.fields['loss'])}", style="progress.data.speed")


class RateColumn(ProgressColumn):
    """Items per second: the plugin's ``rate`` field, else Rich's own estimate."""

    def render(self, task: RichTask) -> Text:
        speed = task.fields.get("rate") or task.finished_speed or task.speed
        text = "--" if speed is None else f"{speed:.1f}"
        return Text(f"{text} {task.fields.get('unit', 'steps')}/s", style="progress.data.speed")


def make_progress(console: Console, refresh_per_second: float) -> Progress:
    """The epoch bar's layout: description, bar, done/total, loss, rate, ETA."""
    return Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(),
        MofNCompleteColumn(), LossColumn(), RateColumn(), TimeRemainingColumn(),
        console=console, refresh_per_second=refresh_per_second,
    )


def plain_rows(title: str, rows: list[tuple[str, str]]) -> list[str]:
    """A table as plain lines: the title, then ``  key  value`` aligned."""
    width = max(len(key) for key, _ in rows)
    return [title, *(f"  {key:<{width}}  {value}" for key, value in rows)]


def rows_table(title: str, rows: list[tuple[str, str]]) -> Table:
    """A two-column table (name, value) with a title."""
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("name", style="bold")
    table.add_column("value", justify="right")
    for key, value in rows:
        table.add_row(key, value)
    return table

