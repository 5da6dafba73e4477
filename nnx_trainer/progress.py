"""Where a fit stands: counters, stop flags and timings, one fresh :class:`FitProgress` per fit.

The counters are also the data position: a checkpoint's :class:`CheckpointMeta` is
written from them (:meth:`FitProgress.to_meta`) and a restore reads them back
(:meth:`FitProgress.load_meta`), so a resumed fit starts at the next unconsumed batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from nnx_trainer.state import CheckpointMeta


@dataclasses.dataclass
class FitProgress:
    """The run state of one fit, read and set by the loop, plugins (through the Trainer's
    attributes of the same names) and the preemption handler.

    :param global_step: steps completed (one batch each); hooks called after a step see
        it already incremented.
    :param epoch: the epoch the next step belongs to.
    :param batch_in_epoch: batches of that epoch already consumed.
    :param validation_pending: preempted at an epoch end before its validation; the
        resumed fit runs that validation first.
    :param data_state: a streamed training set's iterator state after the last consumed
        batch (None for indexed data, whose position is the counters).
    :param should_stop: a plugin asks the fit to stop after the current step.
    :param stop_reason: why the fit stopped early (``"early_stopping"``, ``"SIGTERM"``...).
    :param preempted: a signal (or a coordinated preemption notice) stopped the fit.
    :param resumed_from: the checkpoint the latest restore read, if any.
    :param fit_seconds: wall seconds of the fit loop.
    :param compile_seconds: seconds of each step kind's first (tracing, compiling) call.
    :param data_wait_closed: host seconds blocked on data by closed pipelines.
    :param prefetcher: the open training prefetcher, whose wait grows while it runs.
    """

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    validation_pending: bool = False
    data_state: Any = None
    should_stop: bool = False
    stop_reason: str | None = None
    preempted: bool = False
    resumed_from: str | None = None
    fit_seconds: float = 0.0
    compile_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    data_wait_closed: float = 0.0
    prefetcher: Any = None

    @property
    def data_wait_seconds(self) -> float:
        """Host seconds blocked on the training data so far (live, no device sync)."""
        live = self.prefetcher.wait_seconds if self.prefetcher is not None else 0.0
        return self.data_wait_closed + live

    def advance(self) -> None:
        """One step completed: it consumed one batch of the current epoch."""
        self.global_step += 1
        self.batch_in_epoch += 1

    def close_epoch(self) -> None:
        """The epoch's last batch is consumed: the counters move to the next epoch."""
        self.epoch += 1
        self.batch_in_epoch = 0

    def stop(self, reason: str, *, preempted: bool = False) -> None:
        """Stop after the current step, saying why."""
        self.stop_reason = reason
        if preempted:
            self.preempted = True
        else:
            self.should_stop = True

    def to_meta(self, seed: int, plugins: Mapping[str, Any]) -> CheckpointMeta:
        """The checkpoint meta of this position, with the plugins' JSON state."""
        return CheckpointMeta(
            global_step=self.global_step, epoch=self.epoch,
            batch_in_epoch=self.batch_in_epoch, seed=seed,
            validation_pending=self.validation_pending, plugins=plugins,
            data_state=self.data_state,
        )

    def load_meta(self, meta: CheckpointMeta, source: str | None = None) -> None:
        """Take a restored checkpoint's position (counters, pending validation, stream)."""
        self.global_step = int(meta.global_step)
        self.epoch = int(meta.epoch)
        self.batch_in_epoch = int(meta.batch_in_epoch)
        self.validation_pending = bool(meta.validation_pending)
        self.data_state = meta.data_state
        self.resumed_from = source

    @classmethod
    def from_meta(cls, meta: CheckpointMeta, source: str | None = None) -> FitProgress:
        """A fresh progress at a checkpoint's position."""
        progress = cls()
        progress.load_meta(meta, source)
        return progress
