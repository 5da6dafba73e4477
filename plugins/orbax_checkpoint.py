"""Checkpoints with Orbax: periodic and end-of-fit saves, best-K and last-K retention, resume.

Layout, under ``trainer.run_dir / "checkpoints"`` (or ``directory=``)::

    checkpoints/
      120/                      # one committed step (steps completed = trainer.global_step)
        state/                  # the arrays: {"train": (model, optimizer), "train_metrics": ...,
                                #   "plugins": {name: ...}} (plugins' arrays, e.g. an EMA)
        meta/                   # JSON: counters (= the data position), plugin states, seed
        metrics/                # JSON {monitor: value}, when a monitor is set
      240.orbax-checkpoint-tmp  # a save in progress (or cut short by a killed process)

**When it saves.** Every ``every_n_steps`` steps, after every ``every_n_epochs``-th
epoch (after that epoch's validation), at the end of fit (``save_on_end``) and always
on preemption (SIGTERM/SIGINT). A periodic save is made at the next step boundary:
after any validation the engine runs at that step, so the checkpoint carries the
validation metric of its own step, and a save that falls on an epoch's last batch is
made once the epoch is closed (counters at ``epoch + 1``, batch 0), so a resume starts
the next epoch cleanly. A preemption on an epoch's last batch saves before that epoch's
validation: the checkpoint says so (``validation_pending`` in its meta), the resumed fit
runs the validation first, at the same step, and then makes the epoch save it was owed;
that step is already saved, so the save only adds the monitored value to the existing
checkpoint (same step, same state), which best-K then ranks. Every save goes through
the ``on_save_checkpoint`` hook (reasons ``"step"``, ``"epoch"``, ``"end"``,
``"preemption"``), so other plugins (a NaN guard) see it first; this plugin's
implementation runs last. A step is written once: asking again for a step that is
already saved does nothing (but for the metric added after a preemption, above).

**At most one periodic save a minute** (``min_seconds_between_saves=60``, the idea
of Orbax's ``ContinuousCheckpointingPolicy``): a step or epoch save that comes less
than that after the previous save (or the fit's start) is skipped, unless its
monitored value would enter the best ``keep_best``, so a best is never lost. Each
Orbax save costs about 0.2 s of CPU whatever the model's size (its directory,
metadata and thread work; measured on this project's 2-core CI machine), which on a
small machine with short epochs would otherwise be a large share of training. A
``kill -9`` loses at most about a minute of training; preemption and the end of fit
always save. ``min_seconds_between_saves=0`` saves at every cadence point.

**Asynchronous saves** (default): the arrays are copied off the device before
``save`` returns (the training step may reuse their buffers right after), and
written to disk in a background thread; the loop goes on meanwhile. The next save,
``wait_for_checkpoints`` (fit end, preemption) and closing wait for the write.

**Atomic commits.** Orbax writes each step into ``<step>.orbax-checkpoint-tmp`` and
renames it to ``<step>`` once complete. A process killed mid-save leaves the tmp
directory; only committed steps are ever restored. When this plugin opens its
directory it removes such leftovers with a warning naming each one (so that step can
be saved again). Checkpoints dropped by retention are first renamed into
``checkpoints/_deleted`` (atomic) and deleted from there in the background, so a kill
during a deletion never leaves a half-deleted step that looks committed.

**Non-finite state is never committed.** Before each save one jitted reduction checks
that every floating-point array of what is saved is finite (one host sync per save);
if not, the save is skipped with a warning naming the step.

**Retention.** The latest ``keep_last`` checkpoints are always kept (resume needs
them), plus the best ``keep_best`` by ``monitor``. A checkpoint's metric is the
``monitor`` value logged at that same step (an epoch-end or ``val_check_interval``
validation, or a train metric at the log cadence); a checkpoint without one (a
mid-epoch step save) can only be kept as one of the latest. Non-finite values never
count as best.

**Restore** (``ckpt_path=`` of ``fit``/``validate``/``test``/``predict``):
``"last"`` is the latest committed step in this plugin's directory (nothing there:
a warning, and training starts fresh); ``"best"`` the best by ``monitor``; a path is
a step directory (``run/checkpoints/120``) or a checkpoints directory (its latest
step). Arrays restore onto the trainer's current shapes and shardings, so a
checkpoint loads onto another device count or strategy. Plugin states (the
``state_dict`` hook) ride along in ``meta`` and come back through ``load_state_dict``;
plugin arrays (the ``array_state_dict`` hook) are saved with the state and come back
through ``load_array_state_dict``. Only the plugin arrays both the checkpoint (its
metadata says which) and this run have are read: one this run asks for that is not
saved (the plugin was off, or the checkpoint predates plugin arrays) is named in a
warning and keeps its fresh state; saved ones no plugin asks for stay on disk.

A fresh fit (step 0, nothing restored) in a directory that already holds checkpoints
moves them into ``checkpoints/_earlier-<time>/`` (with a warning; nothing is deleted),
so ``"last"`` after a crash is never the earlier run's step. A fit resumed from an
older step of its own directory deletes that directory's later steps (with a
warning): they belong to the continuation being replaced, and ``"last"`` must not
pick them up after the next crash.

``weights_only=True`` checkpoints hold the model state (parameters, batch
statistics) only, no plugin arrays. ``validate``/``test``/``predict`` load them;
``fit`` refuses to resume from them (no optimizer state, step counters or data
position) with an error saying so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from nnx_trainer import hookimpl

if TYPE_CHECKING:
    from nnx_trainer import Trainer

log = logging.getLogger("nnx_trainer.checkpoint")

TMP_MARKER = ".orbax-checkpoint-tmp"  # orbax 0.12: "<step>.orbax-checkpoint-tmp[-<stamp>]"
COMMIT_FILE = "commit_success.txt"  # written into every step directory before its rename
METRICS_ITEM = "metrics"  # orbax 0.12: a step's metrics, as JSON in <step>/metrics/metrics
TRASH_DIR = "_deleted"  # retention renames steps here, then they are removed
FORMAT_VERSION = 1
_STEP_NAME = re.compile(r"^(0|[1-9]\d*)$")


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _metric_of(metrics: Any, monitor: str | None) -> float | None:
    """The finite float under ``monitor`` in a checkpoint's metrics, else None."""
    if not monitor or not isinstance(metrics, Mapping) or monitor not in metrics:
        return None
    try:
        value = float(metrics[monitor])
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


