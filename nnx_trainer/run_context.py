"""What one fit/validate/test/predict call works with, handed explicitly to the engine's parts.

The parts (:mod:`~nnx_trainer.fit_loop`, :mod:`~nnx_trainer.evaluation`,
:mod:`~nnx_trainer.checkpoint_content`) read and update this context; they never
import or call the Trainer. ``view`` is what hooks receive as ``trainer=``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from nnx_trainer import data as data_lib
from nnx_trainer.fit_plan import FitPlan
from nnx_trainer.model_state import ModelState
from nnx_trainer.progress import FitProgress
from nnx_trainer.steps import CompiledSteps
from nnx_trainer.strategy import Strategy
from nnx_trainer.task import Task

if TYPE_CHECKING:
    import pluggy

    from nnx_trainer.run_view import RunView


@dataclasses.dataclass
class RunContext:
    """One call's parts and options.

    :param view: the object hooks receive as ``trainer=`` (the run view plugins read).
    :param hook: the plugin manager's hook relay.
    :param strategy: places state and shards batches.
    :param task: the task being run.
    :param plan: the fit's plan (step counts, cadence).
    :param progress: counters and stop flags (the fit's, or the latest fit's).
    :param model: the model and optimizer state.
    :param steps: the jitted steps.
    :param callback_metrics: the latest metric values by name, updated in place.
    :param seed: the data order's seed.
    :param batch_size: global training batch size.
    :param eval_batch_size: global evaluation batch size.
    :param limit_val_batches: at most this many batches (or that fraction) per evaluation.
    :param worker_count: Grain worker processes.
    :param prefetch: batches read ahead of the step.
    :param val_examples: ``task.val_data()`` as read at the start of the call.
    :param coordinated_preemption: consult JAX's preemption sync point after each step.
    """

    view: RunView
    hook: pluggy.HookRelay
    strategy: Strategy
    task: Task
    plan: FitPlan
    progress: FitProgress
    model: ModelState
    steps: CompiledSteps
    callback_metrics: dict[str, Any]
    seed: int
    batch_size: int
    eval_batch_size: int
    limit_val_batches: int | float | None
    worker_count: int
    prefetch: int
    val_examples: Any = None
    coordinated_preemption: bool = False

    def pipeline_config(self, global_batch_size: int) -> data_lib.PipelineConfig:
        """This process's share of a global batch, as Grain pipelines take it."""
        return data_lib.PipelineConfig(
            global_batch_size=global_batch_size,
            process_index=self.strategy.process_index,
            process_count=self.strategy.process_count,
            worker_count=self.worker_count,
        )
