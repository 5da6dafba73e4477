"""Rich progress display: a live bar per training epoch, validation tables and a fit summary.

On a terminal: a live :class:`rich.progress.Progress` bar for the running epoch
("Epoch e/E", batches done/total, latest loss, steps/s, ETA), a transient bar while
validation runs, a table of metrics after each evaluation and a summary table at
the end of a successful fit (steps, epochs, wall time, throughput, data-wait share,
compile time, last loss and validation metrics). Elsewhere (CI logs, pipes): no
live display, just one plain line per epoch and per evaluation and the summary as
``key  value`` lines. Colour follows Rich's rules (``NO_COLOR``, ``FORCE_COLOR``).

The loss given to ``on_train_batch_end`` is a device scalar; reading it waits for
the step. The plugin reads it at most ``refresh_per_second`` times a second (live
display only), at epoch end and at fit end, never once per step. Only the main
process displays anything.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.progress import Task as RichTask
from rich.table import Table
from rich.text import Text

from nnx_trainer import hookimpl

if TYPE_CHECKING:
    from nnx_trainer import Trainer


def _fmt(value: float | None) -> str:
    """Four decimals for ordinary values, scientific notation for huge or tiny ones."""
    if value is None:
        return "--"
    if value == 0 or not math.isfinite(value) or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4f}"
    return f"{value:.4g}"


def _to_float(value: Any) -> float | None:
    """A metric as a Python float (this waits for the device), or None if it is not a scalar."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


class _LossColumn(ProgressColumn):
    """The latest fetched loss; empty for bars without a ``loss`` field (validation)."""

    def render(self, task: RichTask) -> Text:
        if "loss" not in task.fields:
            return Text("")
        return Text(f"loss {_fmt(task.fields['loss'])}", style="progress.data.speed")


class _RateColumn(ProgressColumn):
    """Items per second: the plugin's ``rate`` field, else Rich's own estimate."""

    def render(self, task: RichTask) -> Text:
        speed = task.fields.get("rate") or task.finished_speed or task.speed
        text = "--" if speed is None else f"{speed:.1f}"
        return Text(f"{text} {task.fields.get('unit', 'steps')}/s", style="progress.data.speed")


