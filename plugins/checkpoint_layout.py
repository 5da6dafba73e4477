"""Directory layout of the checkpoint plugin: what Orbax's ``CheckpointManager`` does not do.

Not a plugin (nothing here is registered): the pieces of ``plugins/orbax_checkpoint.py``
that deal with directories and what a step directory holds, rather than with when and
how Orbax writes.

- Resolving ``ckpt_path`` (``"last"``, ``"best"``, a step directory, a checkpoints
  directory) to a directory and a step, with errors that say what to pass instead.
- Naming uncommitted saves (``<step>.orbax-checkpoint-tmp*``) in a warning before Orbax's
  ``cleanup_tmp_directories`` removes them silently (the design's reliability rule: a
  partial checkpoint is skipped *with a warning naming it*). In someone else's directory
  they are only named, never removed.
- Moving an earlier run's steps aside when a fit starts fresh in a used directory, and
  dropping the later steps of a continuation being replaced: Orbax keeps any step it
  finds, so ``"last"`` (and ``should_save``, which refuses steps at or below the latest)
  would otherwise follow the wrong run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

log = logging.getLogger("nnx_trainer.checkpoint")

TMP_MARKER = ".orbax-checkpoint-tmp"  # orbax 0.12: "<step>.orbax-checkpoint-tmp[-<stamp>]"
STEP_NAME = re.compile(r"^(0|[1-9]\d*)$")


def listdir(path: Path) -> list[str]:
    try:
        return sorted(p.name for p in path.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def has_steps(path: Path) -> bool:
    return path.is_dir() and any(STEP_NAME.match(n) for n in listdir(path))


def fmt_steps(steps: Sequence[int]) -> str:
    steps = sorted(steps)
    return ", ".join(map(str, steps)) if len(steps) <= 8 else (
        f"{', '.join(map(str, steps[:3]))}, ..., {', '.join(map(str, steps[-3:]))}"
    )


def warn_uncommitted(directory: Path, *, removing: bool) -> list[Path]:
    """Name every save that never committed (Orbax's tmp directories) in a warning."""
    found = [directory / n for n in listdir(directory) if TMP_MARKER in n]
    for path in found:
        log.warning(
            "skipping %s: an uncommitted checkpoint (a save interrupted before it "
            "finished)%s", path, "; removing it" if removing else "",
        )
    return found


def metric_of(metrics: Any, monitor: str | None) -> float | None:
    """The finite float under ``monitor`` in a checkpoint's metrics, else None."""
    if not monitor or not isinstance(metrics, Mapping) or monitor not in metrics:
        return None
    try:
        value = float(metrics[monitor])
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def check_monitor(monitor: str, metrics: Mapping[str, Any],
                  callback_metrics: Mapping[str, Any]) -> None:
    """Refuse a ``monitor`` that names none of the metrics logged with a validation's.

    After the first validation every evaluation metric has a name; a monitor that is
    none of them (a typo, Lightning's ``"val_loss"``) would rank nothing, so it is
    refused as ``EarlyStopping`` refuses it, in every process alike. A ``train/``
    monitor is not judged here: train metrics are logged on their own cadence.
    """
    if monitor.startswith("train/") or not any(k.startswith("val/") for k in metrics):
        return
    names = sorted({*metrics, *callback_metrics})
    if monitor not in names:
        raise ValueError(
            f"checkpoint monitor {monitor!r}: no metric of that name after validation; "
            f"available: {', '.join(names)}. Set monitor to one of these (validation "
            "metrics are prefixed 'val/'; --plugins.checkpoint.monitor on the command line)")


def resolve(ckpt_path: str, own_dir: Path, monitor: str | None) -> tuple[Path, int | None]:
    """``(checkpoints directory, step or None for "latest/best there")`` of ``ckpt_path``.

    ``"last"``/``"best"``/``"auto"`` name this plugin's own directory; a path is a step directory
    (``run/checkpoints/120``) or a checkpoints directory. Raises with the fix when the
    path cannot be a checkpoint; whether the step is committed is Orbax's answer (its
    ``all_steps`` lists finalized steps only), checked by the caller.
    """
    if ckpt_path in ("last", "best", "auto"):
        if ckpt_path == "best" and not monitor:
            raise ValueError(
                "ckpt_path='best' needs a metric to rank checkpoints: configure "
                "OrbaxCheckpoint(monitor='val/loss', ...) (or pass ckpt_path='last' or a path)"
            )
        if ckpt_path == "best" and not has_steps(own_dir):
            raise ValueError(f"ckpt_path='best': no checkpoint in {own_dir}")
        return own_dir, None
    path = Path(ckpt_path).expanduser().absolute()
    if TMP_MARKER in path.name:
        raise ValueError(
            f"{ckpt_path} is an uncommitted checkpoint (a save that did not finish); "
            "pick a committed step directory next to it, or ckpt_path='last'"
        )
    if not path.is_dir():
        raise ValueError(
            f"ckpt_path {ckpt_path!r} is not 'last', 'best' or an existing directory; "
            "give a checkpoint step directory (e.g. runs/<run>/checkpoints/120) or a "
            "checkpoints directory (its latest step is used)"
        )
    if STEP_NAME.match(path.name) and not has_steps(path):
        return path.parent, int(path.name)
    return path, None


def move_earlier_run_aside(directory: Path, steps: Sequence[int], is_main: bool) -> Path:
    """A fresh fit in a used directory: move the earlier run's steps into ``_earlier-<time>``.

    Nothing is deleted, and Orbax ignores names that are not steps.
    """
    aside = directory / f"_earlier-{time.strftime('%Y%m%d-%H%M%S')}"
    if is_main:
        log.warning(
            "%s holds checkpoints (steps %s) of an earlier run and this fit starts "
            "fresh: moving them to %s (to continue that run instead, pass "
            "ckpt_path='last')", directory, fmt_steps(steps), aside,
        )
        aside.mkdir(parents=True, exist_ok=True)
        for step in steps:
            os.replace(directory / str(step), aside / str(step))
    return aside


def check_compatible(meta_checkpoint: Mapping[str, Any], seed: Any, now: Mapping[str, Any],
                     where: Path) -> None:
    """Warn when a resume changes what decides the data order and position."""
    then = {"seed": seed, **{k: meta_checkpoint.get(k) for k in now if k != "seed"}}
    changed = [f"{k} {then[k]} -> {now[k]}" for k in now
               if then.get(k) is not None and then[k] != now[k]]
    if changed:
        log.warning(
            "resuming %s with a different %s: the data order and position will not "
            "continue the checkpointed run exactly", where, ", ".join(changed),
        )


def amend_metrics(step_dir: Path, monitor: str, value: float) -> bool:
    """Add the monitored value to a committed checkpoint's ``metrics`` item (atomically).

    Still needed with the loop's single save point: a preemption on an epoch's last batch
    saves before that epoch's validation (``validation_pending``); the resumed fit runs it
    first, at the same step, but Orbax's ``should_save`` refuses a step already saved, so
    without this the step would never be ranked by best-K as in an uninterrupted run.
    Orbax has no API to change a saved step's metrics.
    """
    path = step_dir / "metrics" / "metrics"  # orbax 0.12: JSON, written when best_fn is set
    if not path.is_file():
        return False
    stored = json.loads(path.read_text() or "{}")
    if metric_of(stored, monitor) is not None:
        return False
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**stored, monitor: value}))
    os.replace(tmp, path)
    return True