@dataclasses.dataclass
class KeepLatestAndBest:
    """Orbax preservation policy: the latest ``keep_last`` plus the best ``keep_best``.

    Orbax's own ``BestN`` keeps every checkpoint while there are at most ``n`` of them
    (metric or not) and cannot drop metric-less ones while keeping the latest, so
    the rule is spelled out here; orbax still applies it (after each commit).
    """

    keep_last: int
    keep_best: int | None = None
    monitor: str | None = None
    mode: str = "min"

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any = None) -> list[bool]:
        order = sorted(range(len(checkpoints)), key=lambda i: checkpoints[i].step)
        keep = [False] * len(checkpoints)
        for i in order[-self.keep_last :]:
            keep[i] = True
        if self.keep_best and self.monitor:
            sign = 1.0 if self.mode == "min" else -1.0
            scored = []
            for i in order:
                value = _metric_of(checkpoints[i].metrics, self.monitor)
                if value is not None:
                    scored.append((sign * value, checkpoints[i].step, i))
            scored.sort()  # best first; ties go to the earlier step
            for _, _, i in scored[: self.keep_best]:
                keep[i] = True
        return keep


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    if not leaves:
        return jnp.bool_(True)
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]).all()


def _floating_leaves(tree: Any) -> list[jax.Array]:
    return [
        x for x in jax.tree.leaves(tree)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
    ]


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic, jax.Array)) and np.ndim(value) == 0:
        return np.asarray(value).item()
    if isinstance(value, (np.ndarray, jax.Array)):
        return np.asarray(value).tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _jsonable(meta: Mapping[str, Any]) -> dict[str, Any]:
    """``meta`` as plain JSON types (NumPy/JAX scalars converted); a clear error otherwise."""
    try:
        return json.loads(json.dumps(meta, default=_json_default))
    except (TypeError, ValueError) as exc:
        plugins = meta.get("plugins", {})
        culprit = next(
            (k for k, v in plugins.items() if not _can_dump(v)), None
        ) if isinstance(plugins, Mapping) else None
        where = f"the state_dict of plugin key {culprit!r}" if culprit else "the checkpoint meta"
        raise TypeError(
            f"{where} cannot be written as JSON ({exc}); state_dict must return numbers, "
            "strings, lists and dicts"
        ) from exc


