"""The model and optimizers of one built task: graphdefs, shardings, the state and its cache.

Between train steps the loop keeps the state as its flat list of arrays: jit takes
and returns a list through its C++ path, while an nnx.State of Variables is
flattened and rebuilt in Python (~80 Variables for a ResNet-8, about 0.15 ms of
host CPU per step on a 5 ms step, benchmarks/README.md section 1). The TrainState
is rebuilt only when something reads it (a plugin, a checkpoint, an evaluation).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import optax
from flax import nnx

from nnx_trainer.eval_mode import warn_if_flag_overrides_mode
from nnx_trainer.host_memory import releasing_eager_build_memory
from nnx_trainer.optimizers import build_optimizers, optimizer_specs
from nnx_trainer.option_checks import warn_if_precision_unused
from nnx_trainer.state import TrainState, first_nonfinite_leaf, leaf_path, structure_mismatch
from nnx_trainer.strategy import Strategy
from nnx_trainer.task import DEFAULT_OPTIMIZER, Task


class ModelState:
    """A task's model, optimizers and training metrics, split into graphdefs and a placed
    :class:`TrainState` (built by :meth:`build`).

    ``state`` reads the tree (rebuilt from the flat cache when the loop last held it);
    :meth:`take_flat` / :meth:`put_flat` are the loop's form. ``live`` keeps the
    modules that ``trainer.model`` / ``trainer.optimizers`` hand out, synchronised by
    :meth:`sync_live`.
    """

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self._tree: Any = None  # the TrainState, or None while _flat holds it
        self._flat: tuple[Any, list[Any]] | None = None  # (treedef, leaves): the loop's
        self.live: tuple[nnx.Module, dict[str, nnx.Optimizer]] | None = None
        self.several_optimizers = False  # configure_optimizer named several
        self.model_graphdef: Any = None
        self.eval_graphdef: Any = None  # the model's graphdef in eval mode
        self.optimizer_graphdefs: dict[str, Any] = {}
        self.train_metrics_graphdef: Any = None
        self.eval_metrics_graphdef: Any = None
        self.shardings: Any = None  # the TrainState's shardings
        self.train_metrics: Any = None  # the training metrics' state, donated each step
        # (first non-finite step, its loss, next step), kept on device by the train step.
        self.loss_record: Any = None
        # True once the state holds trained (fit) or restored weights: evaluations of any
        # task with the same model structure then use it instead of a fresh init.
        self.trained = False

    # ---------------------------------------------------------------- state

    @property
    def state(self) -> Any:
        """The :class:`TrainState` (None before :meth:`build`)."""
        if self._flat is not None:
            treedef, leaves = self._flat
            self._tree, self._flat = jax.tree.unflatten(treedef, leaves), None
        return self._tree

    @state.setter
    def state(self, value: Any) -> None:
        self._tree, self._flat = value, None

    def place(self, new_state: TrainState) -> None:
        """Place ``new_state`` with the strategy and make it the state."""
        self.state = self.strategy.place_state(new_state)

    def replace(self, new_state: TrainState | tuple) -> None:
        """Swap in a state of the same structure (``trainer.state = ...`` between steps)."""
        if not isinstance(new_state, TrainState):
            new_state = TrainState(*new_state)
        if jax.tree.structure(new_state) != jax.tree.structure(self.state):
            raise ValueError("the new state must have the same structure as trainer.state")
        self.place(new_state)

    def take_flat(self) -> tuple[Any, list[Any]]:
        """The state as ``(treedef, leaves)``, for the train step that donates the leaves
        (so no tree is kept that would still point at them)."""
        flat = self._flat
        if flat is None:
            leaves, treedef = jax.tree.flatten(self._tree)
            flat = (treedef, leaves)
        self._tree = self._flat = None
        return flat

    def put_flat(self, treedef: Any, leaves: list[Any]) -> None:
        """The train step's new leaves become the state (no tree rebuilt)."""
        self._flat = (treedef, leaves)

    def leaves(self) -> list[Any] | None:
        """The state's arrays in either form, without rebuilding a tree (None before build)."""
        if self._flat is not None:
            return self._flat[1]
        return None if self._tree is None else jax.tree.leaves(self._tree)

    def first_nonfinite_loss(self) -> tuple[int, float] | None:
        """``(step, loss)`` of the first non-finite loss in the loss record, or None
        (reads the device)."""
        record = self.loss_record
        if record is None:
            return None
        first = int(record[0])
        return None if first < 0 else (first, float(record[1]))

    def first_nonfinite_state(self) -> str | None:
        """The path of the first state array holding a NaN or Inf, or None (checked on the
        device, on the loop's flat form: no tree rebuilt; :func:`first_nonfinite_leaf`)."""
        leaves = self.leaves()
        if leaves is None:
            return None
        index = first_nonfinite_leaf(leaves)
        return None if index < 0 else leaf_path(self.state, index)

    # ----------------------------------------------------------- optimizers

    def pack(self, optimizer_states: dict[str, Any]) -> Any:
        """The optimizer part of the state: one optimizer's own state, or ``{name: state}``."""
        return optimizer_states if self.several_optimizers else optimizer_states[DEFAULT_OPTIMIZER]

    def unpack(self, optimizer_state: Any) -> dict[str, Any]:
        """The inverse of :meth:`pack`: ``{name: state}``."""
        return dict(optimizer_state) if self.several_optimizers else {
            DEFAULT_OPTIMIZER: optimizer_state
        }

    def sync_live(self) -> tuple[nnx.Module, dict[str, nnx.Optimizer]]:
        """The live model and optimizers, updated to the current state."""
        if self.live is None:
            raise RuntimeError("no model yet: call fit, validate, test or predict first")
        nnx.update(self.live[0], self.state.model)
        for name, optimizer_state in self.unpack(self.state.optimizer).items():
            nnx.update(self.live[1][name], optimizer_state)
        return self.live

    def single_optimizer(self) -> nnx.Optimizer:
        """The one live optimizer (synchronised), or AttributeError naming several."""
        if self.several_optimizers:
            raise AttributeError(
                f"the task has several optimizers ({', '.join(self.live[1])}); "
                "use trainer.optimizers[name]"
            )
        return self.sync_live()[1][DEFAULT_OPTIMIZER]

    # ---------------------------------------------------------------- build

    def build(
        self, task: Task, *, seed: int, total_steps: int, accumulate_grad_batches: int,
        gradient_clip_norm: float | None,
        extra_transforms: Callable[[], Iterable[list[Any] | None]], warn: bool,
    ) -> None:
        """Model, optimizers, metrics; the state placed by the strategy.

        ``extra_transforms`` returns the plugins' gradient transforms (called after the
        task's optimizers are configured); ``warn``: check the model's mode flags.
        """
        with releasing_eager_build_memory():  # its one-off programs (host_memory.py)
            # Initialisation runs eagerly and unsharded, so the partitionable threefry
            # variant buys nothing here, while on XLA:CPU it compiles each initializer
            # ~4x slower (ResNet-8 init: 20.8 s -> 5.4 s measured on this project's CI CPU).
            # Same seed, same weights as `with jax.threefry_partitionable(False): Model(...)`.
            with jax.threefry_partitionable(False):
                model = build_model(task, seed)
            updates = max(1, math.ceil(max(total_steps, 1) / accumulate_grad_batches))
            specs, self.several_optimizers = optimizer_specs(task, updates)
            pre = []
            if gradient_clip_norm is not None:
                pre.append(optax.clip_by_global_norm(gradient_clip_norm))
            for extra in extra_transforms():
                pre.extend(extra or [])

            def wrap(tx: optax.GradientTransformation) -> optax.GradientTransformation:
                if pre:
                    tx = optax.chain(*pre, tx)
                if accumulate_grad_batches > 1:
                    tx = optax.MultiSteps(tx, every_k_schedule=accumulate_grad_batches)
                return tx

            optimizers = build_optimizers(task, model, specs, wrap)
            self.live = (model, optimizers)
            # The train step's graph after model.train(), as Flax's examples train: a layer
            # built in evaluation mode (nnx.Dropout(deterministic=True)) or with its mode
            # unset (nnx.MultiHeadAttention's dropout: deterministic=None) trains as such.
            model.train()
            # Split apart (an optimizer holds no reference to the model's variables), so
            # the state has named parts: TrainState(model=..., optimizer=...). One optimizer's
            # state is its nnx.State; several are {name: nnx.State}.
            self.model_graphdef, model_state = nnx.split(model)
            self.optimizer_graphdefs, optimizer_states = {}, {}
            for name, optimizer in optimizers.items():
                self.optimizer_graphdefs[name], optimizer_states[name] = nnx.split(optimizer)
            state = TrainState(model=model_state, optimizer=self.pack(optimizer_states))
            model.eval()
            self.eval_graphdef = nnx.split(model)[0]
            model.train()
            if warn:  # a __call__ flag that would override eval(); a precision unused
                warn_if_flag_overrides_mode(model)
                warn_if_precision_unused(model, task.compute_dtype, type(task).__name__)
            train_metrics = task.configure_train_metrics()
            self.train_metrics_graphdef, train_metrics_state = nnx.split(train_metrics)
            self.eval_metrics_graphdef = nnx.split(task.configure_metrics())[0]

            self.shardings = self.strategy.state_shardings(state)
            self.place(state)
            self.train_metrics = self.strategy.place_state(train_metrics_state)

    def adopt(self, task: Task, trained: TrainState) -> None:
        """Use another build's trained weights (same model structure) for ``task``."""
        mismatch = structure_mismatch(trained.model, self.state.model)
        if mismatch is not None:
            raise ValueError(
                f"{type(task).__name__}'s model does not have the structure of the trained "
                f"model ({mismatch}), so the trained weights cannot be used for it; "
                "evaluate a task with the same model, or pass ckpt_path= for a checkpoint "
                "of this model"
            )
        optimizer = trained.optimizer
        if structure_mismatch(trained.optimizer, self.state.optimizer) is not None:
            optimizer = self.state.optimizer  # evaluation never reads it; keep it whole
        self.place(TrainState(trained.model, optimizer))


def build_model(task: Task, seed: int) -> nnx.Module:
    """``task.configure_model``; a model with sharding annotations (``nnx.with_partitioning``)
    that Flax's eager sharding cannot place without a mesh context is built again with
    eager sharding off, its annotations kept as metadata for the strategy to place it.

    Only then: eager sharding is part of every Variable's metadata (the state's pytree
    structure), so unannotated models keep exactly the structure users build themselves.
    """
    try:
        return task.configure_model(nnx.Rngs(seed))
    except ValueError as exc:
        if "mesh context or metadata is required" not in str(exc):
            raise
    with nnx.use_eager_sharding(False):
        return task.configure_model(nnx.Rngs(seed))
