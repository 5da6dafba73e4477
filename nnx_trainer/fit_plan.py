"""What a fit will do, decided from the options and the data before anything is built.

:func:`plan_fit` counts the steps (so bad sizes fail before a model is built) and
returns a frozen :class:`FitPlan`; its :class:`Cadence` is the one place that answers
"log now?", "validate now?", "may the loop save now?" and "stop now?".
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import grain

from nnx_trainer import data as data_lib
from nnx_trainer.option_checks import resolve_limit
from nnx_trainer.progress import FitProgress
from nnx_trainer.strategy import Strategy


@dataclasses.dataclass(frozen=True)
class Cadence:
    """When the loop logs, validates, may save, and stops.

    :param log_every_n_steps: read and log the training metrics every N steps.
    :param val_every_n_epochs: validate after every N epochs (0: never at an epoch end).
    :param val_every_n_steps: also validate every N steps (None: epoch ends only).
    :param max_epochs: epochs to train.
    :param max_steps: steps to train in total (None: epochs decide).
    :param saves: False for ``fast_dev_run``, which never writes a checkpoint.
    """

    log_every_n_steps: int
    val_every_n_epochs: int
    val_every_n_steps: int | None
    max_epochs: int
    max_steps: int | None
    saves: bool = True

    def logs(self, step: int) -> bool:
        """Whether the training metrics are read after ``step`` steps."""
        return step % self.log_every_n_steps == 0

    def validates_epoch_end(self, epochs_done: int) -> bool:
        """Whether the epoch that brought the count of completed epochs to ``epochs_done``
        ends with a validation: the one epoch-end rule."""
        return bool(self.val_every_n_epochs) and epochs_done % self.val_every_n_epochs == 0

    def validates_step(self, step: int, closes_epoch: int | None) -> bool:
        """Whether step ``step`` is followed by a step-cadence validation. ``closes_epoch``
        is the completed-epoch count when this step closes an epoch (else None): an epoch
        end that validates anyway does it for this step, so it is not run twice."""
        if not self.val_every_n_steps or step % self.val_every_n_steps:
            return False
        return closes_epoch is None or not self.validates_epoch_end(closes_epoch)

    def may_save(self, progress: FitProgress) -> bool:
        """Whether the loop's save point asks the checkpoint plugin at all: a preemption
        saves once, at the end of fit, and ``fast_dev_run`` never saves."""
        return self.saves and not progress.preempted

    def stops(self, progress: FitProgress) -> bool:
        """Whether the fit is over: every epoch done, ``max_steps`` reached, a plugin asked
        to stop, or a preemption."""
        if progress.preempted or progress.should_stop or progress.epoch >= self.max_epochs:
            return True
        return self.max_steps is not None and progress.global_step >= self.max_steps


@dataclasses.dataclass(frozen=True)
class FitPlan:
    """The shape of a fit: what it trains on and for how long.

    :param train_data: ``task.train_data()``, checked.
    :param streaming: the training set is a ``grain.IterDataset`` (one epoch of
        ``max_steps`` batches, its position kept as Grain's iterator state).
    :param steps_per_epoch: training steps (full global batches) in one epoch, limited.
    :param total_steps: steps the fit runs when nothing stops it early.
    :param cadence: when the loop logs, validates, saves and stops.
    """

    train_data: Any
    streaming: bool
    steps_per_epoch: int
    total_steps: int
    cadence: Cadence

    def remaining_steps(self, progress: FitProgress) -> int:
        """Batches the fit still reads from ``progress``'s position."""
        cadence = self.cadence
        remaining = (cadence.max_epochs - progress.epoch) * self.steps_per_epoch
        remaining -= progress.batch_in_epoch
        if cadence.max_steps is not None:
            remaining = min(remaining, cadence.max_steps - progress.global_step)
        return remaining

    def epochs_to_run(self) -> int:
        """Epochs this fit runs (1-based numbering in progress lines counts up to it)."""
        if not self.steps_per_epoch:
            return self.cadence.max_epochs
        return max(1, math.ceil(self.total_steps / self.steps_per_epoch))


def plan_fit(
    task: Any, strategy: Strategy, *, batch_size: int, eval_batch_size: int,
    max_epochs: int, max_steps: int | None, limit_train_batches: int | float | None,
    check_val_every_n_epoch: int, val_check_interval: int | float | None,
    log_every_n_steps: int, worker_count: int, fast_dev_run: bool,
) -> FitPlan:
    """Count steps from ``task.train_data()`` before building anything, so bad sizes fail
    early; sets up ``strategy`` for ``batch_size``."""
    name = type(task).__name__
    train = task.train_data()
    streaming = isinstance(train, grain.IterDataset)
    if not isinstance(train, grain.MapDataset) and not streaming:
        raise TypeError(
            f"{name}.train_data() must return a grain.MapDataset (or a "
            f"grain.IterDataset stream), got {type(train).__name__}; wrap a sequence "
            "with grain.MapDataset.source(...)"
        )
    if not streaming and len(train) == 0:
        raise ValueError(
            f"{name}.train_data() returned no examples (an empty dataset); "
            "check the data source it reads (its path, split or filters)"
        )
    if streaming and max_steps is None:
        raise ValueError(
            f"{name}.train_data() returned a grain.IterDataset, which has "
            "no length, so epochs cannot end the fit: set Trainer(max_steps=N)"
        )
    if streaming and worker_count:
        raise ValueError(
            f"worker_count={worker_count} with a streamed training set "
            "(grain.IterDataset): Grain's worker processes split a stream by slicing its "
            "source, which a stream cannot promise; use worker_count=0 (a read-ahead "
            "thread serves the stream), or return a grain.MapDataset to use workers"
        )
    if streaming and limit_train_batches is not None:
        raise ValueError(
            "limit_train_batches counts batches of an epoch, and a streamed training set "
            "(grain.IterDataset) has no epochs: use max_steps alone"
        )
    strategy.setup(batch_size)
    devices = strategy.num_devices
    if eval_batch_size % devices or eval_batch_size % strategy.process_count:
        unit = math.lcm(devices, strategy.process_count)
        raise ValueError(
            f"eval_batch_size {eval_batch_size} is not divisible by the "
            f"{devices} devices of the {strategy.name!r} strategy; use a multiple "
            f"of {unit}, e.g. eval_batch_size={max(unit, eval_batch_size // unit * unit)}"
        )
    if streaming:  # the stream is one epoch of max_steps batches
        steps = max_steps
    else:
        steps = data_lib.train_steps_per_epoch(len(train), batch_size)
        steps = resolve_limit(limit_train_batches, steps)
    val_every_steps = val_check_interval
    if isinstance(val_check_interval, float):  # a fraction of an epoch
        every = max(1, int(val_check_interval * steps))
        val_every_steps = every if every < steps else None  # the epoch end does it
    total = steps * max_epochs
    if max_steps is not None and max_steps < total:
        total = max_steps
    cadence = Cadence(
        log_every_n_steps=log_every_n_steps, val_every_n_epochs=check_val_every_n_epoch,
        val_every_n_steps=val_every_steps, max_epochs=max_epochs, max_steps=max_steps,
        saves=not fast_dev_run,
    )
    return FitPlan(train_data=train, streaming=streaming, steps_per_epoch=steps,
                   total_steps=total, cadence=cadence)
