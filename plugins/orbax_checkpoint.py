"""Checkpoints with Orbax: the I/O adapter between the loop's save point and Orbax.

``trainer.run_dir/"checkpoints"/<step>/`` (steps completed) holds ``state/`` (the arrays of
``CheckpointContent.arrays()``), ``meta/`` (JSON ``CheckpointMeta``: counters = the data
position, plugin states) and, with a monitor, ``metrics/``; ``<step>.orbax-checkpoint-tmp``
is a save in flight or cut short (never restored).

**When** is Orbax's ``save_decision_policy``, asked by the loop at its one save point per
step (after that step's validation) through ``should_save_checkpoint``: exact
``every_n_steps``/``every_n_epochs``, or by default every epoch throttled to one save per
``min_seconds_between_saves`` (60 s; each Orbax save costs ~0.2 s of CPU whatever the
model, a lot next to short epochs on a small machine), never skipping a validation that
ranks among the ``keep_best`` best (``checkpoint_cadence.py``). The end of fit
(``save_on_end``) and preemption always save.

**What is kept** is Orbax's ``preservation_policy``: ``LatestN(keep_last)`` plus, with a
``monitor``, ``BestN(keep_best)`` by the value logged at the checkpoint's own step (none, or
non-finite, never counts as best). Orbax deletes in the background, removes uncommitted
saves on open (each named in a warning here first) and answers ``best_step``.
A NaN/Inf state is never written: a refused save raises ``NonFiniteStateError`` (steps).
The same dispatch fingerprints the arrays; a restore verifies the fingerprint.
Saves are asynchronous by default (the loop waits only for the device-to-host copy);
``on_run_end`` closes the manager, waiting for the last one, however the run ended. A write
that fails (disk full, read-only) stops the run at the next step with one error naming
path, step and OS error, never a hang (``checkpoint_writes.py``).

**Restore** (``ckpt_path=``: ``"last"``, ``"best"``, ``"auto"``, a step or checkpoints
directory) reads onto the trainer's current shapes and shardings (any device count or
strategy); plugin arrays come back where both sides have them. ``weights_only=True``
checkpoints hold the model only: evaluation loads them, ``fit`` refuses them. What Orbax
lacks: earlier runs' steps moved aside, paths resolved (``checkpoint_layout.py``);
fingerprints, damaged steps named and stepped over (``checkpoint_integrity/_restore.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from nnx_trainer import hookimpl
from nnx_trainer.nonfinite import refused_save_error
from nnx_trainer.option_checks import check_monitor_validated, metric_mode
from nnx_trainer.state import CheckpointContent, CheckpointMeta
from nnx_trainer_plugins import checkpoint_cadence as cadence
from nnx_trainer_plugins import checkpoint_integrity as integrity
from nnx_trainer_plugins import checkpoint_layout as layout
from nnx_trainer_plugins import checkpoint_restore as restore
from nnx_trainer_plugins import checkpoint_writes as writes

if TYPE_CHECKING:
    from nnx_trainer import RunView

log = layout.log
FORMAT_VERSION = 3  # 3: with a fingerprint (checkpoint_integrity.FINGERPRINTED)


class OrbaxCheckpoint:
    """Saves and restores the full training state with an Orbax ``CheckpointManager``.

    :param every_n_steps: save every N training steps, exactly (``None``: no step cadence).
    :param every_n_epochs: save after every N-th epoch, after its validation, exactly
        (``0``: no epoch saves). Neither given: every epoch, throttled (below).
    :param min_seconds_between_saves: the throttle of the *default* cadence only: an
        epoch save comes at least this long after the previous save (``0``: every
        epoch). Explicit cadences, the end of fit, preemption and (with a ``monitor``) a
        validation ranking among the ``keep_best`` best are never throttled.
    :param save_on_end: save when fit ends (preemption always saves).
    :param monitor: metric that ranks checkpoints, e.g. ``"val/loss"``; needed for
        ``keep_best`` and ``ckpt_path="best"``.
    :param mode: ``"min"`` (lower is better), ``"max"``, or ``"auto"`` (default): from the
        metric's name, ``"max"`` for accuracy-like names (``accuracy``, ``top5``, ``f1``...).
    :param keep_best: keep the best K checkpoints by ``monitor`` (default 1 with a monitor).
    :param keep_last: always keep the latest K checkpoints, whatever their metric.
    :param weights_only: save the model state only; evaluation loads such checkpoints,
        ``fit`` cannot resume from them.
    :param async_save: write in a background thread (the loop only waits for the copy
        off the device); ``False`` blocks until each checkpoint is committed.
    :param directory: where checkpoints go (default ``trainer.run_dir/"checkpoints"``).
    """

    name = "checkpoint"

    def __init__(
        self, *, every_n_steps: int | None = None, every_n_epochs: int | None = None,
        min_seconds_between_saves: float = 60.0, save_on_end: bool = True,
        monitor: str | None = None, mode: str = "auto", keep_best: int | None = None,
        keep_last: int = 1, weights_only: bool = False, async_save: bool = True,
        directory: str | Path | None = None,
    ) -> None:
        layout.check_options(every_n_steps=every_n_steps, every_n_epochs=every_n_epochs,
                             secs=min_seconds_between_saves, keep_best=keep_best,
                             keep_last=keep_last, monitor=monitor)
        secs = min_seconds_between_saves
        self.every_n_steps, self.every_n_epochs = every_n_steps, every_n_epochs
        self.min_seconds_between_saves = float(secs)
        self.save_on_end, self.monitor = bool(save_on_end), monitor
        self.mode = metric_mode(monitor, mode, "OrbaxCheckpoint")
        self.keep_best = keep_best if keep_best is not None else (1 if monitor else None)
        self.keep_last = keep_last
        self.weights_only, self.async_save = bool(weights_only), bool(async_save)
        self.directory = None if directory is None else Path(directory)
        self._manager: ocp.CheckpointManager | None = None
        self._key: tuple | None = None  # (directory, steps_per_epoch) of the open manager
        self._logged: tuple[int, Any] | None = None  # (step, monitored value) last logged
        self._monitor_checked = False  # against the first validation's metric names
        self._ranked: list[float] = []  # monitored values of the steps saved, for the best
        self._resumed_from: int | None = None  # step this fit restored from our directory
        self._amend_step: int | None = None  # that step, saved before its validation
        self.saved_steps: list[int] = []  # steps this instance wrote, in order
        self._damaged: list[tuple[int, Path]] = []  # (step, where) set aside since restore
        self._writes = writes.SaveWatch()  # a failed write: one prompt error, no hang

    # ----------------------------------------------------------------- manager

    @hookimpl
    def checkpoint_dir(self, trainer: RunView) -> Path:
        """Where this trainer's checkpoints go (the ``checkpoint_dir`` hook)."""
        if self.directory is not None:
            return self.directory
        return Path(trainer.run_dir) / "checkpoints"

    def _metric_fn(self, metrics: Any) -> float:
        value = layout.metric_of(metrics, self.monitor)  # none or non-finite: ranks last
        return (math.inf if self.mode == "min" else -math.inf) if value is None else value

    def _options(self, steps_per_epoch: int) -> ocp.CheckpointManagerOptions:
        keep: policies.PreservationPolicy = policies.LatestN(self.keep_last)
        if self.monitor:
            keep = policies.AnyPreservationPolicy([keep, policies.BestN(
                get_metric_fn=self._metric_fn, reverse=self.mode == "min", n=self.keep_best,
                keep_checkpoints_without_metrics=False)])
        return ocp.CheckpointManagerOptions(
            save_decision_policy=cadence.save_decision(
                self.every_n_steps, self.every_n_epochs, self.min_seconds_between_saves,
                steps_per_epoch), preservation_policy=keep,
            best_fn=self._metric_fn if self.monitor else None, best_mode=self.mode,
            enable_async_checkpointing=self.async_save, cleanup_tmp_directories=True,
            enable_background_delete=True, create=True,
            # Decide from the policies only (a save in flight is waited for, not skipped),
            # so the steps saved do not depend on how fast the disk is.
            enable_should_save_is_saving_in_progress_check=False,
            **writes.OPTIONS,  # a failed write must not leave threads waiting (hang)
        )

    def _open(self, trainer: RunView) -> ocp.CheckpointManager:
        """The manager of this plugin's directory, created on first use."""
        directory = self.checkpoint_dir(trainer).absolute()
        key = (directory, trainer.steps_per_epoch)
        if self._manager is not None and self._key == key:
            return self._manager
        self._close()
        if trainer.is_main_process:  # Orbax removes them silently: name them first
            layout.warn_uncommitted(directory, removing=True)
            self._damaged += integrity.set_aside_incomplete(directory)  # e.g. half-deleted
        trainer.strategy.barrier("nnx_trainer_checkpoint_open")
        self._manager = ocp.CheckpointManager(directory, options=self._options(key[1]))
        self._key = key
        return self._manager

    def _close(self, exception: BaseException | None = None) -> None:
        manager, self._manager, self._key = self._manager, None, None
        if manager is not None:  # waits for the last save and the background deletions
            self._writes.close(manager, exception)

    # ------------------------------------------------------------------ saving

    def save(self, trainer: RunView) -> bool:
        """Write ``trainer.checkpoint_state()`` as step ``trainer.global_step``; False when
        the step is already saved. A state with NaN/Inf is refused: ``NonFiniteStateError``."""
        step, manager = trainer.global_step, self._open(trainer)
        if step in manager.all_steps():
            return False
        content = trainer.checkpoint_state()
        arrays = {"model": content.model} if self.weights_only else content.arrays()
        finite, sums = integrity.fingerprint(arrays)  # NaN check and checksums together
        if not finite:  # a refused save fails the run (design.md)
            raise refused_save_error(trainer, step, arrays, self.saved_steps)
        meta = integrity.seal(layout.jsonable({**content.meta.to_json(), "checkpoint": {
            "format": FORMAT_VERSION, "weights_only": self.weights_only,
            "batch_size": trainer.batch_size, "steps_per_epoch": trainer.steps_per_epoch}}),
            sums)
        value = self._value_at(step)  # {}: no value at this step (or not finite), never best
        metrics = None if not self.monitor else {} if value is None else {self.monitor: value}
        self._ranked += [] if value is None else [value]
        self._writes.save(manager, step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)),
            metrics=metrics, force=True)  # force: the loop (or the end of fit) decided
        self.saved_steps.append(step)
        trainer.hook.on_checkpoint_saved(trainer=trainer, step=step)
        return True

    def _value_at(self, step: int) -> float | None:
        """The monitored value logged at ``step`` (in ``callback_metrics`` since its validation)."""
        if self._logged is None or self._logged[0] != step or not self.monitor:
            return None
        return layout.metric_of({self.monitor: self._logged[1]}, self.monitor)

    # ------------------------------------------------------------- fit hooks

    @hookimpl
    def on_fit_start(self, trainer: RunView) -> None:
        """Open the directory; keep an earlier run's or a replaced continuation's steps out."""
        resumed, self._resumed_from = self._resumed_from, None
        check_monitor_validated(self.monitor, trainer, "OrbaxCheckpoint")
        if trainer.fast_dev_run:
            self._amend_step = None
            return
        manager = self._open(trainer)
        integrity.fingerprint(trainer.checkpoint_state().arrays())  # compile it now
        steps, directory = list(manager.all_steps()), Path(manager.directory)
        newer = [s for s in steps if s > trainer.global_step]
        if steps and resumed is None:  # not continuing these: "last" must be this run's
            layout.move_earlier_run_aside(directory, steps, trainer.is_main_process)
            trainer.strategy.barrier("nnx_trainer_checkpoint_aside")
            manager.reload()
        elif newer:  # Orbax refuses steps at or below its latest: drop the replaced ones
            log.warning("resumed from step %d of %s: deleting its later steps %s, which belong "
                        "to the run being replaced", trainer.global_step, directory,
                        layout.fmt_steps(newer))
            for s in newer:
                manager.delete(s)
            manager.wait_until_finished()
        self._ranked = [v for s in manager.all_steps() if self.monitor and
                        (v := layout.metric_of(manager.metrics(s), self.monitor)) is not None]

    @hookimpl(trylast=True)
    def should_save_checkpoint(self, trainer: RunView, step: int) -> bool:
        """Orbax's save-decision policy answers (process 0 decides time, all agree)."""
        if trainer.fast_dev_run:
            return False
        manager = self._open(trainer)
        if step == self._amend_step and (value := self._value_at(step)) is not None:
            # The resumed step, saved before its validation: add its metric (layout.amend).
            if trainer.is_main_process:
                layout.amend_metrics(Path(manager.directory) / str(step), self.monitor, value)
            trainer.strategy.barrier("nnx_trainer_checkpoint_metrics")
            manager.reload()  # retention and best_step read the metrics Orbax holds
        self._amend_step = None
        return self._ranks_among_best(step, manager) or manager.should_save(step)

    def _ranks_among_best(self, step: int, manager: ocp.CheckpointManager) -> bool:
        """The default cadence with a monitor: a validation ranking among the best saves,
        throttle or not (every process holds the same value, so gives the same answer)."""
        value = self._value_at(step)
        return (value is not None and self.every_n_steps is None and self.every_n_epochs is None
                and step > (manager.latest_step() or -1)
                and cadence.ranks_among_best(value, self._ranked, self.keep_best, self.mode))

    @hookimpl
    def log_metrics(self, trainer: RunView, metrics: Mapping[str, Any], step: int) -> None:
        """Remember the monitored value and its step, to store with that step's checkpoint."""
        if not self.monitor:
            return
        if self.monitor in metrics:
            self._logged = (int(step), metrics[self.monitor])
        elif not self._monitor_checked:
            layout.check_monitor(self.monitor, metrics, trainer.callback_metrics)
        self._monitor_checked |= any(k.startswith("val/") for k in metrics)

    @hookimpl(trylast=True)
    def on_save_checkpoint(self, trainer: RunView, reason: str) -> None:
        """Write the checkpoint (after every other plugin saw the request)."""
        if trainer.fast_dev_run or (reason == "end" and not self.save_on_end):
            return
        self.save(trainer)

    @hookimpl
    def on_train_batch_end(self) -> None:
        """A background save that failed stops the run now, not at the next save."""
        self._writes.poll(self._manager)

    @hookimpl
    def wait_for_checkpoints(self) -> None:
        """Block until every asynchronous save is committed (``RunDirWriteError``: failed)."""
        self._writes.wait(self._manager)

    @hookimpl
    def on_run_end(self, exception: BaseException | None) -> None:
        """Close the manager (waits for the last save); never mask the run's own error."""
        self._amend_step = None
        try:
            self._close(exception)
        except Exception as exc:
            if exception is None:
                raise
            log.warning("closing the checkpoint manager after %r failed: %r", exception, exc)

    # ----------------------------------------------------------------- restore

    @hookimpl
    def restore_checkpoint(
        self, trainer: RunView, ckpt_path: str, target: Mapping[str, Any]
    ) -> CheckpointContent | Mapping[str, Any]:
        """The checkpoint ``ckpt_path`` on ``target``'s shapes and shardings (``{}``: none);
        a damaged step is stepped over unless named (``checkpoint_restore.py``)."""
        own_dir = self.checkpoint_dir(trainer).absolute()
        directory, step = layout.resolve(ckpt_path, own_dir, self.monitor)
        owned = directory == own_dir
        if ckpt_path in ("last", "auto") and not layout.has_steps(own_dir):
            return restore.say_fresh(trainer, ckpt_path, own_dir, self._damaged)
        if not owned and trainer.is_main_process:  # someone else's: name partial saves only
            layout.warn_uncommitted(directory, removing=False)
        if step is not None:  # named: refused if damaged (before _open moves it aside)
            restore.refuse_if_incomplete(directory, step)
        manager = self._open(trainer) if owned else ocp.CheckpointManager(
            directory, options=ocp.CheckpointManagerOptions(  # 0: else Orbax warns
                read_only=True, create=False, save_interval_steps=0))
        try:
            found = restore.read_newest_intact(manager, lambda: layout.pick_step(
                manager, ckpt_path, step, directory, self.monitor), target, trainer,
                fallback=owned and step is None, moved=self._damaged)
        finally:
            if not owned:
                manager.close()
        if found is None:
            return restore.say_fresh(trainer, ckpt_path, own_dir, self._damaged)
        (step, meta, arrays), moved, self._damaged = found, self._damaged, []
        where, meta_obj = directory / str(step), CheckpointMeta.from_json(meta)
        if trainer.stage == "fit":
            layout.check_compatible(meta.get("checkpoint", {}), meta.get("seed"), {
                "seed": trainer.seed, "batch_size": trainer.batch_size,
                "steps_per_epoch": trainer.steps_per_epoch}, where)
            self._resumed_from = step if owned else None
            pending = owned and self.monitor and meta_obj.validation_pending
            self._amend_step = step if pending else None
        restore.say_restored(trainer, ckpt_path, where, step, moved)
        return CheckpointContent.from_arrays(arrays, meta_obj, source=str(where))

    def __repr__(self) -> str:
        keys = ("every_n_steps", "every_n_epochs", "min_seconds_between_saves", "monitor",
                "mode", "keep_best", "keep_last", "weights_only", "async_save")
        return f"OrbaxCheckpoint({', '.join(f'{k}={getattr(self, k)!r}' for k in keys)})"
