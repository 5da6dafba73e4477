"""A checkpoint write that fails ends the run at once, with one error, and never hangs.

Not a plugin: the save side of ``plugins/orbax_checkpoint.py`` that deals with a disk
that fills up or turns read-only (the design's reliability rule: a failing disk ends the
run within seconds with one clear error naming path, step and OS error, and no
background thread keeps the process alive). What Orbax 0.12 does by itself, and why
each piece here exists:

- **Hang.** With ``AsyncOptions.create_directories_asynchronously`` (Orbax's default) the
  step directory is made in a background thread and the writers wait for its "created"
  signal in ``signaling_client.blocking_key_value_get`` (for the coordination timeout).
  When the ``mkdir`` fails (read-only disk) the signal is never sent: those non-daemon
  threads wait on, and the interpreter, which joins them at exit, never ends. The
  manager is therefore opened with the directories made synchronously (``OPTIONS``):
  a few ``mkdir`` calls in the loop's save, which now fails right there, in the main
  thread, with nothing left waiting. Closing after a failure gives the failed save's
  writer threads ``JOIN_SECONDS`` to end; as a last resort, when some are stuck for
  good, the process exits (``os._exit(1)``) ``EXIT_GRACE_SECONDS`` after its main
  thread ended instead of hanging (:func:`_exit_if_stuck`).
- **Late.** An asynchronous save that fails in the background (disk full while the
  arrays are written) surfaces only when something waits for it: Orbax's next
  ``save`` (a whole cadence later) or the end of fit. :meth:`SaveWatch.poll`, called
  at every step end, asks ``is_saving_in_progress()`` (a lock, no wait) and, once the
  save is over, collects its outcome with ``wait_until_finished()``, which then returns
  at once: a failed save stops the run at the next step.
- **Flood.** Orbax logs each failing writer thread's traceback (hundreds of lines,
  each repeating a TensorStore spec) before the error reaches the loop, and writes that
  end after Orbax gave up print more. Those of disk errors are dropped
  (:class:`_QuietWriteFailures`, :func:`_late_callback`): the error the loop raises says
  it once, as a :class:`~nnx_trainer.write_errors.RunDirWriteError`.

Orbax deletes old steps only after the new one committed, so a failed save leaves
every earlier committed step as it was; the half-written ``<step>.orbax-checkpoint-tmp``
is named and removed when the directory is next opened (the run resumes from the
newest committed step once the disk is fixed).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from nnx_trainer.host_memory import release_free_host_memory
from nnx_trainer.write_errors import WRITE_ERRNOS, RunDirWriteError, os_error_of
from nnx_trainer_plugins import checkpoint_layout as layout

log = layout.log
# Orbax's manager options of the save side (see the module docstring, "Hang").
OPTIONS: dict[str, Any] = {
    "async_options": ocp.AsyncOptions(create_directories_asynchronously=False)}
EXIT_GRACE_SECONDS = 5.0  # after the main thread ended: only stuck threads are left
JOIN_SECONDS = 3.0  # for the writer threads of a failed save to end (they fail fast)


class _QuietWriteFailures(logging.Filter):
    """Drops Orbax's log records (with tracebacks) of a disk error the loop reports: its
    threads' (``absl``) and its abandoned write tasks' (``asyncio``: "Task exception was
    never retrieved")."""

    def filter(self, record: logging.LogRecord) -> bool:
        orbax = f"{os.sep}orbax{os.sep}"
        # asyncio's "Future exception was never retrieved" names no Orbax file: any of its
        # records that carries a write errno is an abandoned TensorStore write.
        if record.levelno < logging.ERROR or (
                record.name != "asyncio" and orbax not in record.pathname
                and orbax not in record.getMessage()):
            return True
        found = os_error_of(record.exc_info[1] if record.exc_info else None)
        if found is None:
            found = os_error_of(Exception(record.getMessage()))
        return found is None or found[0] not in WRITE_ERRNOS


def _late_callback(unraisable: Any) -> bool:
    """A TensorStore write finishing after the asyncio loop that awaited it was closed
    (Orbax's ``run_sync`` gave up on the first failed write): harmless, and printed as
    a bare traceback per array unless dropped."""
    tb, frames = unraisable.exc_traceback, []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    return (unraisable.exc_type is RuntimeError and unraisable.object is None
            and str(unraisable.exc_value) == "Event loop is closed"
            and "call_soon_threadsafe" in frames)


def _quiet_write_failures() -> None:
    """Install the filters above (once)."""
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_QUIET)  # (a filter is added once)
    previous = sys.unraisablehook
    if getattr(previous, "_nnx_trainer", False):
        return

    def hook(unraisable: Any) -> None:
        if not _late_callback(unraisable):
            previous(unraisable)

    hook._nnx_trainer = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


_QUIET = _QuietWriteFailures()


