"""Parts of the progress display (``rich_progress``): value formatting, bar columns,
tables, the fit summary's rows. Not a plugin."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
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

from nnx_trainer import flops as flops_lib
from nnx_trainer.flops import StepFlops, format_count

if TYPE_CHECKING:
    from nnx_trainer import RunView


def epochs_total(trainer: Any) -> int:
    """The epochs the fit will run: max_steps may end it before max_epochs."""
    if trainer.steps_per_epoch:
        return max(1, math.ceil(trainer.total_steps / trainer.steps_per_epoch))
    return trainer.max_epochs


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


def metric_text(value: Any) -> str:
    """A metric for display: an integer (a count) as it is, other numbers by :func:`fmt`.

    Reads the value from the device (``np.asarray``: one transfer, however it is typed).
    """
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        return fmt(None)
    if array.ndim == 0 and np.issubdtype(array.dtype, np.integer):
        return str(int(array))
    return fmt(to_float(array))


def train_metric_rows(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The last logged value of each train metric but the loss (the summary shows the
    last step's loss itself), e.g. ``train/accuracy``, ``train/skipped_images``."""
    return [(name, metric_text(value)) for name, value in sorted(metrics.items())
            if name.startswith("train/") and name != "train/loss"]


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



def flop_rows(trainer: RunView, flops: StepFlops | None,
              steps_per_sec: float) -> list[tuple[str, str]]:
    """The fit summary's FLOP rows: per step, FLOP/s and, where the device's peak is
    known, the MFU (none without a FLOP count)."""
    if flops is None:
        return []
    precision = trainer.precision
    rows = [("FLOPs/step", f"{format_count(flops.per_step)} "
                           f"({format_count(flops.per_example)}/example)")]
    rates = flops_lib.achieved(flops.per_step, steps_per_sec, trainer.strategy.num_devices,
                               precision)
    if rates:
        rows.append(("FLOP/s", f"{format_count(rates['flops_per_sec'], 'FLOP/s')} "
                               f"({format_count(rates['flops_per_sec_per_device'], 'FLOP/s')}"
                               " per device)"))
    if "mfu" in rates:
        kind = flops_lib.device_kind()
        peak = flops_lib.peak_flops(kind, precision)
        rows.append(("MFU", f"{rates['mfu']:.1%} of {format_count(peak, 'FLOP/s')} "
                            f"({kind}, {precision})"))
    return rows


def refused_saves(since_step: int, exception: BaseException | None) -> list[int]:
    """The step whose checkpoint was refused when a NaN/Inf state ended the fit (a
    ``NonFiniteError``'s ``refused_save``, from the guard or the saver), if in this fit. A
    plugin that goes on after refusing says so itself (the ``fit_summary_rows`` hook)."""
    step = getattr(exception, "refused_save", None)
    return [step] if step is not None and step >= since_step else []


def summary_rows(trainer: RunView, *, start_step: int, example_name: str, loss: float | None,
                 val_metrics: Mapping[str, float | None], seconds: float,
                 flops: StepFlops | None, exception: BaseException | None = None,
                 ) -> list[tuple[str, str]]:
    """The fit summary's rows. Rates are over training time when a plugin measured it
    (the ``training_time`` hook: no compilation, evaluation or saves in them), else over
    ``seconds``; with the step's FLOP count, FLOP/s and MFU rows; then the rows other
    plugins contribute (the ``fit_summary_rows`` hook)."""
    steps = trainer.global_step - start_step  # this run only (resume-aware)
    rate = steps / seconds if seconds > 0 else 0.0
    wall = f"{seconds:.1f} s"
    totals = trainer.hook.training_time(trainer=trainer) or {}
    if totals.get("train_steps"):
        rate = totals["train_steps"] / totals["train_seconds"]
    if totals.get("val_seconds") or totals.get("checkpoint_seconds"):  # time away from training
        wall += (f" (validation {totals['val_seconds']:.1f} s, checkpoints "
                 f"{totals['checkpoint_seconds']:.1f} s)")
    wait_share = trainer.data_wait_seconds / seconds if seconds > 0 else 0.0
    compile_s = ", ".join(f"{k} {v:.2f} s" for k, v in trainer.compile_seconds.items())
    resumed = f" ({steps} this run)" if start_step else ""
    epochs = str(trainer.current_epoch)
    if trainer.batch_in_epoch:  # stopped inside an epoch (max_steps, should_stop, an error)
        epochs += f" + {trainer.batch_in_epoch}/{trainer.steps_per_epoch} batches"
    rows = [
        ("steps", f"{trainer.global_step}{resumed}"),
        ("epochs", epochs),
        ("wall time", wall),
        ("steps/s", f"{rate:.2f}"),
        (f"{example_name}/s", f"{rate * trainer.batch_size:.1f}"),
        *flop_rows(trainer, flops, rate),  # FLOPs/step, FLOP/s, MFU (with a FLOP count)
        ("data wait", f"{wait_share:.1%} ({trainer.data_wait_seconds:.2f} s)"),
        ("compile", compile_s or "--"),
        ("last train loss", fmt(loss)),
        *train_metric_rows(getattr(trainer, "callback_metrics", {})),  # as last logged
    ]
    rows += [(name, fmt(value)) for name, value in val_metrics.items()]
    refused = refused_saves(start_step, exception)
    if refused:
        which = f"step{'s' if len(refused) > 1 else ''} {', '.join(map(str, refused))}"
        rows.append(("saves refused", f"{len(refused)} ({which}: NaN/Inf in the training "
                                      "state)"))
    for contributed in trainer.hook.fit_summary_rows(trainer=trainer, exception=exception):
        rows += [(str(name), str(value)) for name, value in contributed or ()]
    if trainer.stop_reason:
        rows.append(("stop reason", str(trainer.stop_reason)))
    return rows
