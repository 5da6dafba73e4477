"""The fit loop: one step loop over the fit's batches; epochs are counters inside it.

Ordering invariants (numbered beside the loop in :func:`fit_loop`; each one is relied
on elsewhere, so keep the order):

1. A step is dispatched before the next batch is read and copied to device, so
   host data work overlaps device compute (``DevicePrefetcher.refill`` after dispatch).
2. ``global_step`` counts completed steps; hooks called after a step see it
   already incremented, so a checkpoint at ``global_step = k`` resumes at step k.
3. The data position saved with a checkpoint is the counters (epoch, batch in
   epoch) of the last *consumed* batch, never the prefetcher's look-ahead position;
   one pipeline per fit starts exactly there (``train_pipeline(start_batch=...)``).
4. Metrics stay on device between log steps; the host reads them only at the
   log cadence, at evaluation end, or when a plugin asks.
5. Preemption is checked after a step completes: the state is always whole. With
   more than one process, a SIGTERM seen by any of them stops every one after the
   same step (JAX's preemption sync point), so they all save together.
6. The train and eval steps are traced once each: shapes never change (train
   drops the remainder, eval pads and masks).
7. One checkpoint save point per step (:func:`save_point`): after that step's logging
   and validation (the epoch-end one for an epoch's last step, with the counters
   already at the next epoch), before the next batch is consumed, so a checkpoint
   carries its own step's validation metric and the data position of the next step
   (kauldron's "only advance the data iterator after the checkpoint is saved").
8. A preemption on an epoch's last step skips that epoch's validation and records it
   as pending in the preemption checkpoint; the resumed fit runs it first, at the
   same step, then that step's save point.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from jax.experimental import multihost_utils

from nnx_trainer import data as data_lib
from nnx_trainer.evaluation import evaluate, named_eval_sets
from nnx_trainer.host_memory import release_free_host_memory
from nnx_trainer.preemption import PreemptionSignals, stop_together
from nnx_trainer.run_context import RunContext


def run_fit(ctx: RunContext, hyperparameters: Callable[[], dict[str, Any]]) -> None:
    """A built (and possibly restored) fit from its start to its end: the validation set
    checked, ``log_hyperparams`` and ``on_fit_start``, :func:`fit_loop` under the
    preemption handlers, the final (or preemption) save, ``on_fit_end``."""
    task, progress, hook, view = ctx.task, ctx.progress, ctx.hook, ctx.view
    if ctx.val_examples is not None and (
            ctx.plan.cadence.val_every_n_epochs or ctx.plan.cadence.val_every_n_steps):
        # An empty or mistyped validation set fails now, not after an epoch.
        named_eval_sets(ctx.val_examples, f"{type(task).__name__}.val_data()")
    hook.log_hyperparams(trainer=view, params=hyperparameters())
    hook.on_fit_start(trainer=view, task=task)
    with PreemptionSignals(progress, ctx.strategy.process_count) as signals:
        ctx.coordinated_preemption = signals.coordinated
        start = time.perf_counter()
        fit_loop(ctx)
        progress.fit_seconds = time.perf_counter() - start
    reason = "preemption" if progress.preempted else "end"
    release_free_host_memory()  # the steps' freed buffers, before the save's copies
    hook.on_save_checkpoint(trainer=view, step=progress.global_step, reason=reason)
    hook.wait_for_checkpoints(trainer=view)
    if not progress.preempted:
        hook.on_fit_end(trainer=view, task=task)


def fit_loop(ctx: RunContext) -> None:
    """Train from ``ctx.progress``'s position until the plan's cadence says stop."""
    plan, cadence, progress = ctx.plan, ctx.plan.cadence, ctx.progress
    hook, view, train_step = ctx.hook, ctx.view, ctx.steps.train
    ctx.model.loss_record = ctx.strategy.place_state(
        (np.asarray(-1, np.int32), np.asarray(0.0, np.float32),
         np.asarray(progress.global_step, np.int32)))
    if progress.validation_pending and cadence.validates_epoch_end(progress.epoch):
        evaluate(ctx, "validate")  # (8) the epoch end a preemption skipped, then (7)
        progress.validation_pending = False
        save_point(ctx)
    progress.validation_pending = False
    if cadence.stops(progress):
        return
    with open_train_batches(ctx) as batches:  # (3) one pipeline, from the counters
        epoch_open = False
        while not cadence.stops(progress):
            if not epoch_open:  # a resumed fit reopens the epoch it stopped in
                hook.on_train_epoch_start(trainer=view, epoch=progress.epoch)
                epoch_open = True
            step = progress.global_step
            batch, progress.data_state = next_batch(batches, ctx)
            hook.on_train_batch_start(trainer=view, step=step, batch=batch)
            loss = run_train_step(ctx, train_step, batch)
            batches.refill()  # (1) the next batch is read while this step runs
            progress.advance()  # (2) the hooks below see this step counted
            if ctx.coordinated_preemption and multihost_utils.reached_preemption_sync_point(
                    progress.global_step):
                stop_together(progress, ctx.strategy.process_count)  # (5)
            hook.on_train_batch_end(trainer=view, step=step, loss=loss)
            if cadence.logs(progress.global_step):
                log_train_metrics(ctx)  # (4) the host reads metrics at this cadence only
            closes_epoch = progress.batch_in_epoch == plan.steps_per_epoch
            if cadence.validates_step(progress.global_step,
                                      progress.epoch + 1 if closes_epoch else None):
                evaluate(ctx, "validate")
            if closes_epoch:  # the counters move to the next epoch before its save point
                hook.on_train_epoch_end(trainer=view, epoch=progress.epoch)
                progress.close_epoch()
                epoch_open = False
                if cadence.validates_epoch_end(progress.epoch):
                    if progress.preempted:
                        progress.validation_pending = True  # (8) no time now: owed
                    else:
                        evaluate(ctx, "validate")
            save_point(ctx)  # (7) after logging and validation, before the next batch
    if progress.global_step % cadence.log_every_n_steps and not progress.preempted:
        log_train_metrics(ctx)  # the last steps since the latest log


@contextlib.contextmanager
def open_train_batches(ctx: RunContext) -> Iterator[data_lib.DevicePrefetcher]:
    """The fit's one training pipeline (one set of Grain threads or worker processes),
    from the restored position: the counters for indexed data, Grain's iterator
    state for a stream. Its data wait is added to the progress when it closes."""
    plan, progress, task = ctx.plan, ctx.progress, ctx.task
    config = ctx.pipeline_config(ctx.batch_size)
    if plan.streaming:
        iterator = iter(data_lib.stream_pipeline(
            plan.train_data, task.train_transforms(), config, seed=ctx.seed))
        if progress.data_state is not None:
            iterator.set_state(progress.data_state)
        elif progress.global_step:
            raise ValueError(
                f"resuming a streamed fit at step {progress.global_step} from a checkpoint "
                "without the stream's position (written by a fit over indexed data?); "
                "start a new run, or resume with the train_data() that wrote it"
            )
    else:
        max_epochs = plan.cadence.max_epochs
        iterator = iter(data_lib.train_pipeline(
            plan.train_data, task.train_transforms(), config, seed=ctx.seed,
            epoch=progress.epoch, num_epochs=max_epochs - progress.epoch,
            start_batch=progress.batch_in_epoch, steps_per_epoch=plan.steps_per_epoch,
        ))
    with data_lib.DevicePrefetcher(
        iterator, ctx.strategy.shard_batch, size=ctx.prefetch,
        limit=plan.remaining_steps(progress), record_state=plan.streaming,
    ) as prefetcher:
        progress.prefetcher = prefetcher
        try:
            yield prefetcher
        finally:
            progress.prefetcher = None
            progress.data_wait_closed += prefetcher.wait_seconds


def next_batch(batches: data_lib.DevicePrefetcher, ctx: RunContext) -> tuple[Any, Any]:
    """The next ``(batch, data state)``, or an error saying why the data ran out early."""
    try:
        return next(batches)
    except StopIteration:
        progress = ctx.progress
        if ctx.plan.streaming:
            raise RuntimeError(
                f"the training stream ended after {progress.global_step} steps, before "
                f"max_steps={ctx.plan.cadence.max_steps}; lower max_steps or make "
                "train_data() longer (e.g. .repeat() the source before to_iter_dataset())"
            ) from None
        raise RuntimeError(
            f"the training data ran out at step {progress.global_step} (epoch "
            f"{progress.epoch}, batch {progress.batch_in_epoch}); did train_data() "
            "change length during the fit?"
        ) from None


def run_train_step(ctx: RunContext, train_step: Any, batch: Any) -> Any:
    """Dispatch one train step on the flat state (no host sync); returns the loss array."""
    model, compile_seconds = ctx.model, ctx.progress.compile_seconds
    t0 = time.perf_counter()
    treedef, leaves = model.take_flat()
    leaves, model.train_metrics, model.loss_record, loss = train_step(
        leaves, model.train_metrics, model.loss_record, batch)
    model.put_flat(treedef, leaves)
    if "train" not in compile_seconds:  # the first call traces and compiles
        compile_seconds["train"] = time.perf_counter() - t0
        release_free_host_memory()  # what XLA's compiler freed (host_memory.py)
    return loss


def log_train_metrics(ctx: RunContext) -> None:
    """Compute and reset the training metrics, and log them (invariant 4)."""
    model = ctx.model
    values, model.train_metrics = ctx.steps.compute_train_metrics(model.train_metrics)
    metrics = {f"train/{k}": v for k, v in values.items()}
    metrics["epoch"] = ctx.progress.epoch
    ctx.callback_metrics.update(metrics)
    ctx.hook.log_metrics(trainer=ctx.view, metrics=metrics, step=ctx.progress.global_step)


def save_point(ctx: RunContext) -> None:
    """The loop's one checkpoint save point (invariant 7): ask, then save.

    The checkpoint plugin answers from its Orbax save-decision policy (a time-based
    answer is taken on process 0 and agreed by every process); every process asks at
    the same steps, so they all enter a save together or none does.
    """
    progress = ctx.progress
    if not ctx.plan.cadence.may_save(progress):
        return
    if ctx.hook.should_save_checkpoint(trainer=ctx.view, step=progress.global_step):
        release_free_host_memory()  # the steps' freed buffers, before the save's copies
        ctx.hook.on_save_checkpoint(trainer=ctx.view, step=progress.global_step,
                                    reason="periodic")
