"""What a checkpoint holds, what it restores onto, and how a restore or ``init_from`` lands.

The checkpoint plugin writes and reads; this module decides the content: the state,
the training metrics, the plugins' arrays and JSON state, and the counters that are
the data position (:meth:`FitProgress.to_meta`).
"""

from __future__ import annotations

import logging
from typing import Any

import jax

from nnx_trainer import init_from as init_from_lib
from nnx_trainer.run_context import RunContext
from nnx_trainer.state import CheckpointContent, TrainState

log = logging.getLogger("nnx_trainer")


def plugin_arrays(ctx: RunContext) -> dict[str, Any]:
    """Every plugin's ``array_state_dict``, merged."""
    arrays: dict[str, Any] = {}
    for part in ctx.hook.array_state_dict(trainer=ctx.view):
        arrays.update(part or {})
    return arrays


def checkpoint_content(ctx: RunContext) -> CheckpointContent:
    """Everything a checkpoint holds, with named fields (arrays and JSON meta)."""
    plugin_state: dict[str, Any] = {}
    for part in ctx.hook.state_dict(trainer=ctx.view):
        plugin_state.update(part or {})
    state = ctx.model.state
    return CheckpointContent(
        model=state.model, optimizer=state.optimizer,
        train_metrics=ctx.model.train_metrics, plugin_arrays=plugin_arrays(ctx),
        meta=ctx.progress.to_meta(ctx.seed, plugin_state),
    )


def checkpoint_target(ctx: RunContext) -> dict[str, Any]:
    """The abstract arrays of a checkpoint (shapes, dtypes, shardings) to restore onto."""
    def abstract(x, sharding):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    state, shardings = ctx.model.state, ctx.model.shardings
    train_metrics = ctx.model.train_metrics
    metrics_shardings = ctx.strategy.state_shardings(train_metrics)
    target = {
        "model": jax.tree.map(abstract, state.model, shardings.model),
        "optimizer": jax.tree.map(abstract, state.optimizer, shardings.optimizer),
        "train_metrics": jax.tree.map(abstract, train_metrics, metrics_shardings),
    }
    arrays = plugin_arrays(ctx)
    if arrays:  # each array restores onto its own current sharding
        target["plugins"] = jax.tree.map(lambda x: abstract(x, x.sharding), arrays)
    return target


def restore(ctx: RunContext, ckpt_path: str | None) -> bool:
    """Restore checkpoint ``ckpt_path`` through the checkpoint plugin: state, training
    metrics, counters, plugin state. False when there is none to restore."""
    if ckpt_path is None:
        return False
    restored = ctx.hook.restore_checkpoint(
        trainer=ctx.view, ckpt_path=str(ckpt_path), target=checkpoint_target(ctx)
    )
    if restored is None:
        raise ValueError(
            f"ckpt_path={ckpt_path!r} given but no checkpoint plugin is active; "
            "enable the 'checkpoint' plugin or drop ckpt_path"
        )
    if not restored:
        return False
    ctx.model.state = TrainState(model=restored.model, optimizer=restored.optimizer)
    ctx.model.train_metrics = restored.train_metrics
    ctx.model.trained = True
    ctx.progress.load_meta(restored.meta, restored.source)
    ctx.hook.load_state_dict(trainer=ctx.view, state=dict(restored.meta.plugins))
    ctx.hook.load_array_state_dict(trainer=ctx.view, state=dict(restored.plugin_arrays))
    return True


def apply_init_from(
    ctx: RunContext, init_from: Any, *, report: bool
) -> init_from_lib.InitReport | None:
    """``fit(init_from=...)``: copy matching parameters and batch statistics into the
    model state, nothing else; ``report``: log the report (main process)."""
    if init_from is None:
        return None
    tensors, source = init_from_lib.read_weights(init_from)
    state = ctx.model.state
    model_state, init_report = init_from_lib.partial_state(
        state.model, ctx.task.import_weights(tensors), source)
    ctx.model.place(TrainState(model_state, state.optimizer))
    if report:
        (log.warning if init_report.skipped else log.info)("%s", init_report.summary())
    return init_report


def resume(ctx: RunContext, ckpt_path: str | None) -> None:
    """:func:`restore` for a fit, logging where it resumes."""
    if restore(ctx, ckpt_path):
        progress = ctx.progress
        # INFO: the progress plugin prints the same line, numbered the same way
        # (1-based epoch of the epochs this fit runs), for whoever watches the run.
        log.info("resumed from %s at step %d (epoch %d/%d, %d of its batches done)",
                 progress.resumed_from or ckpt_path, progress.global_step,
                 progress.epoch + 1, ctx.plan.epochs_to_run(), progress.batch_in_epoch)