# ------------------------------------------------- what a step directory holds


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray, jax.Array)):
        return np.asarray(value).tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def jsonable(meta: dict[str, Any]) -> dict[str, Any]:
    """The ``meta`` item as plain JSON types (NumPy/JAX numbers converted), or a clear error."""
    try:
        return json.loads(json.dumps(meta, default=_json_default))
    except (TypeError, ValueError) as exc:
        culprit = None
        for key, value in meta.get("plugins", {}).items():
            try:
                json.dumps(value, default=_json_default)
            except (TypeError, ValueError):
                culprit = key
                break
        where = f"the state_dict of plugin key {culprit!r}" if culprit else "the checkpoint meta"
        raise TypeError(f"{where} cannot be written as JSON ({exc}); state_dict must return "
                        "numbers, strings, lists and dicts") from exc


def pick_step(manager: Any, ckpt_path: str, step: int | None, directory: Path,
              monitor: str | None) -> int | None:
    """The step to read: the given one (if Orbax lists it as committed), the best by
    Orbax's ``best_step``, or the latest (None: ``"last"``/``"auto"`` found nothing)."""
    if step is not None:
        if step not in manager.all_steps():
            raise ValueError(f"{directory / str(step)} is not a committed checkpoint of "
                             f"{directory}")
        return step
    if ckpt_path == "best":
        best = manager.best_step()
        if best is None or metric_of(manager.metrics(best), monitor) is None:
            raise ValueError(
                f"ckpt_path='best': no checkpoint in {directory} has a {monitor!r} value "
                "(it is stored with checkpoints saved at a step where it was logged, e.g. "
                "after epoch-end validation); use ckpt_path='last' or a path")
        return best
    latest = manager.latest_step()
    if latest is None and ckpt_path not in ("last", "auto"):
        raise ValueError(f"no committed checkpoint in {directory}; give a step directory "
                         "or another checkpoints directory")
    return latest


