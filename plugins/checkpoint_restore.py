"""Reading a checkpoint step for the checkpoint plugin: verified, damaged steps stepped
over, another model named. Not a plugin (nothing here is registered).

- :func:`read_newest_intact` reads the step ``pick()`` names; a step that does not read
  or verify (``checkpoint_integrity``) is moved aside and ``pick`` asked again when no
  step was named, refused (``ValueError`` with the fix) when one was.
- Every process agrees on each verdict (each reads its own shards), so all resume from
  the same step; only process 0 moves directories.
- Before any data is read, the saved arrays' shapes and dtypes (Orbax metadata) are
  compared with this run's: another model fails naming the first differing array.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nnx_trainer_plugins.checkpoint_integrity import (
    DamagedCheckpoint,
    array_leaves,
    describe,
    refusal,
    set_aside,
    structure_problem,
    tree_problem,
    verify_arrays,
    verify_meta,
)
from nnx_trainer_plugins.checkpoint_layout import log


def read_newest_intact(manager: Any, pick: Any, target: Mapping[str, Any], trainer: Any, *,
                       fallback: bool, moved: list[tuple[int, Path]]) -> tuple | None:
    """``(step, meta, arrays)`` of the first step ``pick()`` names that reads and verifies.

    With ``fallback`` a damaged step is moved aside (process 0, appended to ``moved``)
    and ``pick`` asked again once every process sees it gone; without, it is refused.
    None: ``pick`` found nothing (left).
    """
    directory = Path(manager.directory)
    while (step := pick()) is not None:
        try:
            return (step, *read_step(manager, step, target, trainer))
        except DamagedCheckpoint as damage:
            if not fallback:
                raise refusal(damage, directory) from None
            if trainer.is_main_process:
                moved.append((step, set_aside(directory, damage)))
            trainer.strategy.barrier("nnx_trainer_checkpoint_damaged")
            manager.reload()
    return None


def refuse_if_incomplete(directory: Path, step: int) -> None:
    """Refuse an explicitly named step that lacks what a committed step holds."""
    step_dir = directory / str(step)
    if step_dir.is_dir() and (problem := structure_problem(step_dir)):
        raise refusal(DamagedCheckpoint(step, *problem), directory)


# ---------------------------------------------------------------------- reading


def read_step(manager: Any, step: int, target: Mapping[str, Any],
              trainer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(meta, arrays)`` of committed ``step``, verified; raises :class:`DamagedCheckpoint`
    (agreed by every process) or ``ValueError`` (another model, a weights-only step in fit).
    """
    step_dir = Path(manager.directory) / str(step)
    damage, stored = None, None
    try:
        if problem := structure_problem(step_dir) or tree_problem(step_dir):
            raise DamagedCheckpoint(step, *problem)
        meta, arrays, verified = _read(manager, step_dir, step, target, trainer)
        stored = verify_meta(meta, step)
    except DamagedCheckpoint as exc:
        damage = exc
    damage = damaged_elsewhere(damage, step)
    if damage is None and stored is not None:
        try:  # on the global arrays: every process computes the same answer
            verify_arrays(verified, stored, step)
        except DamagedCheckpoint as exc:
            damage = exc
    if damage is not None:
        raise damage
    return meta, arrays


def _orbax(step_dir: Path, step: int, item: str, read: Any) -> Any:
    try:
        return read()
    except Exception as exc:  # Orbax/TensorStore say ValueError, KeyError, OSError...
        raise DamagedCheckpoint(step, *describe(exc, step_dir, item)) from exc


def _read(manager: Any, step_dir: Path, step: int, target: Mapping[str, Any],
          trainer: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    import orbax.checkpoint as ocp

    from nnx_trainer_plugins import checkpoint_layout as layout

    meta = dict(_orbax(step_dir, step, "meta/metadata", lambda: manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]))
    saved_tree = _orbax(step_dir, step, "state/_METADATA",
                        lambda: layout.saved_tree(step_dir / "state"))
    if not (meta.get("checkpoint") or {}).get("weights_only"):
        check_same_model(saved_tree, target, step_dir)
        arrays = _orbax(step_dir, step, "state/", lambda: layout.restore_arrays(
            manager, step, target, trainer.is_main_process, saved_tree))
        return meta, arrays, arrays
    if trainer.stage == "fit":
        raise ValueError(
            f"{step_dir} was saved with weights_only=True: it has no optimizer state, step "
            "counters or data position, so fit cannot resume from it; resume from a full "
            "checkpoint, or evaluate it with trainer.validate/test/predict(task, ckpt_path=...)")
    check_same_model({"model": saved_tree.get("model", {})}, {"model": target["model"]},
                     step_dir)
    model = _orbax(step_dir, step, "state/", lambda: manager.restore(step, args=(
        ocp.args.Composite(state=ocp.args.StandardRestore({"model": target["model"]}))
    ))["state"]["model"])
    arrays = {**trainer.checkpoint_state().arrays(), "model": model}
    arrays.pop("plugins", None)  # plugins keep their own state
    return meta, arrays, {"model": model}


