"""Rich progress display: a live bar per training epoch, validation tables and a fit summary.

On a terminal: a live bar for the running epoch ("Epoch e/E", batches, latest loss,
steps/s, ETA; "compiling the train step…" until the first step is back), a transient bar
while validation runs, a metrics table after each evaluation, a summary table at the end
of a fit that completed, stopped or diverged (a ``NonFiniteError``: then with the
checkpoints refused; rates over training time when a plugin measured it (``training_time``
hook); the last logged train and validation metrics; FLOP/s and MFU with the step's FLOP
count (``log_model_summary`` hook); throughput in the Task's ``example_name``; then the
rows of the ``fit_summary_rows`` hook), the checkpoint directory (``checkpoint_dir`` hook)
and a line per save, "resumed from <checkpoint> at step N", and the Ctrl-C/SIGTERM notice
once, on its own line. Elsewhere (CI logs, pipes): the same as plain lines, no live
display. Colour follows Rich's rules (``NO_COLOR``, ``FORCE_COLOR``). Only the main
process displays; the display closes in ``on_run_end``, however the fit ended.

The loss is a device scalar: read at most ``refresh_per_second`` times a second (live
display only), at epoch end and at fit end, never once per step. While the bar runs,
the engine's "received SIGINT: ..." log record is held back (a filter on the
``nnx_trainer`` logger: it would land inside the bar) and the notice is printed above
the bar instead; without a live display the log record is the notice.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import Progress, TaskID

from nnx_trainer import hookimpl
from nnx_trainer.flops import StepFlops
from nnx_trainer.nonfinite import NonFiniteError

from ._progress_parts import (
    epochs_total,
    fmt,
    make_progress,
    plain_rows,
    rows_table,
    summary_rows,
    to_float,
)

if TYPE_CHECKING:
    from nnx_trainer import RunView

COMPILING = "compiling the train step…"


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

    def __init__(self, refresh_per_second: float = 4, console: Console | None = None,
                 force: bool | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
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
        self._fit_wall_start = time.perf_counter()
        self.last_val_metrics: dict[str, float | None] = {}
        self._example_name = "examples"
        self._compiling = False  # the bar says "compiling" until the first step is back
        self._epoch_title = ""
        self._stop_notice_shown = False
        self._has_checkpoints = False
        self._saved_step: int | None = None
        self._flops: StepFlops | None = None  # the train step's count (log_model_summary)

    # ------------------------------------------------------------- helpers

    @property
    def _live(self) -> bool:
        return self.progress is not None and self.progress.live.is_started

    def rich_output(self) -> bool:
        """Live display and tables (terminal, or forced) rather than plain lines."""
        return self.console.is_terminal if self.force is None else self.force

    def _print(self, renderable: Any) -> None:
        # soft_wrap: a long metrics line stays one line in CI logs; markup off so
        # metric names with brackets print as they are.
        self.console.print(renderable, soft_wrap=True, markup=False)

    def _fetch_loss(self) -> float | None:
        """Read the latest step's loss from the device (waits for that step), once per array."""
        if self._latest_loss is not None and self._latest_loss is not self._fetched_loss:
            self.loss = to_float(self._latest_loss)
            self._fetched_loss = self._latest_loss
        return self.loss

    def _stop_live(self) -> None:
        if self._live:
            self.progress.stop()
        self._train_task = self._val_task = None
        logging.getLogger("nnx_trainer").removeFilter(self._hold_signal_record)

    def _hold_signal_record(self, record: logging.LogRecord) -> bool:
        """Logging filter: keep the engine's signal notice out of the live bar (printed by us)."""
        return not (self._live and record.getMessage().startswith("received SIG"))

    def _stop_notice(self, trainer: RunView) -> None:
        """The Ctrl-C/SIGTERM notice, once, on its own line (live display only; see module)."""
        if self._stop_notice_shown or not getattr(trainer, "preempted", False):
            return
        self._stop_notice_shown = True
        if not self._live:
            return  # the engine's log record said it, on its own line
        name = getattr(trainer, "stop_reason", None) or "a stop signal"
        again = "; press Ctrl-C again to kill the run at once" if name == "SIGINT" else ""
        self._print(f"received {name}: stopping after the current step and saving a "
                    f"checkpoint{again}")

    def _finish_epoch(self, trainer: RunView, epoch: int) -> None:
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
            f"epoch {epoch + 1}/{epochs_total(trainer)}  "
            f"step {trainer.global_step}/{trainer.total_steps}  "
            f"loss {fmt(loss)}  {rate:.1f} steps/s"
        )

    def _summary_rows(self, trainer: RunView,
                      exception: BaseException | None = None) -> list[tuple[str, str]]:
        # fit_seconds is set when the loop returns: after an error, the display's own clock.
        seconds = trainer.fit_seconds or time.perf_counter() - self._fit_wall_start
        return summary_rows(
            trainer, start_step=self._fit_start_step, example_name=self._example_name,
            loss=self._fetch_loss(), val_metrics=self.last_val_metrics, seconds=seconds,
            flops=self._flops, exception=exception)

    # --------------------------------------------------------------- hooks

    @hookimpl
    def on_fit_start(self, trainer: RunView) -> None:
        """Start the live display (terminal) and remember where this run starts."""
        self._stop_live()  # a display left over from an earlier fit that never ended
        self._reset()
        self._enabled = trainer.is_main_process
        if not self._enabled:
            return
        self._fit_start_step = trainer.global_step
        self._fit_wall_start = time.perf_counter()
        self._example_name = getattr(trainer.task, "example_name", None) or "examples"
        if self.rich_output():
            self.progress = make_progress(self.console, self.refresh_per_second)
            self.progress.start()
            logging.getLogger("nnx_trainer").addFilter(self._hold_signal_record)
        resumed = getattr(trainer, "resumed_from", None)
        if resumed is not None and trainer.global_step > 0:
            self._print(
                f"resumed from {resumed} at step {trainer.global_step} (epoch "
                f"{trainer.current_epoch + 1}/{epochs_total(trainer)}, "
                f"{trainer.batch_in_epoch} of its batches done)"
            )
        directory = trainer.hook.checkpoint_dir(trainer=trainer)
        self._has_checkpoints = directory is not None
        if directory is not None:
            self._print(f"checkpoints: {directory}")

    @hookimpl
    def report_console(self) -> Console:
        """Other plugins print on our console, so their lines do not break the live bar."""
        return self.console

    @hookimpl
    def log_model_summary(self, flops: StepFlops | None) -> None:
        """Keep the train step's FLOP count for the summary's FLOP/s and MFU rows."""
        self._flops = flops

    @hookimpl
    def on_train_epoch_start(self, trainer: RunView, epoch: int) -> None:
        """Open the epoch's bar; a resumed epoch starts at the batch it stopped at."""
        if not self._enabled:
            return
        self._epoch_open = True
        self._epoch_title = f"Epoch {epoch + 1}/{epochs_total(trainer)}"
        if "train" not in getattr(trainer, "compile_seconds", {}):
            self._compiling = True  # this fit's first step traces and compiles
            if not self._live:
                self._print(COMPILING)
        self._epoch_mark = self._rate_mark = (time.perf_counter(), trainer.global_step)
        self._last_fetch = self.clock()  # first fetch one interval in, after compilation
        if self._live:
            epoch_base = trainer.global_step - trainer.batch_in_epoch
            total = min(trainer.steps_per_epoch, trainer.total_steps - epoch_base)
            title = f"{self._epoch_title} · {COMPILING}" if self._compiling else self._epoch_title
            self._train_task = self.progress.add_task(
                title,
                total=total, completed=trainer.batch_in_epoch, loss=self.loss, rate=None,
                unit="steps",
            )

    @hookimpl
    def on_train_batch_end(self, trainer: RunView, loss: Any) -> None:
        """Keep the loss on device; read it only when the display is due for a refresh."""
        if not self._enabled:
            return
        self._latest_loss = loss
        self._stop_notice(trainer)
        if self._compiling:  # the step came back from tracing and compiling
            self._compiling = False
            if self._train_task is not None:
                self.progress.update(self._train_task, description=self._epoch_title)
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
    def on_train_epoch_end(self, trainer: RunView, epoch: int) -> None:
        """Print the epoch line; the bar gives way to validation."""
        if self._enabled:
            self._finish_epoch(trainer, epoch)

    @hookimpl
    def on_validation_start(self, trainer: RunView, stage: str) -> None:
        """A transient bar for evaluation batches (the engine does not say how many)."""
        if self._live and trainer.is_main_process:
            self._val_task = self.progress.add_task(stage.capitalize(), total=None, unit="batches")

    @hookimpl
    def on_validation_batch_end(self, trainer: RunView, batch_index: int) -> None:
        """Advance the evaluation bar (no device read)."""
        if self._val_task is not None:
            self.progress.update(self._val_task, completed=batch_index + 1)

    @hookimpl
    def on_validation_end(self, trainer: RunView, stage: str, metrics: Mapping[str, Any]) -> None:
        """Print the evaluation's metrics: a table on a terminal, one line otherwise."""
        if self._val_task is not None:
            self.progress.remove_task(self._val_task)
            self.progress.refresh()  # else printing the table re-draws the removed bar
            self._val_task = None
        if not trainer.is_main_process:
            return
        values = {name: to_float(value) for name, value in sorted(metrics.items())}
        if stage == "validate":
            self.last_val_metrics = values
        if self.rich_output():
            title = f"{stage.capitalize()} metrics, step {trainer.global_step}"
            self._print(rows_table(title, [(k, fmt(v)) for k, v in values.items()]))
        else:
            pairs = "  ".join(f"{k} {fmt(v)}" for k, v in values.items())
            self._print(f"{stage}  step {trainer.global_step}  {pairs}")

    @hookimpl
    def on_save_checkpoint(self, trainer: RunView, step: int, reason: str) -> None:
        """A line per save (when a checkpoint plugin is active); the stop notice first."""
        if not self._enabled:
            return
        self._stop_notice(trainer)
        if self._has_checkpoints and step != self._saved_step:  # a step is written once
            self._saved_step = step
            self._print(f"checkpoint: saving step {step} ({reason})")

    @hookimpl
    def on_run_end(
        self, trainer: RunView, stage: str, outcome: str, exception: BaseException | None
    ) -> None:
        """Close the display however the fit ended; the summary after a fit that finished."""
        if stage != "fit" or not self._enabled:
            return
        self._enabled = False
        if outcome == "exception":
            # Never raise from here: that would replace the exception being reported.
            with contextlib.suppress(Exception):
                was_live = self._live
                self._stop_live()
                self._epoch_open = False
                if was_live:
                    name = type(exception).__name__
                    self._print(f"stopped at step {trainer.global_step}: {name}")
                if isinstance(exception, NonFiniteError):  # a diverged run: say how far
                    self._print_summary(trainer, exception)
            return
        self._stop_notice(trainer)
        self._finish_epoch(trainer, trainer.current_epoch)  # fit stopped inside an epoch
        self._stop_live()
        if outcome == "preempted":
            step, why = trainer.global_step, trainer.stop_reason
            return self._print(f"preempted ({why}) at step {step}: resume with ckpt_path='last'")
        self._print_summary(trainer)

    def _print_summary(self, trainer: RunView, exception: BaseException | None = None) -> None:
        rows = self._summary_rows(trainer, exception)
        if self.rich_output():
            self._print(rows_table("Fit summary", rows))
        else:
            for line in plain_rows("fit summary", rows):
                self._print(line)