def saved_tree(item_dir: Path) -> Any:
    """The array metadata tree (shapes, dtypes) of a saved ``state`` item; reads no data."""
    import orbax.checkpoint as ocp

    handler = ocp.StandardCheckpointHandler()
    try:
        return handler.metadata(item_dir).tree
    finally:
        handler.close()


def restore_arrays(manager: Any, step: int, target: Mapping[str, Any],
                   is_main: bool, saved_tree: Any) -> dict[str, Any]:
    """The ``state`` item onto ``target``; plugin arrays only where both sides have them.

    The saved item's metadata (``saved_tree``) says which plugin keys it holds. One this
    run asks for that is not there keeps its fresh state (named in a warning); a saved one
    no plugin of this run asks for stays on disk, unread.
    """
    import orbax.checkpoint as ocp

    item_dir = Path(manager.directory) / str(step) / "state"
    saved = set(saved_tree.get("plugins") or {}) if isinstance(saved_tree, Mapping) else set()
    wanted = dict(target.get("plugins") or {})
    item = {k: v for k, v in target.items() if k != "plugins"}
    if common := {k: v for k, v in wanted.items() if k in saved}:
        item["plugins"] = common
    if (missing := sorted(set(wanted) - saved)) and is_main:
        log.warning("%s holds no plugin arrays for %s (saved without that plugin): those "
                    "start from their fresh state", item_dir.parent,
                    ", ".join(map(repr, missing)))
    if not (unused := sorted(saved - set(wanted))):
        return dict(manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(item)))["state"])
    if is_main:
        log.info("%s: not restoring plugin arrays %s (no plugin of this run asks for them)",
                 item_dir.parent, ", ".join(map(repr, unused)))
    # Orbax's standard restore reads whole trees only: a partial PyTree restore reads
    # just the arrays of ``item``, onto its shardings.
    with ocp.PyTreeCheckpointer() as reader:
        return dict(reader.restore(item_dir, args=ocp.args.PyTreeRestore(
            item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True)))


# ---------------------------------------------------------------- options and content


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_options(*, every_n_steps: Any, every_n_epochs: Any, secs: Any, keep_best: Any,
                  keep_last: Any, monitor: Any) -> None:
    """Reject the checkpoint plugin's nonsense options with the fix."""
    for key, value in (("every_n_steps", every_n_steps), ("keep_best", keep_best)):
        if value is not None and not _positive(value):
            raise ValueError(f"{key} must be a positive integer or None, got {value!r}")
    if every_n_epochs is not None and not (_positive(every_n_epochs) or every_n_epochs == 0):
        raise ValueError("every_n_epochs must be a positive integer, 0 (no epoch saves) "
                         f"or None, got {every_n_epochs!r}")
    if isinstance(secs, bool) or not isinstance(secs, (int, float)) or not secs >= 0:
        raise ValueError("min_seconds_between_saves must be a number of seconds >= 0 (0: "
                         f"save at every epoch), got {secs!r}")
    if not _positive(keep_last):
        raise ValueError(f"keep_last must be a positive integer, got {keep_last!r} "
                         "(the latest checkpoint is what a resume needs)")
    if monitor is not None and (not isinstance(monitor, str) or not monitor):
        raise ValueError(f"monitor must be a metric name such as 'val/loss', got {monitor!r}")
    if keep_best is not None and monitor is None:
        raise ValueError(f"keep_best={keep_best} ranks checkpoints by a metric: also pass "
                         "monitor=..., e.g. OrbaxCheckpoint(monitor='val/loss', keep_best=...)")

