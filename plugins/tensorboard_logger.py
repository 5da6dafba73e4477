"""TensorBoard event files (via tensorboardX): scalars at the log cadence, hparams, resume.

On by default, like Lightning's TensorBoard logger: it writes only under
``run_dir/<subdir>`` (default ``run_dir/tensorboard``) and only once something is
logged, so an instance that never sees a fit writes nothing. ``tensorboardX`` is
imported on the first write, not when the plugin loads.

What is written (view with ``tensorboard --logdir <run_dir>``):

- every scalar of every ``log_metrics`` call as ``add_scalar(name, float, step)``
  (``train/...`` at the log cadence, ``val/...`` and ``test/...`` after evaluations,
  ``epoch``); metrics that are not scalars (per-class vectors) are skipped.
- the hyperparameters, twice: as a ``hparams`` text summary (the full nested JSON)
  and in TensorBoard's HPARAMS plugin format (flattened ``trainer/batch_size``
  keys) so runs can be compared there.

Events are written synchronously with tensorboardX's ``EventsWriter`` and its
summary builders, and the file is flushed after every ``log_metrics`` call (the log
cadence), so after the call returns the data is in the operating system's hands.
``SummaryWriter`` is not used: its ``flush()`` does not drain the queue its
background thread reads from (tensorboardX 2.6.5), so events could sit in memory
for ``flush_secs`` and be lost by a killed process.

The file is closed at the end of every fit/validate/test (``on_run_end``, however it
ended). A later write (a standalone ``test`` after fit) opens a new event file in the
same folder; TensorBoard reads them all as one run. File names carry the process id
and a counter, so two files opened within the same second never overwrite each other.

Each fit's records are its own: a fresh fit (``trainer.global_step == 0``) into a run
directory whose ``<subdir>`` already holds event files moves that folder aside first,
numbered in order (``tensorboard.1`` is the first fit's, ``tensorboard.2`` the next),
so TensorBoard shows each fit as its own run instead of one whose curves fold back.

Resume: a fit resumed from a checkpoint at step ``k > 0`` (``trainer.resumed_from``)
keeps the folder and starts its event file with what ``SummaryWriter(purge_step=k+1)``
writes, a ``SessionLog(START)`` event at step ``k + 1``: TensorBoard then drops the
events at steps ``> k`` that the killed run wrote after its checkpoint (the resumed
run writes those steps again), so each step is shown once; what was logged at step
``k`` itself came before the checkpoint and stays.

Only the main process writes. A write that fails (disk full, read-only) stops the run
with one :class:`~nnx_trainer.write_errors.RunDirWriteError` naming the folder, the step
and the operating system's error; the event file is dropped (closed without its
unwritten tail).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nnx_trainer import hookimpl
from nnx_trainer.plugin_libraries import require_modules
from nnx_trainer.write_errors import RunDirWriteError, writing

if TYPE_CHECKING:
    from nnx_trainer import Trainer

# tensorboardX comes with the [tensorboard] extra. Without it this module does not load,
# and the plugin manager lists the plugin as installed, not active, naming the extra.
require_modules("tensorboardX")

log = logging.getLogger("nnx_trainer.tensorboard")

# Event file names only carry the time in whole seconds: a per-process counter
# keeps two files opened in the same second (fit end, then test) distinct.
_FILE_NUMBERS = itertools.count()


def _import_tensorboardx() -> None:
    """Import tensorboardX without letting it import PyTorch.

    tensorboardX's writer module imports torch when it is installed (to accept torch
    tensors): about 2 s and 190 MiB of resident memory, measured on this project's CI
    machine, for a plugin that writes NumPy scalars and text only. While tensorboardX
    loads, a ``None`` entry in ``sys.modules`` makes ``import torch`` raise
    ImportError, which tensorboardX handles; the entry is removed right after, so a
    later ``import torch`` works as usual. A program that already imported torch
    is left alone.
    """
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        import tensorboardX  # noqa: F401

        return
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        import tensorboardX  # noqa: F401
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]


def _scalar(value: Any) -> float | None:
    """``float(value)`` for scalars (device scalars included), None for anything else."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _drop(writer: Any) -> None:
    """Close the file under a writer whose write failed, losing its unwritten tail.

    ``EventsWriter.close`` flushes first and stops there when that fails, leaving the
    file open: the failing flush would then be retried, and printed, when the file is
    collected. Closing the file itself closes it even though its flush fails.
    """
    with contextlib.suppress(OSError, AttributeError):
        writer._py_recordio_writer._writer.close()