def _can_dump(value: Any) -> bool:
    try:
        json.dumps(value, default=_json_default)
    except (TypeError, ValueError):
        return False
    return True


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class OrbaxCheckpoint:
    """Saves and restores the full training state with an Orbax ``CheckpointManager``.

    :param every_n_steps: save every N training steps (``None``: no step cadence).
    :param every_n_epochs: save after every N-th epoch, after its validation
        (``None``: no epoch cadence).
    :param min_seconds_between_saves: skip a periodic (step or epoch) save that comes
        less than this long after the previous save, unless its monitored value would
        enter the best ``keep_best`` (``0``: save at every cadence point). End-of-fit
        and preemption saves are never skipped.
    :param save_on_end: save when fit ends (preemption always saves).
    :param monitor: metric that ranks checkpoints, e.g. ``"val/loss"``; needed for
        ``keep_best`` and ``ckpt_path="best"``.
    :param mode: ``"min"`` (lower is better) or ``"max"``.
    :param keep_best: keep the best K checkpoints by ``monitor`` (default 1 when a
        monitor is set, else none).
    :param keep_last: always keep the latest K checkpoints, whatever their metric.
    :param weights_only: save the model state only (parameters, batch statistics);
        evaluation can load such checkpoints, ``fit`` cannot resume from them.
    :param async_save: write in a background thread (the loop only waits for the
        copy off the device); ``False`` blocks until each checkpoint is committed.
    :param directory: where checkpoints go (default ``trainer.run_dir/"checkpoints"``).
    """

    name = "checkpoint"

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = 1,
        min_seconds_between_saves: float = 60.0,
        save_on_end: bool = True,
        monitor: str | None = None,
        mode: str = "min",
        keep_best: int | None = None,
        keep_last: int = 1,
        weights_only: bool = False,
        async_save: bool = True,
        directory: str | Path | None = None,
    ) -> None:
        for key, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs),
                           ("keep_best", keep_best)):
            if value is not None and not _is_positive_int(value):
                raise ValueError(f"{key} must be a positive integer or None, got {value!r}")
        if (
            isinstance(min_seconds_between_saves, bool)
            or not isinstance(min_seconds_between_saves, (int, float))
            or not min_seconds_between_saves >= 0
        ):
            raise ValueError(
                "min_seconds_between_saves must be a number of seconds >= 0 (0: save at "
                f"every cadence point), got {min_seconds_between_saves!r}"
            )
        if not _is_positive_int(keep_last):
            raise ValueError(
                f"keep_last must be a positive integer, got {keep_last!r} "
                "(the latest checkpoint is what a resume needs)"
            )
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"monitor must be a metric name such as 'val/loss', got {monitor!r}")
        if keep_best is not None and monitor is None:
            raise ValueError(
                f"keep_best={keep_best} ranks checkpoints by a metric: also pass "
                "monitor=..., e.g. OrbaxCheckpoint(monitor='val/loss', keep_best=...)"
            )
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.min_seconds_between_saves = float(min_seconds_between_saves)
        self.save_on_end = bool(save_on_end)
        self.monitor = monitor
        self.mode = mode
        self.keep_best = keep_best if keep_best is not None else (1 if monitor else None)
        self.keep_last = keep_last
        self.weights_only = bool(weights_only)
        self.async_save = bool(async_save)
        self.directory = None if directory is None else Path(directory)

        self._manager: ocp.CheckpointManager | None = None
        self._manager_dir: Path | None = None
        self._pending: str | None = None  # reason of a periodic save due at the next boundary
        self._values: dict[str, tuple[int, float]] = {}  # monitor -> (step, value) last logged
        self._warned_monitor = False
        self._resumed_from: int | None = None  # step this fit restored, from our directory
        self._restored_this_fit = False
        self._resume_pending: str | None = None  # a periodic save the restored step still owed
        self._amendable_step: int | None = None  # resumed step whose metric the owed save adds
        self._janitors: list[threading.Thread] = []
        self._clock = time.monotonic
        self._last_save: float | None = None  # clock time of the last save (or fit start)
        self._saved_values: list[float] | None = None  # monitored values saved (None: unread)
        self.skipped_steps: list[int] = []  # periodic saves skipped as too soon after the last
        self.saved_steps: list[int] = []  # steps this instance dispatched, in order

    # ------------------------------------------------------------- locations

    def checkpoint_dir(self, trainer: Trainer) -> Path:
        """Where this trainer's checkpoints go."""
        if self.directory is not None:
            return self.directory
        return Path(trainer.run_dir) / "checkpoints"

    def _options(self, read_only: bool = False) -> ocp.CheckpointManagerOptions:
        monitor, sign = self.monitor, (1.0 if self.mode == "min" else -1.0)

        def best_fn(metrics: Any) -> float:  # orbax records metrics only when this is set
            value = _metric_of(metrics, monitor)
            return sign * math.inf if value is None else value

        if read_only:
            return ocp.CheckpointManagerOptions(
                read_only=True, create=False, enable_async_checkpointing=False,
                save_interval_steps=0,
            )
        return ocp.CheckpointManagerOptions(
            enable_async_checkpointing=self.async_save,
            best_fn=best_fn if monitor else None,
            best_mode=self.mode,
            preservation_policy=KeepLatestAndBest(
                keep_last=self.keep_last, keep_best=self.keep_best, monitor=monitor,
                mode=self.mode,
            ),
            todelete_subdir=TRASH_DIR,
            create=True,
        )

    def _open(self, trainer: Trainer) -> ocp.CheckpointManager:
        """The manager of this plugin's directory, created (and cleaned) on first use."""
        directory = self.checkpoint_dir(trainer).absolute()
        if self._manager is not None and self._manager_dir == directory:
            return self._manager
        self._close()
        if trainer.is_main_process:
            directory.mkdir(parents=True, exist_ok=True)
            _remove_uncommitted(directory, warn=True)
            _rmtree(directory / TRASH_DIR)
        trainer.strategy.barrier("nnx_trainer_checkpoint_open")
        self._manager = ocp.CheckpointManager(directory, options=self._options())
        self._manager_dir = directory
        return self._manager

    def _close(self) -> None:
        """Wait for the last save, close the manager and empty the trash."""
        manager, self._manager = self._manager, None
        if manager is not None:
            try:
                manager.close()
            finally:
                for thread in self._janitors:
                    thread.join()
                self._janitors.clear()
                if self._manager_dir is not None and jax.process_index() == 0:
                    _rmtree(self._manager_dir / TRASH_DIR)

    def _empty_trash_in_background(self) -> None:
        """Delete what retention renamed into the trash, off the training thread."""
        self._janitors = [t for t in self._janitors if t.is_alive()]
        trash = self._manager_dir / TRASH_DIR if self._manager_dir is not None else None
        if trash is None or jax.process_index() != 0 or not trash.is_dir():
            return
        doomed = [trash / name for name in _listdir(trash)]
        if not doomed:
            return

        def remove() -> None:
            for path in doomed:
                _rmtree(path)

        thread = threading.Thread(target=remove, name="checkpoint-trash", daemon=True)
        thread.start()
        self._janitors.append(thread)

    # ---------------------------------------------------------------- saving

    def _due(self, trainer: Trainer) -> None:
        """Make a periodic save that came due, through the hook so other plugins see it."""
        reason, self._pending = self._pending, None
        if reason is None:
            return
        if self._too_soon(trainer):
            self.skipped_steps.append(trainer.global_step)
            log.debug("skipping the %s save of step %d: less than %s s after the last save",
                      reason, trainer.global_step, self.min_seconds_between_saves)
            return
        trainer.hook.on_save_checkpoint(trainer=trainer, step=trainer.global_step, reason=reason)

    def _too_soon(self, trainer: Trainer) -> bool:
        """A periodic save within ``min_seconds_between_saves`` of the last, and no new best."""
        if not self.min_seconds_between_saves or self._last_save is None:
            return False
        if trainer.global_step == self._amendable_step:
            return False  # the owed save that adds a resumed step's metric
        if self._clock() - self._last_save >= self.min_seconds_between_saves:
            return False
        return not self._may_be_best(trainer)

    def _may_be_best(self, trainer: Trainer) -> bool:
        """Whether this step's monitored value would be kept among the best ``keep_best``."""
        if not (self.monitor and self.keep_best):
            return False
        logged = self._values.get(self.monitor)
        if logged is None or logged[0] != trainer.global_step or not math.isfinite(logged[1]):
            return False
        if self._saved_values is None:
            # Once per fit: the values of the committed checkpoints (an async save in
            # flight has no readable metrics yet, so let it commit first).
            manager = self._open(trainer)
            manager.wait_until_finished()
            values = [_metric_of(manager.metrics(s), self.monitor) for s in manager.all_steps()]
            self._saved_values = [v for v in values if v is not None and math.isfinite(v)]
        kept = sorted(self._saved_values, reverse=self.mode == "max")
        if len(kept) < self.keep_best:
            return True
        worst_kept = kept[self.keep_best - 1]
        return logged[1] < worst_kept if self.mode == "min" else logged[1] > worst_kept

    def _saved_part(self, state: Mapping[str, Any]) -> Any:
        return {"model": state["train"][0]} if self.weights_only else state

    def save(self, trainer: Trainer) -> bool:
        """Write ``trainer.checkpoint_state()`` as step ``trainer.global_step``.

        Returns False when nothing was written: the step is already saved, or the
        state is not finite (a warning says so).
        """
        step = trainer.global_step
        manager = self._open(trainer)
        if step in manager.all_steps():
            if step == self._amendable_step:
                self._amendable_step = None
                self._amend_metrics(trainer, manager, step)
            log.debug("checkpoint for step %d already exists", step)
            return False
        ckpt = trainer.checkpoint_state()
        state = self._saved_part(ckpt["state"])
        if not bool(_all_finite(_floating_leaves(state))):
            log.warning(
                "not saving the checkpoint of step %d: the training state has NaN or infinite "
                "values; the last good checkpoint stays the latest", step,
            )
            return False
        meta = dict(ckpt["meta"])
        meta["checkpoint"] = {
            "format": FORMAT_VERSION, "weights_only": self.weights_only,
            "batch_size": trainer.batch_size, "steps_per_epoch": trainer.steps_per_epoch,
            "worker_count": trainer.worker_count,
        }
        meta = _jsonable(meta)
        metrics = None
        if self.monitor:
            logged = self._values.get(self.monitor)
            metrics = {}
            if logged is not None and logged[0] == step and math.isfinite(logged[1]):
                metrics[self.monitor] = logged[1]
        # Orbax waits for the previous save here anyway; after it, what retention
        # renamed into the trash can go (in the background).
        manager.wait_until_finished()
        self._empty_trash_in_background()
        self._last_save = self._clock()
        if metrics and self._saved_values is not None:
            self._saved_values.append(metrics[self.monitor])
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            metrics=metrics,
            force=True,
        )
        self.saved_steps.append(step)
        return True

    def _amend_metrics(self, trainer: Trainer, manager: ocp.CheckpointManager, step: int) -> None:
        """Give the checkpoint this fit resumed from the monitored value logged at its step.

        A preemption on an epoch's last batch saves before that epoch's validation, so
        its checkpoint has no validation metric. The resumed fit runs the validation at
        the same step and asks for the epoch save owed there: same step, same state, so
        only the metric is added (the ``metrics`` item orbax reads, replaced atomically)
        and best-K ranks the step as if the run had never stopped.
        """
        logged = self._values.get(self.monitor) if self.monitor else None
        if logged is None or logged[0] != step or not math.isfinite(logged[1]):
            return
        stored = manager.metrics(step)
        if _metric_of(stored, self.monitor) is not None or self._manager_dir is None:
            return
        path = self._manager_dir / str(step) / METRICS_ITEM / METRICS_ITEM
        if not path.is_file():  # saved without a monitor: orbax tracks no metrics for it
            return
        if trainer.is_main_process:
            metrics = {**(stored if isinstance(stored, Mapping) else {}),
                       self.monitor: logged[1]}
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(metrics))
            os.replace(tmp, path)
            log.info("checkpoint of step %d: recorded %s = %s", step, self.monitor, logged[1])
        trainer.strategy.barrier("nnx_trainer_checkpoint_metrics")
        manager.reload()  # retention reads the metrics orbax holds in memory

    # ------------------------------------------------------------ fit hooks

    @hookimpl
    def on_fit_start(self, trainer: Trainer) -> None:
        """Open the directory; refuse to mix a fresh run with an earlier run's steps."""
        restored, self._restored_this_fit = self._restored_this_fit, False
        resumed, self._resumed_from = self._resumed_from, None
        owed, self._resume_pending = self._resume_pending, None
        # A save the restored step owed (see restore_checkpoint) is made at the next
        # boundary, after the validation the engine runs first.
        self._pending = owed if restored else None
        self._amendable_step = resumed if self._pending else None
        # The throttle counts from the fit's start: the first periodic save comes at the
        # first cadence point at least min_seconds_between_saves in.
        self._last_save = self._clock()
        self._saved_values = None
        self.skipped_steps = []
        if trainer.fast_dev_run:
            return
        manager = self._open(trainer)
        # Compile the finite check now, not inside the first save of the loop.
        _all_finite(_floating_leaves(self._saved_part(trainer.checkpoint_state()["state"])))
        steps = list(manager.all_steps())
        directory = self._manager_dir
        if not restored and steps and trainer.global_step == 0:
            # A fresh run in a used directory: its "last" must never be the old run's.
            # Move the old steps aside (not deleted; orbax ignores non-step names).
            aside = directory / f"_earlier-{time.strftime('%Y%m%d-%H%M%S')}"
            if trainer.is_main_process:
                log.warning(
                    "%s holds checkpoints (steps %s) of an earlier run and this fit starts "
                    "fresh: moving them to %s (to continue that run instead, pass "
                    "ckpt_path='last')", directory, _fmt_steps(steps), aside,
                )
                aside.mkdir(parents=True, exist_ok=True)
                for step in steps:
                    os.replace(directory / str(step), aside / str(step))
            trainer.strategy.barrier("nnx_trainer_checkpoint_aside")
            manager.reload()
            return
        newer = [s for s in steps if s > trainer.global_step]
        if newer and resumed is not None:
            log.warning(
                "resumed from step %d of %s: deleting its later steps %s, which belong to "
                "the run being replaced", trainer.global_step, directory, _fmt_steps(newer),
            )
            for s in newer:
                manager.delete(s)
                if trainer.is_main_process:
                    _rmtree(directory / TRASH_DIR / str(s))
        elif newer:
            log.warning(
                "%s holds steps %s, later than the current step %d; new saves of those "
                "steps will be skipped", directory, _fmt_steps(newer), trainer.global_step,
            )

    @hookimpl
    def on_train_batch_start(self, trainer: Trainer) -> None:
        """A step save that came due after the previous step (and its validation) is made now."""
        self._due(trainer)

    @hookimpl
    def on_train_batch_end(self, trainer: Trainer) -> None:
        """Step cadence: mark a save due (made at the next boundary, after validation)."""
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._pending = "step"

    @hookimpl
    def on_train_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        """Epoch cadence: mark a save due once the epoch is closed and validated."""
        if self.every_n_epochs and (epoch + 1) % self.every_n_epochs == 0:
            self._pending = "epoch"

    @hookimpl
    def on_train_epoch_start(self, trainer: Trainer) -> None:
        """The previous epoch is closed (counters at the new epoch) and validated: save."""
        self._due(trainer)

    @hookimpl
    def log_metrics(self, trainer: Trainer, metrics: Mapping[str, Any], step: int) -> None:
        """Remember the monitored value and its step, to store with that step's checkpoint."""
        if not self.monitor:
            return
        if self.monitor in metrics:
            try:
                self._values[self.monitor] = (int(step), float(metrics[self.monitor]))
            except (TypeError, ValueError):
                pass
        elif (
            not self._warned_monitor and trainer.is_main_process
            and any(k.startswith("val/") for k in metrics)
            and self.monitor.startswith("val/")
        ):
            self._warned_monitor = True
            log.warning(
                "checkpoint monitor %r is not among the validation metrics (%s); "
                "checkpoints get no metric, so none can be kept or chosen as best",
                self.monitor, ", ".join(sorted(metrics)),
            )

    @hookimpl(trylast=True)
    def on_save_checkpoint(self, trainer: Trainer, reason: str) -> None:
        """Write the checkpoint (after every other plugin saw the request)."""
        pending, self._pending = self._pending, None
        if trainer.fast_dev_run:
            return
        if reason == "end" and not (self.save_on_end or pending):
            return
        self.save(trainer)
        if reason == "preemption":
            # The process is about to exit: commit now (the engine waits anyway, and
            # gets no on_fit_end to close us).
            self._close()

    @hookimpl
    def wait_for_checkpoints(self) -> None:
        """Block until every asynchronous save is committed."""
        if self._manager is not None:
            self._manager.wait_until_finished()

    @hookimpl
    def on_fit_end(self) -> None:
        """Close the manager (waits for the last save)."""
        self._close()

    @hookimpl
    def on_exception(self, exception: BaseException) -> None:
        """Let a save in flight commit, then close; never mask the original error."""
        self._pending = None
        try:
            self._close()
        except Exception as exc:  # the run's own exception matters more
            log.warning("closing the checkpoint manager after %r failed: %r", exception, exc)

    # ----------------------------------------------------------------- restore

    @hookimpl
    def restore_checkpoint(
        self, trainer: Trainer, ckpt_path: str, target: Mapping[str, Any]
    ) -> Mapping[str, Any]:
        """``{"state", "meta"}`` of the checkpoint ``ckpt_path`` on ``target``'s shardings."""
        manager, step, owned = self._locate(trainer, ckpt_path)
        if manager is None:
            return {}
        try:
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = dict(meta["meta"])
            info = meta.get("checkpoint", {})
            where = manager.directory / str(step)
            if info.get("weights_only"):
                if trainer.stage == "fit":
                    raise ValueError(
                        f"{where} was saved with weights_only=True: it has no optimizer state, "
                        "step counters or data position, so fit cannot resume from it; resume "
                        "from a full checkpoint, or evaluate it with trainer.validate/test/"
                        "predict(task, ckpt_path=...)"
                    )
                restored = manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore({"model": target["state"]["train"][0]})
                ))
                current = trainer.checkpoint_state()["state"]
                train = jax.tree.map(lambda x: x, current["train"])
                train[0] = restored["state"]["model"]
                state = {"train": train, "train_metrics": current["train_metrics"]}
            else:
                state = self._restore_arrays(trainer, manager, step, target["state"])
        finally:
            if not owned:
                manager.close()
            elif trainer.stage != "fit":
                self._close()  # evaluation: nothing more to write
        if trainer.stage == "fit":
            self._check_compatible(trainer, meta, where)
            self._restored_this_fit = True
            self._resumed_from = step if owned else None
            # Preempted on an epoch's last batch: the engine runs that epoch's validation
            # first, and the epoch save it was followed by is still owed (its checkpoint
            # is this step's, which then gets the monitored value: _amend_metrics).
            epoch = meta.get("epoch")
            self._resume_pending = "epoch" if (
                meta.get("validation_pending") and self.every_n_epochs
                and isinstance(epoch, int) and epoch % self.every_n_epochs == 0
            ) else None
        if trainer.is_main_process:
            log.info("restored checkpoint %s (step %d)", where, step)
        return {"state": state, "meta": meta}

    def _restore_arrays(
        self, trainer: Trainer, manager: ocp.CheckpointManager, step: int,
        target: Mapping[str, Any],
    ) -> Any:
        """The ``state`` item onto ``target``; plugin arrays only where both sides have them.

        The saved item's metadata says which plugin keys it holds. A key this run asks
        for that is not there (the plugin was off, or the checkpoint predates plugin
        arrays) is left out with a warning: that plugin keeps its fresh state. A saved
        key no plugin of this run asks for stays on disk, unread.
        """
        item_dir = manager.directory / str(step) / "state"
        handler = ocp.StandardCheckpointHandler()  # the handler of the saved "state" item
        try:
            saved_tree = handler.metadata(item_dir).tree
        finally:
            handler.close()
        saved_plugins = saved_tree.get("plugins") if isinstance(saved_tree, Mapping) else None
        saved = set(saved_plugins) if isinstance(saved_plugins, Mapping) else set()
        wanted = dict(target.get("plugins") or {})
        item = {k: v for k, v in target.items() if k != "plugins"}
        common = {k: v for k, v in wanted.items() if k in saved}
        if common:
            item["plugins"] = common
        missing = sorted(set(wanted) - saved)
        if missing and trainer.is_main_process:
            log.warning(
                "%s holds no plugin arrays for %s (saved without that plugin, or before "
                "plugins could save arrays): those start from their fresh state",
                manager.directory / str(step), ", ".join(map(repr, missing)),
            )
        unused = sorted(saved - set(wanted))
        if not unused:
            restored = manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(item))
            )
            return restored["state"]
        if trainer.is_main_process:
            log.info(
                "%s: not restoring plugin arrays %s (no plugin of this run asks for them)",
                manager.directory / str(step), ", ".join(map(repr, unused)),
            )
        # Orbax's standard restore reads whole trees only: a partial PyTree restore
        # reads just the arrays of ``item``, onto its shardings.
        with ocp.PyTreeCheckpointer() as reader:
            return reader.restore(item_dir, args=ocp.args.PyTreeRestore(
                item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                partial_restore=True,
            ))

    def _check_compatible(self, trainer: Trainer, meta: Mapping[str, Any], where: Path) -> None:
        # The data position is (epoch, batch_in_epoch): any worker_count continues it.
        info = meta.get("checkpoint", {})
        now = {"seed": trainer.seed, "batch_size": trainer.batch_size,
               "steps_per_epoch": trainer.steps_per_epoch}
        then = {"seed": meta.get("seed"), "batch_size": info.get("batch_size"),
                "steps_per_epoch": info.get("steps_per_epoch")}
        changed = [f"{k} {then[k]} -> {now[k]}" for k in now
                   if then[k] is not None and then[k] != now[k]]
        if changed and trainer.is_main_process:
            log.warning(
                "resuming %s with a different %s: the data order and position will not "
                "continue the checkpointed run exactly", where, ", ".join(changed),
            )

    def _locate(
        self, trainer: Trainer, ckpt_path: str
    ) -> tuple[ocp.CheckpointManager | None, int, bool]:
        """(manager, step, whether the manager is this plugin's own) for ``ckpt_path``."""
        own_dir = self.checkpoint_dir(trainer).absolute()
        if ckpt_path == "last":
            # Opening the directory removes uncommitted leftovers (with a warning each).
            step = self._open(trainer).latest_step() if own_dir.is_dir() else None
            if step is None:
                log.warning("ckpt_path='last': no checkpoint in %s; starting fresh", own_dir)
                return None, 0, False
            return self._manager, step, True
        if ckpt_path == "best":
            if not self.monitor:
                raise ValueError(
                    "ckpt_path='best' needs a metric to rank checkpoints: configure "
                    "OrbaxCheckpoint(monitor='val/loss', ...) (or pass ckpt_path='last' or a path)"
                )
            if not _has_entries(own_dir):
                raise ValueError(f"ckpt_path='best': no checkpoint in {own_dir}")
            manager = self._open(trainer)
            return manager, self._best_step(manager), True
        path = Path(ckpt_path).expanduser().absolute()
        if TMP_MARKER in path.name:
            raise ValueError(
                f"{ckpt_path} is an uncommitted checkpoint (a save that did not finish); "
                f"pick a committed step directory next to it, or ckpt_path='last'"
            )
        if not path.is_dir():
            raise ValueError(
                f"ckpt_path {ckpt_path!r} is not 'last', 'best' or an existing directory; "
                "give a checkpoint step directory (e.g. runs/<run>/checkpoints/120) or a "
                "checkpoints directory (its latest step is used)"
            )
        if _STEP_NAME.match(path.name) and (path / "state").is_dir():
            directory, step = path.parent, int(path.name)
            if not (path / COMMIT_FILE).exists():
                raise ValueError(f"{ckpt_path} is not a committed checkpoint (no {COMMIT_FILE})")
        else:
            directory, step = path, None
        owned = directory == own_dir
        if owned:
            manager = self._open(trainer)
        else:
            _remove_uncommitted(directory, warn=True, remove=False)  # someone else's: leave it
            manager = ocp.CheckpointManager(directory, options=self._options(read_only=True))
        if step is None:
            step = manager.latest_step()
            if step is None:
                if not owned:
                    manager.close()
                raise ValueError(
                    f"no committed checkpoint in {directory}; give a step directory or "
                    "another checkpoints directory"
                )
        elif step not in manager.all_steps():
            if not owned:
                manager.close()
            raise ValueError(f"{path} is not a committed checkpoint of {directory}")
        return manager, step, owned

    def _best_step(self, manager: ocp.CheckpointManager) -> int:
        sign = 1.0 if self.mode == "min" else -1.0
        scored = []
        for step in manager.all_steps():
            value = _metric_of(manager.metrics(step), self.monitor)
            if value is not None:
                scored.append((sign * value, step))
        if not scored:
            raise ValueError(
                f"ckpt_path='best': no checkpoint in {manager.directory} has a {self.monitor!r} "
                "value (it is stored with checkpoints saved at a step where it was logged, "
                "e.g. after epoch-end validation); use ckpt_path='last' or a path"
            )
        return min(scored)[1]

    # ------------------------------------------------------------------ misc

    def __repr__(self) -> str:
        return (
            f"OrbaxCheckpoint(every_n_steps={self.every_n_steps}, "
            f"every_n_epochs={self.every_n_epochs}, monitor={self.monitor!r}, mode={self.mode!r}, "
            f"keep_best={self.keep_best}, keep_last={self.keep_last}, "
            f"weights_only={self.weights_only}, async_save={self.async_save})"
        )