def _join_orbax_threads(timeout: float) -> list[threading.Thread]:
    """Give the writer threads of a failed save the time to end (each fails fast once a
    write failed): one still running when the interpreter exits fails again, loudly
    ("cannot schedule new futures after interpreter shutdown"). Returns those stuck."""
    deadline = time.monotonic() + timeout
    threads = [t for t in threading.enumerate()
               if type(t).__module__.startswith("orbax.") and not t.daemon]
    for thread in threads:
        # (Orbax's own join() re-raises the thread's error: the plain one waits.)
        threading.Thread.join(thread, max(0.0, deadline - time.monotonic()))
    return [t for t in threads if t.is_alive()]


def _exit_if_stuck(grace: float) -> None:
    """Exit the process (status 1) if it still runs ``grace`` s after the main thread
    ended: armed only when writer threads of a failed save are stuck for good."""

    def watch() -> None:
        threading.main_thread().join()  # returns when the interpreter starts to exit
        threading.Event().wait(grace)
        stuck = [t.name for t in threading.enumerate()
                 if t.is_alive() and not t.daemon and t is not threading.main_thread()]
        sys.stderr.write(
            f"nnx_trainer: exiting {grace:.0f} s after the failed checkpoint save: "
            f"threads {', '.join(stuck) or '?'} still wait on it\n")
        sys.stderr.flush()
        os._exit(1)

    threading.Thread(target=watch, name="nnx_trainer_exit_watch", daemon=True).start()


class SaveWatch:
    """Runs Orbax's saves of one plugin and turns a failed one into one prompt error.

    :ivar failed: the error of a save that failed (the run stops with it).
    """

    def __init__(self) -> None:
        self._pending: int | None = None  # the step of the save that may still run
        self.failed: RunDirWriteError | None = None

    def save(self, manager: ocp.CheckpointManager, step: int, **kwargs: Any) -> None:
        """``manager.save(step, **kwargs)``; a failed write raises ``RunDirWriteError``."""
        _quiet_write_failures()
        self.wait(manager)  # the previous save's failure is that step's, not this one's
        try:
            manager.save(step, **kwargs)
        except Exception as exc:
            self._fail(manager, step, exc)
        self._pending = step

    def poll(self, manager: ocp.CheckpointManager | None) -> None:
        """Collect a finished background save's outcome without waiting for a running one."""
        if manager is not None and self._pending is not None and (
                not manager.is_saving_in_progress()):
            self.wait(manager)

    def wait(self, manager: ocp.CheckpointManager | None) -> None:
        """Wait for the save in flight; raise ``RunDirWriteError`` if its write failed."""
        step, self._pending = self._pending, None
        if manager is None:
            return
        try:
            manager.wait_until_finished()
        except Exception as exc:
            self._fail(manager, step, exc)
        if step is not None:
            # The save's host copy and TensorStore's write buffers were freed in its
            # worker threads' malloc arenas, which the next steps do not reuse: give
            # them back, or they sit under the steps' own peak (benchmarks/README.md).
            release_free_host_memory()

    def close(self, manager: ocp.CheckpointManager, exception: BaseException | None) -> None:
        """Close ``manager`` (waiting for the last save); after a failure, quietly."""
        try:
            self.wait(manager)
        except RunDirWriteError as exc:
            if exception is None:
                raise
            if exc is not exception:  # e.g. the metrics failed first, then this save
                log.warning("%s", exc)
        if self.failed is not None and _join_orbax_threads(JOIN_SECONDS):
            _exit_if_stuck(EXIT_GRACE_SECONDS)  # (they would keep the process alive)
        try:
            manager.close()
        except Exception as exc:
            if exception is None and self.failed is None:
                raise
            log.debug("closing the checkpoint manager after a failure: %r", exc)

    def _fail(self, manager: ocp.CheckpointManager, step: int | None,
              exc: BaseException) -> None:
        """Raise the one error of a failed write (anything else as it is)."""
        if os_error_of(exc) is None:
            raise exc
        directory = Path(manager.directory)
        where = directory / str(step) if step is not None else directory
        self.failed = RunDirWriteError(
            f"the checkpoint of step {step}", where, exc, step=step,
            advice=_advice(directory, step))
        raise self.failed from None


def _advice(directory: Path, failed: int | None) -> str:
    """What is intact and how to continue, for the message of a failed save."""
    try:
        steps = sorted(int(n) for n in layout.listdir(directory)
                       if layout.STEP_NAME.match(n) and int(n) != failed)
    except OSError:
        steps = []
    kept = (f"the committed checkpoints in {directory} (steps {layout.fmt_steps(steps)}) are "
            "intact" if steps else f"no earlier checkpoint is in {directory}")
    return (f"{kept}; free space on that disk or make it writable, then resume with "
            "ckpt_path='last' (--ckpt_path last)")
