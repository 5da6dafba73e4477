"""Evaluation (every validation or test set, one start/end) and prediction over a built task."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
from flax import nnx

from nnx_trainer import data as data_lib
from nnx_trainer.checkpoint_content import restore
from nnx_trainer.option_checks import resolve_limit
from nnx_trainer.run_context import RunContext


def evaluate(ctx: RunContext, stage: str) -> dict[str, Any]:
    """One evaluation: every set of ``val_data()`` (or ``test_data()``), one start/end.

    A dataset gives ``val/<metric>``; a ``{name: dataset}`` mapping gives
    ``val/<name>/<metric>`` for each set, all in one ``on_validation_end``, so a
    checkpoint monitor or early stopping can name any of them. Values stay on device.
    """
    validating = stage == "validate"
    task, hook, view = ctx.task, ctx.hook, ctx.view
    examples = ctx.val_examples if validating else task.test_data()
    if examples is None:
        return {}
    prefix, source = ("val", "val_data") if validating else ("test", "test_data")
    sets = named_eval_sets(examples, f"{type(task).__name__}.{source}()")
    eval_step = ctx.steps.evaluation(stage)
    compile_seconds = ctx.progress.compile_seconds
    hook.on_validation_start(trainer=view, stage=stage)
    results: dict[str, Any] = {}
    batch_index = 0
    for name, dataset in sets.items():
        iterator, num_batches = data_lib.eval_pipeline(
            dataset, task.eval_transforms(), ctx.pipeline_config(ctx.eval_batch_size),
            limit_batches=resolve_limit(
                ctx.limit_val_batches, math.ceil(len(dataset) / ctx.eval_batch_size)
            ),
        )
        # Fresh metric state each evaluation: the eval step donates (consumes) it.
        metrics_state = ctx.strategy.place_state(nnx.state(task.configure_metrics()))
        with data_lib.DevicePrefetcher(
            iter(iterator), ctx.strategy.shard_batch, size=ctx.prefetch, limit=num_batches
        ) as prefetcher:
            for batch, _ in prefetcher:
                t0 = time.perf_counter()
                metrics_state = eval_step(ctx.model.state, metrics_state, batch)
                if stage not in compile_seconds:  # the first call traces and compiles
                    compile_seconds[stage] = time.perf_counter() - t0
                prefetcher.refill()
                hook.on_validation_batch_end(trainer=view, stage=stage, batch_index=batch_index)
                batch_index += 1
        values = ctx.steps.compute_eval_metrics(metrics_state)
        tag = prefix if name is None else f"{prefix}/{name}"
        results.update({f"{tag}/{k}": v for k, v in values.items()})
    ctx.callback_metrics.update(results)
    hook.on_validation_end(trainer=view, stage=stage, metrics=results)
    hook.log_metrics(trainer=view, metrics=results, step=ctx.progress.global_step)
    return results


def use_weights(ctx: RunContext, ckpt_path: str | None, *, untrained: bool, stage: str,
                run_dir: Path) -> None:
    """The weights an evaluation uses: checkpoint ``ckpt_path`` restored, else the trained
    (fitted or restored) state; freshly initialised weights only when ``untrained``."""
    if ckpt_path is not None:
        if not restore(ctx, ckpt_path):
            raise FileNotFoundError(
                f"ckpt_path={ckpt_path!r}: no checkpoint to evaluate in "
                f"{run_dir}; give a checkpoint directory or fit first"
            )
    elif not ctx.model.trained and not untrained:
        raise RuntimeError(
            f"{stage} would use the untrained (freshly initialised) weights of "
            f"{type(ctx.task).__name__}'s model: this trainer has no fitted or restored "
            "state. Call fit first, pass ckpt_path ('last', 'best' or a checkpoint "
            "directory), or pass untrained=True to evaluate the initial weights on purpose"
        )


def predict(ctx: RunContext) -> Any:
    """``task.predict_step`` over ``task.predict_data()``: host arrays, a row per example."""
    task = ctx.task
    examples = task.predict_data()
    if examples is None:
        raise ValueError(
            f"{type(task).__name__}.predict_data() returned None; "
            "override it (or test_data/val_data) to return examples"
        )
    iterator, num_batches = data_lib.eval_pipeline(
        examples, task.eval_transforms(), ctx.pipeline_config(ctx.eval_batch_size),
        source=f"{type(task).__name__}.predict_data()",
    )
    predict_step = ctx.steps.predict
    ctx.hook.on_predict_start(trainer=ctx.view)
    chunks, masks = [], []
    with data_lib.DevicePrefetcher(
        iter(iterator), ctx.strategy.shard_batch, size=ctx.prefetch, limit=num_batches
    ) as prefetcher:
        for batch, _ in prefetcher:
            chunks.append(predict_step(ctx.model.state, batch))
            masks.append(batch[data_lib.MASK_KEY])
            if len(chunks) == 1:  # shapes are the same for every batch
                _check_rows(chunks[0], masks[0].shape[0], type(task).__name__)
            prefetcher.refill()
    gather = functools.partial(host_rows, processes=ctx.strategy.process_count)
    mask = gather(masks)
    outputs = jax.tree.map(lambda *xs: gather(xs)[mask], *chunks)
    ctx.hook.on_predict_end(trainer=ctx.view, outputs=outputs)
    return outputs


def _check_rows(outputs: Any, rows: int, task_name: str) -> None:
    """Refuse outputs without a row per example (NumPy's concatenation error names none)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(outputs):
        shape = tuple(np.shape(leaf))
        if not shape or shape[0] != rows:
            where = jax.tree_util.keystr(path) or "its output"
            raise ValueError(
                f"{task_name}.predict_step must return a row per example (arrays whose first "
                f"dimension is the batch's {rows}); {where} has shape {shape}: return "
                "per-example values (logits, not logits.mean())")


def host_rows(batches: Sequence[jax.Array], processes: int) -> np.ndarray:
    """Global batch arrays as one host array, their rows in order, in every process.

    With several processes each holds only its rows of a batch (``device_get`` refuses
    the others'): the rows are gathered from all of them first.
    """
    if processes > 1:
        from jax.experimental import multihost_utils

        return np.concatenate([np.asarray(multihost_utils.process_allgather(x, tiled=True))
                               for x in batches])
    return np.concatenate([np.asarray(jax.device_get(x)) for x in batches])


def named_eval_sets(examples: Any, where: str) -> dict[str | None, grain.MapDataset]:
    """``{None: dataset}`` for one dataset, or the checked ``{name: dataset}`` mapping."""
    if isinstance(examples, grain.MapDataset):
        if len(examples) == 0:
            raise ValueError(f"{where} returned no examples (an empty dataset); check the "
                             "data source it reads, or return None for no evaluation")
        return {None: examples}
    if not isinstance(examples, Mapping) or not examples:
        raise TypeError(
            f"{where} must return a grain.MapDataset, a non-empty {{name: grain.MapDataset}} "
            f"dict, or None; got {type(examples).__name__}"
        )
    for name, dataset in examples.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"{where}: set name {name!r} must be a non-empty string "
                             "without '/' (it becomes val/<name>/<metric>)")
        if not isinstance(dataset, grain.MapDataset):
            raise TypeError(f"{where}[{name!r}] must be a grain.MapDataset, got "
                            f"{type(dataset).__name__}")
        if len(dataset) == 0:
            raise ValueError(f"{where}[{name!r}] has no examples (an empty dataset); check "
                             "the data source it reads, or leave that set out")
    return dict(examples)
