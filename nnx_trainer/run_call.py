"""The frame of one fit/validate/test/predict call: its run directory, its lock, its end.

Every call holds ``run_dir``'s lock (:mod:`nnx_trainer.run_lock`) from before any hook
or write until its plugins have torn down, reports a failure through ``on_exception``,
and always ends with ``on_run_end`` and how the call ended (:class:`Outcome`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from nnx_trainer.plugin_manager import call_each
from nnx_trainer.progress import FitProgress
from nnx_trainer.run_lock import RunDirInUse, RunDirLock
from nnx_trainer.state import Outcome
from nnx_trainer.strategy import Strategy


@contextlib.contextmanager
def run_call(
    view: Any, plugin_manager: Any, stage: str, progress: FitProgress,
    lock: RunDirLock | None,
) -> Iterator[None]:
    """One call's frame: ``on_exception`` on failure, then always ``on_run_end`` with the
    outcome (plugins tear down there), then ``lock`` (if any) is released.

    :param view: what hooks receive as ``trainer=``.
    :param progress: the fit's progress, which says whether a fit stopped or was preempted.
    :param lock: the run directory's lock, held by this call; None for a call made
        inside another (a plugin validating during fit), which shares the outer one's.
    """
    exception: BaseException | None = None
    try:
        yield
    except BaseException as exc:
        exception = exc
        plugin_manager.hook.on_exception(trainer=view, exception=exc)
        raise
    finally:
        if exception is not None:
            outcome = Outcome.EXCEPTION
        elif stage == "fit" and progress.preempted:
            outcome = Outcome.PREEMPTED
        elif stage == "fit" and progress.should_stop:
            outcome = Outcome.STOPPED
        else:
            outcome = Outcome.COMPLETED
        try:
            # Every plugin tears down, even after one of them raised.
            call_each(plugin_manager, "on_run_end", trainer=view, stage=stage,
                      outcome=outcome, exception=exception)
        finally:
            if lock is not None:
                lock.release()


def lock_in_every_process(
    run_dir: str | os.PathLike, stage: str, strategy: Strategy
) -> RunDirLock:
    """Lock ``run_dir`` for a ``stage`` call, or raise :class:`RunDirInUse` in every
    process, having written nothing.

    Process 0 holds the lock; with several processes it broadcasts whether it got it,
    so all of them stop together instead of the others waiting in a collective.
    """
    lock, failed = RunDirLock(run_dir), None
    if strategy.process_index == 0:
        try:
            lock.acquire(stage)
        except Exception as exc:  # any failure: the other processes must hear of it
            failed = exc
    if strategy.process_count > 1:
        from jax.experimental import multihost_utils

        # 0: locked; 1: held by another run; 2: process 0 failed otherwise (an OSError).
        code = 0 if failed is None else 1 if isinstance(failed, RunDirInUse) else 2
        code = int(multihost_utils.broadcast_one_to_all(np.int32(code)))
        if code == 1 and failed is None:
            failed = RunDirInUse(
                f"run directory {run_dir} is in use by another run (process 0's "
                "error names it). Wait until that run ends, or choose another run "
                "directory (--run-dir, Trainer(run_dir=...))")
        elif code == 2 and failed is None:
            failed = RuntimeError(f"process 0 could not lock the run directory "
                                  f"{run_dir}; its error says why")
    if failed is not None:
        raise failed
    return lock


def default_run_dir(strategy: Strategy) -> Path:
    """``runs/run-<local time>``; with several processes, process 0's clock names it so
    every process writes into the same directory."""
    stamp = int(datetime.datetime.now().timestamp())
    if strategy.process_count > 1:
        from jax.experimental import multihost_utils

        stamp = int(multihost_utils.broadcast_one_to_all(np.int64(stamp)))
    name = datetime.datetime.fromtimestamp(stamp).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"run-{name}"