def flatten_hparams(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict to ``{"a/b": value}`` with values TensorBoard's HPARAMS can show.

    Numbers, strings and booleans stay as they are; None is dropped (HPARAMS has no
    null); anything else (lists, objects) becomes its JSON text.
    """
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_hparams(value, prefix=f"{name}/"))
        elif value is None:
            continue
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


class TensorBoardLogger:
    """Writes TensorBoard event files under ``run_dir/<subdir>``.

    :param enabled: write anything at all (False makes the plugin a no-op).
    :param subdir: folder inside ``trainer.run_dir`` for the event files.
    """

    name = "tensorboard"

    def __init__(self, enabled: bool = True, subdir: str = "tensorboard") -> None:
        if not subdir or Path(subdir).is_absolute() or ".." in Path(subdir).parts:
            raise ValueError(f"subdir must be a relative folder inside run_dir, got {subdir!r}")
        self.enabled = enabled
        self.subdir = subdir
        self.writer: Any = None  # the open tensorboardX EventsWriter, if any
        self._file = ""  # its file (for the message of a failed close)

    def log_dir(self, trainer: Trainer) -> Path:
        """Where this trainer's event files go."""
        return Path(trainer.run_dir) / self.subdir

    def _move_aside(self, trainer: Trainer) -> None:
        """An earlier fit's event files go to ``<subdir>.<n>`` (see the module docstring)."""
        log_dir = self.log_dir(trainer)
        if not any(log_dir.glob("events.out.tfevents.*")):
            return
        number = 1
        while log_dir.with_name(f"{log_dir.name}.{number}").exists():
            number += 1
        os.replace(log_dir, log_dir.with_name(f"{log_dir.name}.{number}"))

    def _should_log(self, trainer: Trainer) -> bool:
        return self.enabled and trainer.is_main_process

    def _open(self, trainer: Trainer, purge_step: int | None = None) -> Any:
        """The open event file, created (with its ``file_version`` event) if needed."""
        if self.writer is None:
            _import_tensorboardx()
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto.event_pb2 import Event, SessionLog

            log_dir = self.log_dir(trainer)
            log_dir.mkdir(parents=True, exist_ok=True)
            suffix = f".{os.getpid()}.{next(_FILE_NUMBERS)}"
            self.writer = EventsWriter(str(log_dir / "events"), filename_suffix=suffix)
            self._file = getattr(self.writer, "_file_name", str(log_dir))
            if purge_step is not None:
                # TensorBoard drops earlier events with step >= purge_step on reading this.
                start = SessionLog(status=SessionLog.START)
                self.writer.write_event(
                    Event(wall_time=time.time(), step=purge_step, session_log=start)
                )
        return self.writer

    def _write(self, summary: Any, step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event

        self.writer.write_event(Event(wall_time=time.time(), step=step, summary=summary))

    def close(self) -> None:
        """Flush and close the event file (safe to call twice)."""
        writer, self.writer = self.writer, None
        if writer is not None:
            try:
                writer.close()
            except OSError:
                _drop(writer)
                raise

    @contextlib.contextmanager
    def _writing(self, trainer: Trainer, step: int) -> Iterator[None]:
        """A failed write raises ``RunDirWriteError`` and drops the event file."""
        try:
            with writing(f"the TensorBoard events of step {step}", self.log_dir(trainer),
                         step=step):
                yield
        except RunDirWriteError:
            writer, self.writer = self.writer, None
            if writer is not None:
                _drop(writer)
            raise

    # --------------------------------------------------------------- hooks

    @hookimpl
    def log_hyperparams(self, trainer: Trainer, params: Mapping[str, Any]) -> None:
        """Open the writer for this fit (purging steps a resume will redo), write hparams."""
        if not self._should_log(trainer):
            return
        # A fit starts a new event file: one left open by an earlier fit is closed.
        self.close()
        step = int(trainer.global_step)
        resumed = getattr(trainer, "resumed_from", None) is not None and step > 0
        with self._writing(trainer, step):
            if not resumed:
                self._move_aside(trainer)
            writer = self._open(trainer, purge_step=step + 1 if resumed else None)
            from tensorboardX.summary import hparams, text

            dumped = json.dumps(dict(params), indent=2, default=str)
            # Four-space indent: TensorBoard renders text summaries as Markdown.
            self._write(text("hparams", "\n".join("    " + ln for ln in dumped.splitlines())),
                        step)
            # SummaryWriter.add_hparams would write into a new sub-folder (a separate
            # "run"); these three summaries in this run's own file tie the HPARAMS table
            # to this run's scalars instead, as Lightning does.
            try:
                for summary in hparams(flatten_hparams(params), {}):
                    self._write(summary, step)
            except OSError:
                raise
            except Exception:  # a value HPARAMS cannot take must not stop training
                log.warning("tensorboard: could not write the HPARAMS summary", exc_info=True)
            writer.flush()

    @hookimpl
    def log_metrics(self, trainer: Trainer, metrics: Mapping[str, Any], step: int) -> None:
        """One scalar event per metric at ``step``, then flush."""
        if not self._should_log(trainer):
            return
        _import_tensorboardx()
        from tensorboardX.summary import scalar

        with self._writing(trainer, int(step)):
            writer = self._open(trainer)
            for name, value in metrics.items():
                number = _scalar(value)
                if number is not None:
                    self._write(scalar(str(name), number), int(step))
            writer.flush()

    @hookimpl
    def on_run_end(self, outcome: str) -> None:
        """Close the event file, however the run ended; never masks an exception."""
        try:
            self.close()
        except OSError as exc:  # its unwritten tail is lost
            if outcome != "exception":
                raise RunDirWriteError("the TensorBoard events", self._file, exc) from None
            log.warning("tensorboard: could not close the event file %s: %s", self._file, exc)
        except Exception:
            if outcome != "exception":
                raise
            log.warning("tensorboard: could not close the event file", exc_info=True)