# ----------------------------------------------------------------------- agreement


def damaged_elsewhere(damage: DamagedCheckpoint | None, step: int) -> DamagedCheckpoint | None:
    """Every process's verdict on one read, agreed (each process reads its own shards)."""
    if jax.process_count() == 1:
        return damage
    from jax.experimental import multihost_utils

    failed = np.asarray(multihost_utils.process_allgather(np.int32(damage is not None)))
    if damage is None and failed.any():
        damage = DamagedCheckpoint(step, "state/", f"process {int(np.argmax(failed))} "
                                   "could not read its part")
    return damage


# ------------------------------------------------------------------ another model


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], str]:
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        # Orbax stores a typed PRNG key (an nnx.RngStream's, e.g. nnx.Dropout(rngs=...))
        # as its key data, uint32 words, and its metadata says so: compare those.
        x = jax.eval_shape(jax.random.key_data, x)
        dtype = x.dtype
    return tuple(getattr(x, "shape", ())), str(dtype) if dtype is not None else "?"


def check_same_model(saved_tree: Any, target: Mapping[str, Any], where: Path) -> None:
    """Raise naming the first array of ``target`` (model, optimizer, metrics) the
    checkpoint holds with another shape or dtype, or lacks; plugins are matched apart."""
    saved = dict(array_leaves({k: v for k, v in dict(saved_tree).items() if k != "plugins"}))
    wanted = array_leaves({k: v for k, v in target.items() if k != "plugins"})
    diffs = []
    for path, x in wanted:
        if path not in saved:
            diffs.append(f"{path} is {_fmt(x)} in this run but not in the checkpoint")
        elif _shape_dtype(saved[path]) != _shape_dtype(x):
            diffs.append(f"{path} is saved as {_fmt(saved[path])} but this run's is {_fmt(x)}")
    extra = sorted(set(saved) - {p for p, _ in wanted})
    diffs += [f"the checkpoint holds {p} ({_fmt(saved[p])}), which this run lacks"
              for p in extra]
    if diffs:
        more = f" (and {len(diffs) - 1} more differing arrays)" if len(diffs) > 1 else ""
        raise ValueError(
            f"{where} holds a different model or optimizer than this run builds: "
            f"{diffs[0]}{more}. Resume with the configuration that wrote it (its run "
            "directory's config.yaml), or start this model in a new run directory "
            "(or without ckpt_path)")


def _fmt(x: Any) -> str:
    shape, dtype = _shape_dtype(x)
    return f"{shape} {dtype}"


# ------------------------------------------------------------------------ messages


def say_restored(trainer: Any, ckpt_path: str, where: Path, step: int,
                 moved: list[tuple[int, Path]]) -> None:
    """Name the step restored; after a fallback (WARNING) also the steps moved aside."""
    if trainer.is_main_process:
        log.log(logging.WARNING if moved else logging.INFO,
                "ckpt_path=%r: restored %s (step %d)%s", ckpt_path, where, step,
                "" if not moved else ", the newest intact checkpoint; damaged, moved "
                "aside: " + ", ".join(f"step {s} to {p}" for s, p in moved))


def say_fresh(trainer: Any, ckpt_path: str, directory: Path,
              moved: list[tuple[int, Path]]) -> dict[str, Any]:
    """Nothing (intact) to resume: say so (a WARNING, so that it shows without logging set
    up: a requeued job's ``"auto"`` says which it did); ``moved`` is emptied."""
    if trainer.is_main_process:
        log.warning("ckpt_path=%r: no %scheckpoint in %s; starting fresh", ckpt_path,
                    "intact " if moved else "", directory)
    moved.clear()
    return {}