class RichProgress:
    """Progress bars, evaluation tables and a fit summary on a Rich console.

    :param refresh_per_second: live display refresh rate; the loss is fetched from
        the device at most this often.
    :param console: where to print (default: a new ``Console()`` on stdout).
    :param force: ``True``: live display even when the console is not a terminal;
        ``False``: never (plain lines only); ``None``: live only on a terminal.
    :param clock: time source of the fetch cadence (tests inject a fake one).
    """

    name = "progress"

    def __init__(
        self,
        refresh_per_second: float = 4,
        console: Console | None = None,
        force: bool | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not refresh_per_second > 0:
            raise ValueError(f"refresh_per_second must be positive, got {refresh_per_second!r}")
        self.refresh_per_second = float(refresh_per_second)
        # force=True without a console: make Rich emit the live display anyway.
        self.console = console or Console(force_terminal=True if force else None)
        self.force = force
        self.clock = clock
        self.progress: Progress | None = None
        self._reset()

    def _reset(self) -> None:
        """Forget everything about the previous run (one instance can serve several fits)."""
        self._enabled = False
        self._train_task: TaskID | None = None
        self._val_task: TaskID | None = None
        self._latest_loss: Any = None  # device scalar of the latest step, not yet fetched
        self._fetched_loss: Any = None  # the device scalar that ``loss`` was read from
        self.loss: float | None = None  # latest fetched loss, a Python float
        self._last_fetch = -math.inf
        self._epoch_open = False
        self._epoch_mark = (0.0, 0)  # (perf_counter, global_step) at epoch start
        self._rate_mark = (0.0, 0)  # (perf_counter, global_step) at the latest loss fetch
        self._fit_start_step = 0
        self.last_val_metrics: dict[str, float | None] = {}

    # ------------------------------------------------------------- helpers

    @property
    def _live(self) -> bool:
        return self.progress is not None and self.progress.live.is_started

    def _rich_output(self) -> bool:
        """Live display and tables (terminal, or forced) rather than plain lines."""
        return self.console.is_terminal if self.force is None else self.force

    def _print(self, renderable: Any) -> None:
        # soft_wrap: a long metrics line stays one line in CI logs; markup off so
        # metric names with brackets print as they are.
        self.console.print(renderable, soft_wrap=True, markup=False)

    def _fetch_loss(self) -> float | None:
        """Read the latest step's loss from the device (waits for that step), once per array."""
        if self._latest_loss is not None and self._latest_loss is not self._fetched_loss:
            self.loss = _to_float(self._latest_loss)
            self._fetched_loss = self._latest_loss
        return self.loss

    @staticmethod
    def _epochs_total(trainer: Trainer) -> int:
        # max_steps may end the fit before max_epochs: show the epochs that will run.
        if trainer.steps_per_epoch:
            return max(1, math.ceil(trainer.total_steps / trainer.steps_per_epoch))
        return trainer.max_epochs

    def _stop_live(self) -> None:
        if self._live:
            self.progress.stop()
        self._train_task = self._val_task = None

    def _finish_epoch(self, trainer: Trainer, epoch: int) -> None:
        """Final bar state and the epoch line (also for an epoch cut short by a stop)."""
        if not self._epoch_open:
            return
        self._epoch_open = False
        loss = self._fetch_loss()  # one sync per epoch: the rate below then counts finished steps
        elapsed = time.perf_counter() - self._epoch_mark[0]
        rate = (trainer.global_step - self._epoch_mark[1]) / elapsed if elapsed > 0 else 0.0
        if self._live and self._train_task is not None:
            self.progress.update(
                self._train_task, completed=trainer.batch_in_epoch, loss=loss, rate=rate
            )
            self.progress.refresh()  # the finished bar is drawn at least once
            self.progress.remove_task(self._train_task)
            self.progress.refresh()  # else printing the line re-draws the removed bar
            self._train_task = None
        self._print(
            f"epoch {epoch + 1}/{self._epochs_total(trainer)}  "
            f"step {trainer.global_step}/{trainer.total_steps}  "
            f"loss {_fmt(loss)}  {rate:.1f} steps/s"
        )

    def _rows_table(self, title: str, rows: list[tuple[str, str]]) -> Table:
        table = Table(title=title, title_justify="left", show_header=False)
        table.add_column("name", style="bold")
        table.add_column("value", justify="right")
        for key, value in rows:
            table.add_row(key, value)
        return table

    def _summary_rows(self, trainer: Trainer) -> list[tuple[str, str]]:
        seconds = trainer.fit_seconds
        steps = trainer.global_step - self._fit_start_step  # this run only (resume-aware)
        rate = steps / seconds if seconds > 0 else 0.0
        wait_share = trainer.data_wait_seconds / seconds if seconds > 0 else 0.0
        compile_s = ", ".join(f"{k} {v:.2f} s" for k, v in trainer.compile_seconds.items())
        resumed = f" ({steps} this run)" if self._fit_start_step else ""
        epochs = str(trainer.current_epoch)
        if trainer.batch_in_epoch:  # stopped inside an epoch (max_steps, should_stop)
            epochs += f" + {trainer.batch_in_epoch}/{trainer.steps_per_epoch} batches"
        rows = [
            ("steps", f"{trainer.global_step}{resumed}"),
            ("epochs", epochs),
            ("wall time", f"{seconds:.1f} s"),
            ("steps/s", f"{rate:.2f}"),
            ("images/s", f"{rate * trainer.batch_size:.1f}"),
            ("data wait", f"{wait_share:.1%} ({trainer.data_wait_seconds:.2f} s)"),
            ("compile", compile_s or "--"),
            ("last train loss", _fmt(self._fetch_loss())),
        ]
        rows += [(name, _fmt(value)) for name, value in self.last_val_metrics.items()]
        if trainer.stop_reason:
            rows.append(("stop reason", str(trainer.stop_reason)))
        return rows

    # --------------------------------------------------------------- hooks

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        """Start the live display (terminal) and remember where this run starts."""
        self._stop_live()  # a display left over from an earlier fit that never ended
        self._reset()
        self._enabled = trainer.is_main_process
        if not self._enabled:
            return
        self._fit_start_step = trainer.global_step
        if self._rich_output():
            self.progress = Progress(
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                _LossColumn(),
                _RateColumn(),
                TimeRemainingColumn(),
                console=self.console,
                refresh_per_second=self.refresh_per_second,
            )
            self.progress.start()

    @hookimpl
    def on_train_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Open the epoch's bar; a resumed epoch starts at the batch it stopped at."""
        if not self._enabled:
            return
        self._epoch_open = True
        self._epoch_mark = self._rate_mark = (time.perf_counter(), trainer.global_step)
        self._last_fetch = self.clock()  # first fetch one interval in, after compilation
        if self._live:
            epoch_base = trainer.global_step - trainer.batch_in_epoch
            total = min(trainer.steps_per_epoch, trainer.total_steps - epoch_base)
            self._train_task = self.progress.add_task(
                f"Epoch {epoch + 1}/{self._epochs_total(trainer)}",
                total=total, completed=trainer.batch_in_epoch, loss=self.loss, rate=None,
                unit="steps",
            )

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer, loss: Any) -> None:
        """Keep the loss on device; read it only when the display is due for a refresh."""
        if not self._enabled:
            return
        self._latest_loss = loss
        if self._train_task is None:
            return  # plain mode: the loss is read once, at epoch end
        now = self.clock()
        if now - self._last_fetch < 1.0 / self.refresh_per_second:
            return
        self._last_fetch = now
        loss_value = self._fetch_loss()
        # The fetch waited for this step, so the steps since the previous fetch have
        # really finished: their count over the wall time between is the device rate.
        wall, step = time.perf_counter(), trainer.global_step
        mark_wall, mark_step = self._rate_mark
        rate = (step - mark_step) / (wall - mark_wall) if wall > mark_wall else None
        self._rate_mark = (wall, step)
        self.progress.update(
            self._train_task, completed=trainer.batch_in_epoch, loss=loss_value, rate=rate
        )

    @hookimpl
    def on_train_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        """Print the epoch line; the bar gives way to validation."""
        if self._enabled:
            self._finish_epoch(trainer, epoch)

    @hookimpl
    def on_validation_start(self, trainer: Trainer, stage: str) -> None:
        """A transient bar for evaluation batches (the engine does not say how many)."""
        if self._live and trainer.is_main_process:
            self._val_task = self.progress.add_task(stage.capitalize(), total=None, unit="batches")

    @hookimpl
    def on_validation_batch_end(self, trainer: Trainer, batch_index: int) -> None:
        """Advance the evaluation bar (no device read)."""
        if self._val_task is not None:
            self.progress.update(self._val_task, completed=batch_index + 1)

    @hookimpl
    def on_validation_end(self, trainer: Trainer, stage: str, metrics: Mapping[str, Any]) -> None:
        """Print the evaluation's metrics: a table on a terminal, one line otherwise."""
        if self._val_task is not None:
            self.progress.remove_task(self._val_task)
            self.progress.refresh()  # else printing the table re-draws the removed bar
            self._val_task = None
        if not trainer.is_main_process:
            return
        values = {name: _to_float(value) for name, value in sorted(metrics.items())}
        if stage == "validate":
            self.last_val_metrics = values
        if self._rich_output():
            title = f"{stage.capitalize()} metrics, step {trainer.global_step}"
            self._print(self._rows_table(title, [(k, _fmt(v)) for k, v in values.items()]))
        else:
            pairs = "  ".join(f"{k} {_fmt(v)}" for k, v in values.items())
            self._print(f"{stage}  step {trainer.global_step}  {pairs}")

    @hookimpl
    def on_save_checkpoint(self, trainer: Trainer, reason: str) -> None:
        """A preempted fit gets no ``on_fit_end``: close the display here instead."""
        if reason != "preemption" or not self._enabled:
            return
        self._finish_epoch(trainer, trainer.current_epoch)
        self._stop_live()
        self._print(f"preempted ({trainer.stop_reason}) at step {trainer.global_step}")

    @hookimpl
    def on_fit_end(self, trainer: Trainer) -> None:
        """Close the display and print the fit summary."""
        if not self._enabled:
            return
        self._finish_epoch(trainer, trainer.current_epoch)  # fit stopped inside an epoch
        self._stop_live()
        rows = self._summary_rows(trainer)
        if self._rich_output():
            self._print(self._rows_table("Fit summary", rows))
        else:
            self._print("fit summary")
            width = max(len(key) for key, _ in rows)
            for key, value in rows:
                self._print(f"  {key:<{width}}  {value}")

    @hookimpl
    def on_exception(self, trainer: Trainer, exception: BaseException) -> None:
        """Stop the live display so the traceback prints on a clean terminal."""
        # Never raise from here: that would replace the exception being reported.
        with contextlib.suppress(Exception):
            was_live = self._live
            self._stop_live()
            self._epoch_open = False
            if was_live:
                self._print(f"stopped at step {trainer.global_step}: {type(exception).__name__}")