def _listdir(path: Path) -> list[str]:
    try:
        return sorted(p.name for p in path.iterdir())
    except FileNotFoundError:
        return []


def _has_entries(path: Path) -> bool:
    return path.is_dir() and any(_STEP_NAME.match(n) for n in _listdir(path))


def _fmt_steps(steps: Sequence[int]) -> str:
    steps = sorted(steps)
    return ", ".join(map(str, steps)) if len(steps) <= 8 else (
        f"{', '.join(map(str, steps[:3]))}, ..., {', '.join(map(str, steps[-3:]))}"
    )


def _remove_uncommitted(directory: Path, *, warn: bool, remove: bool = True) -> list[Path]:
    """Find (and remove) saves that never committed: ``*.orbax-checkpoint-tmp*`` entries and
    step directories without orbax's commit file. Returns what was found."""
    found = []
    for name in _listdir(directory):
        path = directory / name
        if TMP_MARKER in name:
            found.append(path)
        elif _STEP_NAME.match(name) and path.is_dir() and not (path / COMMIT_FILE).exists():
            found.append(path)
    for path in found:
        if warn:
            log.warning(
                "skipping %s: an uncommitted checkpoint (a save interrupted before it "
                "finished)%s", path, "; removing it" if remove else "",
            )
        if remove:
            _rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return found
