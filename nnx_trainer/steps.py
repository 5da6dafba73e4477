"""The jitted step functions of one built task, each a named attribute of :class:`CompiledSteps`.

Each is traced once (invariant 6 of :mod:`nnx_trainer.fit_loop`): shapes never change,
as the train pipeline drops the remainder and evaluation pads and masks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nnx_trainer import data as data_lib
from nnx_trainer.host_memory import step_compiler_options
from nnx_trainer.model_state import ModelState
from nnx_trainer.state import TrainState
from nnx_trainer.strategy import SingleDeviceStrategy, Strategy
from nnx_trainer.task import Task, loss_and_aux


class CompiledSteps:
    """``train``, ``compute_train_metrics``, ``validate``, ``test``, ``compute_eval_metrics``
    and ``predict``: jitted on first use from ``model``'s graphdefs as they are then
    (after a restore: the train step takes the state's structure at that point)."""

    def __init__(self, task: Task, model: ModelState, strategy: Strategy) -> None:
        self.task = task
        self.model = model
        self.strategy = strategy
        self.constrain = not isinstance(strategy, SingleDeviceStrategy)

    @functools.cached_property
    def compiler_options(self) -> dict[str, Any]:
        """XLA options of every step: on CPU in float32 with a large state, the compile's
        peak memory kept down (:func:`~nnx_trainer.host_memory.step_compiler_options`)."""
        platforms = {device.platform for device in self.strategy.batch_sharding().device_set}
        return step_compiler_options(platforms, self.task.compute_dtype,
                                     len(jax.tree.leaves(self.model.state)))

    def _jit(self, fn: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
        return jax.jit(fn, compiler_options=self.compiler_options or None, **kwargs)

    @functools.cached_property
    def train(self) -> Callable[..., Any]:
        """``(leaves, metrics_state, loss_record, batch) -> (leaves, metrics_state,
        loss_record, loss)``; donates its first three arguments."""
        task, model_state = self.task, self.model
        model_graphdef, optimizer_graphdefs = model_state.model_graphdef, \
            model_state.optimizer_graphdefs
        metrics_graphdef = model_state.train_metrics_graphdef
        pack, unpack = model_state.pack, model_state.unpack
        shardings, constrain = model_state.shardings, self.constrain

        def train_step(state, metrics_state, loss_record, batch):
            model = nnx.merge(model_graphdef, state.model)
            optimizers = {
                name: nnx.merge(optimizer_graphdefs[name], optimizer_state)
                for name, optimizer_state in unpack(state.optimizer).items()
            }
            metrics = nnx.merge(metrics_graphdef, metrics_state)
            loss, aux = checked_update(task, task.training_update(model, optimizers, batch))
            update_metrics(metrics, {"loss": loss, **aux}, f"{type(task).__name__}."
                           "configure_train_metrics() with training_step's loss and aux")
            new_state = TrainState(
                model=nnx.state(model),
                optimizer=pack({name: nnx.state(o) for name, o in optimizers.items()}),
            )
            if constrain:
                new_state = jax.lax.with_sharding_constraint(new_state, shardings)
            loss_record = record_nonfinite(loss_record, loss)
            return new_state, nnx.state(metrics), loss_record, loss

        treedef = jax.tree.structure(model_state.state)

        def flat_train_step(leaves, metrics_state, loss_record, batch):
            # The loop's form (see model_state.py): the state in and out as its leaves.
            out = train_step(jax.tree.unflatten(treedef, leaves), metrics_state,
                             loss_record, batch)
            new_leaves, new_treedef = jax.tree.flatten(out[0])
            if new_treedef != treedef:
                raise ValueError(
                    "training_update changed the training state's structure (a "
                    "Variable added, removed or retyped during the step); the state "
                    "must keep its structure from step to step")
            return (new_leaves, *out[1:])

        return self._jit(flat_train_step, donate_argnums=(0, 1, 2))

    def lower_train(self, batch: Any) -> jax.stages.Lowered:
        """:attr:`train` lowered for ``batch`` on the current state, not compiled."""
        model = self.model
        return self.train.lower(jax.tree.leaves(model.state), model.train_metrics,
                                model.loss_record, batch)

    @functools.cached_property
    def compute_train_metrics(self) -> Callable[..., Any]:
        """``metrics_state -> (values, reset metrics_state)``; donates its argument."""
        metrics_graphdef = self.model.train_metrics_graphdef

        def compute_and_reset(metrics_state):
            metrics = nnx.merge(metrics_graphdef, metrics_state)
            values = metrics.compute()
            metrics.reset()
            return values, nnx.state(metrics)

        return self._jit(compute_and_reset, donate_argnums=0)

    def _eval_step(self, step: Callable[..., Any]) -> Callable[..., Any]:
        eval_graphdef, metrics_graphdef = self.model.eval_graphdef, \
            self.model.eval_metrics_graphdef

        def eval_step(state, metrics_state, batch):
            model = nnx.merge(eval_graphdef, state.model)
            metrics = nnx.merge(metrics_graphdef, metrics_state)
            outputs = step(model, batch)
            update_metrics(metrics, outputs, f"{type(self.task).__name__}.configure_metrics() "
                           f"with {step.__name__}'s outputs", mask=batch[data_lib.MASK_KEY])
            return nnx.state(metrics)

        return self._jit(eval_step, donate_argnums=1)

    @functools.cached_property
    def validate(self) -> Callable[..., Any]:
        """``(state, metrics_state, batch) -> metrics_state`` with ``task.validation_step``
        on the model in eval mode; donates the metrics state."""
        return self._eval_step(self.task.validation_step)

    @functools.cached_property
    def test(self) -> Callable[..., Any]:
        """As :attr:`validate`, with ``task.test_step``."""
        return self._eval_step(self.task.test_step)

    @functools.cached_property
    def compute_eval_metrics(self) -> Callable[..., Any]:
        """``metrics_state -> values``."""
        metrics_graphdef = self.model.eval_metrics_graphdef

        def compute(metrics_state):
            return nnx.merge(metrics_graphdef, metrics_state).compute()

        return self._jit(compute)

    @functools.cached_property
    def predict(self) -> Callable[..., Any]:
        """``(state, batch) -> outputs`` of ``task.predict_step`` in eval mode."""
        task, eval_graphdef = self.task, self.model.eval_graphdef

        def predict_step(state, batch):
            return task.predict_step(nnx.merge(eval_graphdef, state.model), batch)

        return self._jit(predict_step)

    def evaluation(self, stage: str) -> Callable[..., Any]:
        """The eval step of ``stage``: ``"validate"`` or ``"test"``."""
        return self.validate if stage == "validate" else self.test


def checked_update(task: Task, result: Any) -> tuple[jax.Array, Mapping[str, Any]]:
    """``training_update``'s ``(loss, aux)``, or a TypeError naming what came back instead."""
    return loss_and_aux(result, f"{type(task).__name__}.training_update")


def update_metrics(metrics: nnx.MultiMetric, inputs: Mapping[str, Any], where: str,
                   **extra: Any) -> None:
    """``metrics.update(**inputs, **extra)``; a metric that finds no input of its name
    (nnx's bare "Expected keyword argument") is named with what the step gave."""
    try:
        metrics.update(**inputs, **extra)
    except TypeError as exc:
        raise TypeError(
            f"{where}: {exc}; the step gave {', '.join(sorted(inputs)) or 'nothing'}. Return "
            "what each metric reads (nnx.metrics.Average('mse') reads 'mse', Accuracy "
            "'logits' and 'labels'), or change the metric") from exc


def record_nonfinite(record: tuple, loss: jax.Array) -> tuple:
    """Fold one step's loss into ``(first bad step, its loss, next step)``; traced in the step."""
    first, bad_loss, step = record
    is_new = (first < 0) & ~jnp.isfinite(loss)  # keep the first: later steps are NaN too
    first = jnp.where(is_new, step, first)
    bad_loss = jnp.where(is_new, loss.astype(jnp.float32), bad_loss)
    return first, bad_loss, step + 1
