"""The Trainer: fit / validate / test / predict around a user's Task.

Ordering invariants of the training loop (each one is relied on elsewhere):

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
7. One checkpoint save point per step (``_save_point``): after that step's logging
   and validation (the epoch-end one for an epoch's last step, with the counters
   already at the next epoch), before the next batch is consumed, so a checkpoint
   carries its own step's validation metric and the data position of the next step
   (kauldron's "only advance the data iterator after the checkpoint is saved").
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from nnx_trainer import data as data_lib
from nnx_trainer import init_from as init_from_lib
from nnx_trainer.compile_cache import enable_compilation_cache
from nnx_trainer.eval_mode import warn_if_flag_overrides_mode
from nnx_trainer.optimizers import build_optimizers, optimizer_specs
from nnx_trainer.plugin_manager import call_each, create_plugin_manager
from nnx_trainer.run_lock import RunDirInUse, RunDirLock
from nnx_trainer.state import (
    CheckpointContent,
    CheckpointMeta,
    Outcome,
    TrainState,
    first_nonfinite_leaf,
    leaf_path,
    structure_mismatch,
)
from nnx_trainer.strategy import SingleDeviceStrategy, Strategy
from nnx_trainer.summary import model_summary
from nnx_trainer.task import DEFAULT_OPTIMIZER, Task

log = logging.getLogger("nnx_trainer")

PRECISIONS = {"fp32": jnp.float32, "32": jnp.float32, "bf16": jnp.bfloat16}


class Trainer:
    """Runs a :class:`Task`: owns batching, sharding, jit, prefetch, plugins and the loop.

    :param max_epochs: stop after this many epochs (default 1, or unlimited when
        ``max_steps`` is given); training stops at whichever limit comes first.
    :param max_steps: stop after this many steps in total (``None``: epochs decide);
        required when ``train_data()`` is a stream (a ``grain.IterDataset``).
    :param batch_size: global training batch size (all devices and processes).
    :param eval_batch_size: global evaluation batch size (default: ``batch_size``).
    :param check_val_every_n_epoch: validate after every N epochs (0: never at epoch end).
    :param val_check_interval: also validate every N steps (an int), or that fraction of
        an epoch (a float in (0, 1], as in Lightning); ``None``: epoch ends only.
    :param log_every_n_steps: how often training metrics are read and logged.
    :param limit_train_batches: at most this many batches per epoch (an int), or that
        fraction of them (a float in (0, 1], as in Lightning).
    :param limit_val_batches: likewise for each evaluation.
    :param fast_dev_run: run N (``True``: 1) train and eval batches, no checkpoints.
    :param gradient_clip_norm: clip gradients by global norm before the optimizer.
    :param accumulate_grad_batches: average gradients over N batches per update.
    :param seed: seeds the model init and the data order (shuffle per epoch, augmentation).
    :param run_dir: where plugins write (checkpoints, logs); default ``runs/<timestamp>``.
        Each fit/validate/test/predict call holds it exclusively (``run_dir/.lock``, see
        :mod:`nnx_trainer.run_lock`): a second launch into it is refused.
    :param precision: ``"fp32"`` or ``"bf16"`` (compute dtype; parameters stay float32).
    :param strategy: a strategy name provided by a plugin, or a :class:`Strategy`.
    :param plugins: plugin objects, or entry-point names to load when autoload is off.
    :param disable_plugins: entry-point names not to load.
    :param plugin_autoload: load all installed plugins (default: unless
        ``NNX_TRAINER_DISABLE_PLUGIN_AUTOLOAD`` is set).
    :param worker_count: Grain worker processes for loading (0: in this process).
    :param prefetch: batches read (and placed, off CPU) ahead of the step.
    :param compilation_cache: JAX's persistent compilation cache: ``None`` (default: on
        in ``~/.cache/nnx_trainer/jax`` unless ``NNX_TRAINER_COMPILATION_CACHE`` says a
        directory or ``off``), ``True``, ``False`` or a directory; see
        :mod:`nnx_trainer.compile_cache`.
    """

    def __init__(
        self,
        *,
        max_epochs: int | None = None,
        max_steps: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        check_val_every_n_epoch: int = 1,
        val_check_interval: int | float | None = None,
        log_every_n_steps: int = 50,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        fast_dev_run: bool | int = False,
        gradient_clip_norm: float | None = None,
        accumulate_grad_batches: int = 1,
        seed: int = 0,
        run_dir: str | os.PathLike | None = None,
        precision: str = "fp32",
        strategy: str | Strategy = "single_device",
        plugins: Sequence[Any] = (),
        disable_plugins: Sequence[str] = (),
        plugin_autoload: bool | None = None,
        worker_count: int = 0,
        prefetch: int = 2,
        compilation_cache: bool | str | os.PathLike | None = None,
    ) -> None:
        if max_epochs is None:
            max_epochs = 1 if max_steps is None else math.ceil(max_steps)
        _check_positive(
            max_epochs=max_epochs, batch_size=batch_size, log_every_n_steps=log_every_n_steps,
            accumulate_grad_batches=accumulate_grad_batches,
        )
        _check_positive_or_none(
            max_steps=max_steps, eval_batch_size=eval_batch_size,
            gradient_clip_norm=gradient_clip_norm,
        )
        _check_count_or_fraction(
            val_check_interval=val_check_interval, limit_train_batches=limit_train_batches,
            limit_val_batches=limit_val_batches,
        )
        if precision not in PRECISIONS:
            raise ValueError(
                f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}"
            )
        if worker_count < 0:
            raise ValueError(f"worker_count must be >= 0, got {worker_count}")
        if fast_dev_run:
            n = 1 if fast_dev_run is True else int(fast_dev_run)
            max_epochs, max_steps = 1, n
            limit_train_batches = limit_val_batches = n
            log_every_n_steps = 1
        self.fast_dev_run = bool(fast_dev_run)
        self.max_epochs = max_epochs
        self.max_steps = max_steps
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.check_val_every_n_epoch = check_val_every_n_epoch
        self.val_check_interval = val_check_interval
        self.log_every_n_steps = log_every_n_steps
        self.limit_train_batches = limit_train_batches
        self.limit_val_batches = limit_val_batches
        self.gradient_clip_norm = gradient_clip_norm
        self.accumulate_grad_batches = accumulate_grad_batches
        self.seed = seed
        self.precision = precision
        self.compute_dtype = jnp.dtype(PRECISIONS[precision])
        self.worker_count = worker_count
        self.prefetch = prefetch
        self.compilation_cache_dir = enable_compilation_cache(compilation_cache)
        self.plugin_manager = create_plugin_manager(
            plugins=plugins, disable=disable_plugins, autoload=plugin_autoload
        )
        self.hook = self.plugin_manager.hook
        self.strategy = self._resolve_strategy(strategy)
        # After the strategy (which joins a multi-process run): every process must
        # write into the same default directory, so process 0's clock names it.
        self.run_dir = Path(run_dir) if run_dir is not None else self._default_run_dir()
        self.hook.on_plugins_loaded.call_historic(kwargs={"trainer": self})

        # Run state, visible to plugins.
        self.task: Task | None = None
        self.global_step = 0  # steps completed (one batch each)
        self.current_epoch = 0
        self.batch_in_epoch = 0
        self.steps_per_epoch = 0
        self.total_steps = 0
        self.should_stop = False
        self.stop_reason: str | None = None
        self.preempted = False
        self._preemption_sync = False  # fit sets it: consult JAX's preemption sync point
        self.stage: str | None = None  # "fit", "validate", "test" or "predict": the latest call
        self.callback_metrics: dict[str, Any] = {}
        self.fit_seconds = 0.0
        self.compile_seconds: dict[str, float] = {}
        self._data_wait_closed = 0.0  # host seconds blocked on data, finished epochs
        self._prefetcher: data_lib.DevicePrefetcher | None = None
        self._state_tree: Any = None  # the TrainState, or None while _state_flat holds it
        self._state_flat: tuple[Any, list[Any]] | None = None  # (treedef, leaves): the loop's
        self._train_metrics_state: Any = None
        self._loss_record: Any = None
        self._validation_pending = False  # preempted at an epoch end: its validation is owed
        self._live: tuple[nnx.Module, dict[str, nnx.Optimizer]] | None = None
        self._several_optimizers = False  # configure_optimizer named several
        self._streaming = False  # train_data() is a grain.IterDataset
        self._data_state: Any = None  # the stream's iterator state after the last batch
        # True once the state holds trained (fit) or restored weights: evaluations of any
        # task with the same model structure then use it instead of a fresh init.
        self._has_trained_state = False
        self.resumed_from: str | None = None  # the checkpoint the latest restore read
        self.init_report: init_from_lib.InitReport | None = None  # fit(init_from=...)'s
        self._step_fns: dict[str, Any] = {}
        self._run_lock: RunDirLock | None = None  # held during fit/validate/test/predict

    # ------------------------------------------------------------------ setup

    def _resolve_strategy(self, strategy: str | Strategy) -> Strategy:
        if isinstance(strategy, Strategy):
            return strategy
        chosen = self.hook.select_strategy(trainer=self, name=strategy)
        if chosen is not None:
            return chosen
        if strategy == SingleDeviceStrategy.name:
            return SingleDeviceStrategy()
        offered = sorted({SingleDeviceStrategy.name, *sum(self.hook.strategy_names(), [])})
        raise ValueError(f"unknown strategy {strategy!r}; choose one of: {', '.join(offered)}")

    def _default_run_dir(self) -> Path:
        stamp = int(datetime.datetime.now().timestamp())
        if self.strategy.process_count > 1:
            from jax.experimental import multihost_utils

            stamp = int(multihost_utils.broadcast_one_to_all(np.int64(stamp)))
        name = datetime.datetime.fromtimestamp(stamp).strftime("%Y%m%d-%H%M%S")
        return Path("runs") / f"run-{name}"

    @property
    def data_wait_seconds(self) -> float:
        """Host seconds this fit spent blocked on the data pipeline (live, no device sync)."""
        live = self._prefetcher.wait_seconds if self._prefetcher is not None else 0.0
        return self._data_wait_closed + live

    @property
    def is_main_process(self) -> bool:
        """True in the process that logs and writes run files."""
        return self.strategy.is_main_process

    @property
    def model(self) -> nnx.Module:
        """The live model, synchronised with the training state (valid until the next step)."""
        self._sync_live()
        return self._live[0]

    @property
    def optimizer(self) -> nnx.Optimizer:
        """The live optimizer, synchronised with the training state (one optimizer only;
        see :attr:`optimizers` for several)."""
        if self._several_optimizers:
            raise AttributeError(
                f"the task has several optimizers ({', '.join(self._live[1])}); "
                "use trainer.optimizers[name]"
            )
        return self.optimizers[DEFAULT_OPTIMIZER]

    @property
    def state(self) -> TrainState:
        """The training state: ``state.model`` and ``state.optimizer``, each an
        ``nnx.State`` of device arrays.

        The arrays are donated to the next train step: copy what must outlive it.
        Assigning a new state (same structure, shapes and dtypes, e.g. swapped-in
        averaged weights) is allowed between steps.
        """
        return self._state

    @state.setter
    def state(self, new_state: TrainState) -> None:
        if not isinstance(new_state, TrainState):
            new_state = TrainState(*new_state)
        if jax.tree.structure(new_state) != jax.tree.structure(self._state):
            raise ValueError("the new state must have the same structure as trainer.state")
        self._state = self.strategy.place_state(new_state)

    # Between train steps the loop keeps the state as its flat list of arrays: jit takes
    # and returns a list through its C++ path, while an nnx.State of Variables is
    # flattened and rebuilt in Python (~80 Variables for a ResNet-8, about 0.15 ms of
    # host CPU per step on a 5 ms step, benchmarks/README.md section 1). The TrainState
    # is rebuilt only when something reads it (a plugin, a checkpoint, an evaluation).

    @property
    def _state(self) -> Any:
        if self._state_flat is not None:
            treedef, leaves = self._state_flat
            self._state_tree, self._state_flat = jax.tree.unflatten(treedef, leaves), None
        return self._state_tree

    @_state.setter
    def _state(self, value: Any) -> None:
        self._state_tree, self._state_flat = value, None

    def _take_flat_state(self) -> tuple[Any, list[Any]]:
        """The state as ``(treedef, leaves)``, for the train step that donates the leaves
        (so no tree is kept that would still point at them)."""
        flat = self._state_flat
        if flat is None:
            leaves, treedef = jax.tree.flatten(self._state_tree)
            flat = (treedef, leaves)
        self._state_tree = self._state_flat = None
        return flat

    @property
    def optimizers(self) -> dict[str, nnx.Optimizer]:
        """The live optimizers by name (``"default"`` for a single one), synchronised."""
        self._sync_live()
        return dict(self._live[1])

    def _sync_live(self) -> None:
        if self._live is None:
            raise RuntimeError("no model yet: call fit, validate, test or predict first")
        nnx.update(self._live[0], self._state.model)
        for name, optimizer_state in self._unpack(self._state.optimizer).items():
            nnx.update(self._live[1][name], optimizer_state)

    def _pack(self, optimizer_states: dict[str, Any]) -> Any:
        """The optimizer part of the state: one optimizer's own state, or ``{name: state}``."""
        return optimizer_states if self._several_optimizers else optimizer_states[DEFAULT_OPTIMIZER]

    def _unpack(self, optimizer_state: Any) -> dict[str, Any]:
        return dict(optimizer_state) if self._several_optimizers else {
            DEFAULT_OPTIMIZER: optimizer_state
        }

    def _pipeline_config(self, global_batch_size: int) -> data_lib.PipelineConfig:
        return data_lib.PipelineConfig(
            global_batch_size=global_batch_size,
            process_index=self.strategy.process_index,
            process_count=self.strategy.process_count,
            worker_count=self.worker_count,
        )

    def _plan(self, task: Task) -> None:
        """Count steps from the data before building anything, so bad sizes fail early."""
        train = task.train_data()
        self._streaming = isinstance(train, grain.IterDataset)
        if not isinstance(train, grain.MapDataset) and not self._streaming:
            raise TypeError(
                f"{type(task).__name__}.train_data() must return a grain.MapDataset (or a "
                f"grain.IterDataset stream), got {type(train).__name__}; wrap a sequence "
                "with grain.MapDataset.source(...)"
            )
        if not self._streaming and len(train) == 0:
            raise ValueError(
                f"{type(task).__name__}.train_data() returned no examples (an empty dataset); "
                "check the data source it reads (its path, split or filters)"
            )
        if self._streaming and self.max_steps is None:
            raise ValueError(
                f"{type(task).__name__}.train_data() returned a grain.IterDataset, which has "
                "no length, so epochs cannot end the fit: set Trainer(max_steps=N)"
            )
        if self._streaming and self.worker_count:
            raise ValueError(
                f"worker_count={self.worker_count} with a streamed training set "
                "(grain.IterDataset): Grain's worker processes split a stream by slicing its "
                "source, which a stream cannot promise; use worker_count=0 (a read-ahead "
                "thread serves the stream), or return a grain.MapDataset to use workers"
            )
        if self._streaming and self.limit_train_batches is not None:
            raise ValueError(
                "limit_train_batches counts batches of an epoch, and a streamed training set "
                "(grain.IterDataset) has no epochs: use max_steps alone"
            )
        self.strategy.setup(self.batch_size)
        devices = self.strategy.num_devices
        if self.eval_batch_size % devices or self.eval_batch_size % self.strategy.process_count:
            unit = math.lcm(devices, self.strategy.process_count)
            raise ValueError(
                f"eval_batch_size {self.eval_batch_size} is not divisible by the "
                f"{devices} devices of the {self.strategy.name!r} strategy; use a multiple "
                f"of {unit}, e.g. eval_batch_size={max(unit, self.eval_batch_size // unit * unit)}"
            )
        if self._streaming:  # the stream is one epoch of max_steps batches
            steps = self.max_steps
        else:
            steps = data_lib.train_steps_per_epoch(len(train), self.batch_size)
            steps = _resolve_limit(self.limit_train_batches, steps)
        self.steps_per_epoch = steps
        self._val_every_steps = self.val_check_interval
        if isinstance(self.val_check_interval, float):  # a fraction of an epoch
            every = max(1, int(self.val_check_interval * steps))
            self._val_every_steps = every if every < steps else None  # the epoch end does it
        total = steps * self.max_epochs
        if self.max_steps is not None and self.max_steps < total:
            total = self.max_steps
        self.total_steps = total
        self._train_examples = train

    def _build(self, task: Task) -> None:
        """Model, optimizer, metrics, compiled steps; state placed by the strategy."""
        task.trainer = self
        self.task = task
        # Initialisation runs eagerly and unsharded, so the partitionable threefry
        # variant buys nothing here, while on XLA:CPU it compiles each initializer
        # ~4x slower (ResNet-8 init: 20.8 s -> 5.4 s measured on this project's CI CPU).
        # Same seed, same weights as `with jax.threefry_partitionable(False): Model(...)`.
        with jax.threefry_partitionable(False):
            model = _build_model(task, self.seed)
        updates = max(1, math.ceil(max(self.total_steps, 1) / self.accumulate_grad_batches))
        specs, self._several_optimizers = optimizer_specs(task, updates)
        pre = []
        if self.gradient_clip_norm is not None:
            pre.append(optax.clip_by_global_norm(self.gradient_clip_norm))
        for extra in self.hook.configure_gradient_transforms(trainer=self):
            pre.extend(extra or [])

        def wrap(tx: optax.GradientTransformation) -> optax.GradientTransformation:
            if pre:
                tx = optax.chain(*pre, tx)
            if self.accumulate_grad_batches > 1:
                tx = optax.MultiSteps(tx, every_k_schedule=self.accumulate_grad_batches)
            return tx

        optimizers = build_optimizers(task, model, specs, wrap)
        self._live = (model, optimizers)
        # Split apart (an optimizer holds no reference to the model's variables), so
        # the state has named parts: TrainState(model=..., optimizer=...). One optimizer's
        # state is its nnx.State; several are {name: nnx.State}.
        self._model_graphdef, model_state = nnx.split(model)
        self._optimizer_graphdefs, optimizer_states = {}, {}
        for name, optimizer in optimizers.items():
            self._optimizer_graphdefs[name], optimizer_states[name] = nnx.split(optimizer)
        state = TrainState(model=model_state, optimizer=self._pack(optimizer_states))
        model.eval()
        self._eval_graphdef = nnx.split(model)[0]
        model.train()
        if self.is_main_process:  # a __call__ flag that would override eval() (eval_mode.py)
            warn_if_flag_overrides_mode(model)
        train_metrics = task.configure_train_metrics()
        self._train_metrics_graphdef, train_metrics_state = nnx.split(train_metrics)
        self._eval_metrics_graphdef = nnx.split(task.configure_metrics())[0]

        self._state_shardings = self.strategy.state_shardings(state)
        self._state = self.strategy.place_state(state)
        self._train_metrics_state = self.strategy.place_state(train_metrics_state)
        self._step_fns = {}

    def _compiled(self, kind: str):
        """The jitted step functions, built once per Trainer and task."""
        if kind in self._step_fns:
            return self._step_fns[kind]
        task = self.task
        shardings = self._state_shardings
        constrain = not isinstance(self.strategy, SingleDeviceStrategy)

        if kind == "train":
            model_graphdef, optimizer_graphdefs = self._model_graphdef, self._optimizer_graphdefs
            metrics_graphdef = self._train_metrics_graphdef
            pack, unpack = self._pack, self._unpack

            def train_step(state, metrics_state, loss_record, batch):
                model = nnx.merge(model_graphdef, state.model)
                optimizers = {
                    name: nnx.merge(optimizer_graphdefs[name], optimizer_state)
                    for name, optimizer_state in unpack(state.optimizer).items()
                }
                metrics = nnx.merge(metrics_graphdef, metrics_state)
                loss, aux = _checked_update(task, task.training_update(model, optimizers, batch))
                metrics.update(loss=loss, **aux)
                new_state = TrainState(
                    model=nnx.state(model),
                    optimizer=pack({name: nnx.state(o) for name, o in optimizers.items()}),
                )
                if constrain:
                    new_state = jax.lax.with_sharding_constraint(new_state, shardings)
                loss_record = _record_nonfinite(loss_record, loss)
                return new_state, nnx.state(metrics), loss_record, loss

            treedef = jax.tree.structure(self._state)

            def flat_train_step(leaves, metrics_state, loss_record, batch):
                # The loop's form (see _state): the state in and out as its leaves.
                out = train_step(jax.tree.unflatten(treedef, leaves), metrics_state,
                                 loss_record, batch)
                new_leaves, new_treedef = jax.tree.flatten(out[0])
                if new_treedef != treedef:
                    raise ValueError(
                        "training_update changed the training state's structure (a "
                        "Variable added, removed or retyped during the step); the state "
                        "must keep its structure from step to step")
                return (new_leaves, *out[1:])

            fn = jax.jit(flat_train_step, donate_argnums=(0, 1, 2))
        elif kind == "compute_train_metrics":
            metrics_graphdef = self._train_metrics_graphdef

            def compute_and_reset(metrics_state):
                metrics = nnx.merge(metrics_graphdef, metrics_state)
                values = metrics.compute()
                metrics.reset()
                return values, nnx.state(metrics)

            fn = jax.jit(compute_and_reset, donate_argnums=0)
        elif kind in ("validate", "test"):
            eval_graphdef, metrics_graphdef = self._eval_graphdef, self._eval_metrics_graphdef
            step = task.validation_step if kind == "validate" else task.test_step

            def eval_step(state, metrics_state, batch):
                model = nnx.merge(eval_graphdef, state.model)
                metrics = nnx.merge(metrics_graphdef, metrics_state)
                outputs = step(model, batch)
                metrics.update(**outputs, mask=batch[data_lib.MASK_KEY])
                return nnx.state(metrics)

            fn = jax.jit(eval_step, donate_argnums=1)
        elif kind == "compute_eval_metrics":
            metrics_graphdef = self._eval_metrics_graphdef

            def compute(metrics_state):
                return nnx.merge(metrics_graphdef, metrics_state).compute()

            fn = jax.jit(compute)
        elif kind == "predict":
            eval_graphdef = self._eval_graphdef

            def predict_step(state, batch):
                return task.predict_step(nnx.merge(eval_graphdef, state.model), batch)

            fn = jax.jit(predict_step)
        else:  # pragma: no cover - internal names only
            raise KeyError(kind)
        self._step_fns[kind] = fn
        return fn

    # ------------------------------------------------------------ checkpoints

    def lower_train_step(self, batch: Mapping[str, Any]) -> jax.stages.Lowered:
        """The compiled train step lowered for ``batch`` (a batch as ``on_train_batch_start``
        sees it), without compiling or running it: ``.cost_analysis()["flops"]`` is XLA's
        FLOP count of one step, ``.as_text()`` its StableHLO. Valid once fit has built
        the state (from ``on_fit_start``)."""
        if self._state is None:
            raise RuntimeError("no train step yet: call from a fit (on_fit_start or later)")
        return self._compiled("train").lower(
            jax.tree.leaves(self._state), self._train_metrics_state, self._loss_record, batch
        )

    def _plugin_arrays(self) -> dict[str, Any]:
        plugin_arrays: dict[str, Any] = {}
        for part in self.hook.array_state_dict(trainer=self):
            plugin_arrays.update(part or {})
        return plugin_arrays

    def checkpoint_state(self) -> CheckpointContent:
        """Everything a checkpoint holds, with named fields (arrays and JSON meta)."""
        plugin_state: dict[str, Any] = {}
        for part in self.hook.state_dict(trainer=self):
            plugin_state.update(part or {})
        meta = CheckpointMeta(
            global_step=self.global_step, epoch=self.current_epoch,
            batch_in_epoch=self.batch_in_epoch, seed=self.seed,
            validation_pending=self._validation_pending, plugins=plugin_state,
            data_state=self._data_state,
        )
        return CheckpointContent(
            model=self._state.model, optimizer=self._state.optimizer,
            train_metrics=self._train_metrics_state, plugin_arrays=self._plugin_arrays(),
            meta=meta,
        )

    def checkpoint_target(self) -> dict[str, Any]:
        """The abstract arrays of a checkpoint (shapes, dtypes, shardings) to restore onto.

        Keys as :meth:`CheckpointContent.arrays`: ``model``, ``optimizer``,
        ``train_metrics`` and, when plugins have arrays, ``plugins``.
        """
        def abstract(x, sharding):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

        metrics_shardings = self.strategy.state_shardings(self._train_metrics_state)
        target = {
            "model": jax.tree.map(abstract, self._state.model, self._state_shardings.model),
            "optimizer": jax.tree.map(
                abstract, self._state.optimizer, self._state_shardings.optimizer
            ),
            "train_metrics": jax.tree.map(abstract, self._train_metrics_state, metrics_shardings),
        }
        plugin_arrays = self._plugin_arrays()
        if plugin_arrays:  # each array restores onto its own current sharding
            target["plugins"] = jax.tree.map(lambda x: abstract(x, x.sharding), plugin_arrays)
        return target

    def _restore(self, ckpt_path: str | None) -> bool:
        if ckpt_path is None:
            return False
        restored = self.hook.restore_checkpoint(
            trainer=self, ckpt_path=str(ckpt_path), target=self.checkpoint_target()
        )
        if restored is None:
            raise ValueError(
                f"ckpt_path={ckpt_path!r} given but no checkpoint plugin is active; "
                "enable the 'checkpoint' plugin or drop ckpt_path"
            )
        if not restored:
            return False
        self._state = TrainState(model=restored.model, optimizer=restored.optimizer)
        self._train_metrics_state = restored.train_metrics
        meta = restored.meta
        self.global_step = int(meta.global_step)
        self.current_epoch = int(meta.epoch)
        self.batch_in_epoch = int(meta.batch_in_epoch)
        self._validation_pending = bool(meta.validation_pending)
        self._data_state = meta.data_state
        self._has_trained_state = True
        self.resumed_from = restored.source
        self.hook.load_state_dict(trainer=self, state=dict(meta.plugins))
        self.hook.load_array_state_dict(trainer=self, state=dict(restored.plugin_arrays))
        return True

    def _init_from(self, task: Task, init_from: Any) -> None:
        """``fit(init_from=...)``: matching parameters and batch statistics, nothing else."""
        self.init_report = None
        if init_from is None:
            return
        tensors, source = init_from_lib.read_weights(init_from)
        model_state, self.init_report = init_from_lib.partial_state(
            self._state.model, task.import_weights(tensors), source)
        self._state = self.strategy.place_state(TrainState(model_state, self._state.optimizer))
        if self.is_main_process:
            (log.warning if self.init_report.skipped else log.info)(
                "%s", self.init_report.summary())

    # --------------------------------------------------------------------- fit

    def fit(self, task: Task, ckpt_path: str | None = None,
            init_from: str | None = None) -> Trainer:
        """Train ``task``; resume from ``ckpt_path`` (``"last"``, ``"best"`` or a path;
        ``"auto"``: the newest intact checkpoint if the run directory has one, else fresh).

        ``init_from``: start from another run's weights instead of the initialisation:
        a checkpoint (run, checkpoints or step directory) or a weight file; parameters
        and batch statistics that match by path and shape are copied, the rest (a new
        head) start fresh, no optimizer state or counters come along; the report is
        logged and kept as ``trainer.init_report`` (:mod:`nnx_trainer.init_from`). A
        checkpoint that ``ckpt_path`` resumes replaces it.
        """
        # A Trainer can fit again (e.g. after early stopping): stop flags are per fit.
        self.should_stop, self.stop_reason, self.preempted = False, None, False
        self.fit_seconds, self._data_wait_closed = 0.0, 0.0
        self.compile_seconds = {}
        # Counters start at zero unless a checkpoint restores them.
        self.global_step = self.current_epoch = self.batch_in_epoch = 0
        self._validation_pending = False  # set by a restore or a preemption at an epoch end
        self._data_state = None  # a stream's position: set by a restore
        self.resumed_from = None  # set by a restore
        with self._run("fit"):
            self._plan(task)
            self._build(task)
            self._init_from(task, init_from)
            resumed = self._restore(ckpt_path)
            if resumed:
                # INFO: the progress plugin prints the same line, numbered the same way
                # (1-based epoch of the epochs this fit runs), for whoever watches the run.
                epochs = (max(1, math.ceil(self.total_steps / self.steps_per_epoch))
                          if self.steps_per_epoch else self.max_epochs)
                log.info(
                    "resumed from %s at step %d (epoch %d/%d, %d of its batches done)",
                    self.resumed_from or ckpt_path, self.global_step, self.current_epoch + 1,
                    epochs, self.batch_in_epoch,
                )
            self._has_trained_state = True  # from here on the state is this fit's
            self._val_examples = task.val_data()
            if self._val_examples is not None and (
                    self.check_val_every_n_epoch or self._val_every_steps):
                # An empty or mistyped validation set fails now, not after an epoch.
                _named_eval_sets(self._val_examples, f"{type(task).__name__}.val_data()")
            self.hook.log_hyperparams(trainer=self, params=self.hyperparameters())
            self.hook.on_fit_start(trainer=self, task=task)
            with _preemption_signals(self) as signals:
                self._preemption_sync = signals.coordinated
                start = time.perf_counter()
                self._fit_loop()
                self.fit_seconds = time.perf_counter() - start
            reason = "preemption" if self.preempted else "end"
            self.hook.on_save_checkpoint(trainer=self, step=self.global_step, reason=reason)
            self.hook.wait_for_checkpoints(trainer=self)
            if not self.preempted:
                self.hook.on_fit_end(trainer=self, task=task)
        return self

    @contextlib.contextmanager
    def _run(self, stage: str) -> Iterator[None]:
        """One fit/validate/test/predict call: ``on_exception`` on failure, then always
        ``on_run_end`` with the outcome (plugins tear down there)."""
        self.stage = stage
        lock = self._hold_run_dir(stage)  # refused: raises before any hook or write
        exception: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            exception = exc
            self.hook.on_exception(trainer=self, exception=exc)
            raise
        finally:
            if exception is not None:
                outcome = Outcome.EXCEPTION
            elif stage == "fit" and self.preempted:
                outcome = Outcome.PREEMPTED
            elif stage == "fit" and self.should_stop:
                outcome = Outcome.STOPPED
            else:
                outcome = Outcome.COMPLETED
            try:
                # Every plugin tears down, even after one of them raised.
                call_each(self.plugin_manager, "on_run_end", trainer=self, stage=stage,
                          outcome=outcome, exception=exception)
            finally:
                self._release_run_dir(lock)

    def _hold_run_dir(self, stage: str) -> RunDirLock | None:
        """Lock ``run_dir`` for this call (see :mod:`nnx_trainer.run_lock`), or raise
        :class:`RunDirInUse` in every process, having written nothing.

        Process 0 holds the lock; with several processes it broadcasts whether it got it,
        so all of them stop together instead of the others waiting in a collective.
        A call made while this trainer already runs (a plugin validating inside fit)
        shares the lock it holds: ``None``.
        """
        if self._run_lock is not None:
            return None
        lock, failed = RunDirLock(self.run_dir), None
        if self.strategy.process_index == 0:
            try:
                lock.acquire(stage)
            except Exception as exc:  # any failure: the other processes must hear of it
                failed = exc
        if self.strategy.process_count > 1:
            # 0: locked; 1: held by another run; 2: process 0 failed otherwise (an OSError).
            code = 0 if failed is None else 1 if isinstance(failed, RunDirInUse) else 2
            code = int(multihost_utils.broadcast_one_to_all(np.int32(code)))
            if code == 1 and failed is None:
                failed = RunDirInUse(
                    f"run directory {self.run_dir} is in use by another run (process 0's "
                    "error names it). Wait until that run ends, or choose another run "
                    "directory (--run-dir, Trainer(run_dir=...))")
            elif code == 2 and failed is None:
                failed = RuntimeError(f"process 0 could not lock the run directory "
                                      f"{self.run_dir}; its error says why")
        if failed is not None:
            raise failed
        self._run_lock = lock
        return lock

    def _release_run_dir(self, lock: RunDirLock | None) -> None:
        if lock is not None:
            self._run_lock = None
            lock.release()

    def _fit_loop(self) -> None:
        train_step = self._compiled("train")
        # (first non-finite step, its loss, next step), kept on device by the train step.
        self._loss_record = self.strategy.place_state(
            (np.asarray(-1, np.int32), np.asarray(0.0, np.float32),
             np.asarray(self.global_step, np.int32))
        )
        if self._validation_pending and self._validates_after_epoch():
            # Resumed from a preemption on the previous epoch's last batch: its epoch-end
            # validation, skipped then, runs now at the same step, then that step's save
            # point, before the next epoch starts, as it would have.
            self._run_eval("validate", in_fit=True)
            self._validation_pending = False
            self._save_point()
        self._validation_pending = False
        if self.current_epoch >= self.max_epochs or self._done():
            return
        # One pipeline for the whole fit (one set of Grain threads or worker processes),
        # starting at the restored (epoch, batch): the counters are the data position.
        remaining = (self.max_epochs - self.current_epoch) * self.steps_per_epoch
        remaining -= self.batch_in_epoch
        if self.max_steps is not None:
            remaining = min(remaining, self.max_steps - self.global_step)
        config = self._pipeline_config(self.batch_size)
        if self._streaming:
            # A stream's position is Grain's iterator state, kept with each checkpoint.
            iterator = iter(data_lib.stream_pipeline(
                self._train_examples, self.task.train_transforms(), config, seed=self.seed
            ))
            if self._data_state is not None:
                iterator.set_state(self._data_state)
            elif self.global_step:
                raise ValueError(
                    f"resuming a streamed fit at step {self.global_step} from a checkpoint "
                    "without the stream's position (written by a fit over indexed data?); "
                    "start a new run, or resume with the train_data() that wrote it"
                )
        else:
            iterator = iter(data_lib.train_pipeline(
                self._train_examples, self.task.train_transforms(), config, seed=self.seed,
                epoch=self.current_epoch, num_epochs=self.max_epochs - self.current_epoch,
                start_batch=self.batch_in_epoch, steps_per_epoch=self.steps_per_epoch,
            ))
        with data_lib.DevicePrefetcher(
            iterator, self.strategy.shard_batch, size=self.prefetch, limit=remaining,
            record_state=self._streaming,
        ) as prefetcher:
            self._prefetcher = prefetcher
            try:
                self._epochs(prefetcher, train_step)
            finally:
                self._prefetcher = None
                self._data_wait_closed += prefetcher.wait_seconds
        if self.global_step % self.log_every_n_steps and not self.preempted:
            self._log_train_metrics()

    def _validates_after_epoch(self) -> bool:
        """Whether the epoch that just closed (counters at the next one) ends with validation."""
        return bool(self.check_val_every_n_epoch) and (
            self.current_epoch % self.check_val_every_n_epoch == 0
        )

    def _epochs(self, prefetcher: data_lib.DevicePrefetcher, train_step) -> None:
        """Epoch after epoch from the current counters: hooks, steps, epoch-end validation."""
        while self.current_epoch < self.max_epochs and not self._done():
            epoch = self.current_epoch
            self.hook.on_train_epoch_start(trainer=self, epoch=epoch)
            self._train_epoch(prefetcher, train_step)
            if self.batch_in_epoch < self.steps_per_epoch:
                # Stopped inside the epoch (max_steps, should_stop, preemption): the
                # counters stay as they are so a resume continues it.
                break
            self.hook.on_train_epoch_end(trainer=self, epoch=epoch)
            self.current_epoch += 1
            self.batch_in_epoch = 0
            if self._validates_after_epoch():
                if self.preempted:
                    # No time to validate now: the preemption checkpoint records it, and
                    # the resumed fit runs it first (at this step).
                    self._validation_pending = True
                else:
                    self._run_eval("validate", in_fit=True)
            self._save_point()

    def _train_epoch(self, prefetcher: data_lib.DevicePrefetcher, train_step) -> None:
        """Steps over the rest of this epoch's batches until it ends or a stop is asked for."""
        while self.batch_in_epoch < self.steps_per_epoch:
            try:
                batch, data_state = next(prefetcher)
            except StopIteration:
                if self._streaming:
                    raise RuntimeError(
                        f"the training stream ended after {self.global_step} steps, before "
                        f"max_steps={self.max_steps}; lower max_steps or make train_data() "
                        "longer (e.g. .repeat() the source before to_iter_dataset())"
                    ) from None
                raise RuntimeError(
                    f"the training data ran out at step {self.global_step} (epoch "
                    f"{self.current_epoch}, batch {self.batch_in_epoch}); did train_data() "
                    "change length during the fit?"
                ) from None
            step = self.global_step
            self._data_state = data_state  # None for indexed data
            self.hook.on_train_batch_start(trainer=self, step=step, batch=batch)
            t0 = time.perf_counter()
            treedef, leaves = self._take_flat_state()
            leaves, self._train_metrics_state, self._loss_record, loss = train_step(
                leaves, self._train_metrics_state, self._loss_record, batch
            )
            self._state_flat = (treedef, leaves)
            if "train" not in self.compile_seconds:  # the first call traces and compiles
                self.compile_seconds["train"] = time.perf_counter() - t0
            prefetcher.refill()
            self.global_step += 1
            self.batch_in_epoch += 1
            if self._preemption_sync and multihost_utils.reached_preemption_sync_point(
                    self.global_step):
                self._preempted_together()
            self.hook.on_train_batch_end(trainer=self, step=step, loss=loss)
            if self.global_step % self.log_every_n_steps == 0:
                self._log_train_metrics()
            closes_validated_epoch = self.batch_in_epoch == self.steps_per_epoch and bool(
                self.check_val_every_n_epoch
            ) and (self.current_epoch + 1) % self.check_val_every_n_epoch == 0
            if (self._val_every_steps and self.global_step % self._val_every_steps == 0
                    and not closes_validated_epoch):  # the epoch end validates this step
                self._run_eval("validate", in_fit=True)
            if self.batch_in_epoch < self.steps_per_epoch:
                # An epoch's last step reaches its save point in _epochs, after the
                # epoch-end validation, with the counters at the next epoch.
                self._save_point()
            if self._done():
                break

    def _preempted_together(self) -> None:
        """Every process reached the agreed step after a preemption notice: stop here."""
        log.warning("preemption notice (SIGTERM to one of %d processes): every process "
                    "stops after step %d and saves", self.strategy.process_count,
                    self.global_step)
        self.preempted = True
        self.stop_reason = "SIGTERM"

    def _save_point(self) -> None:
        """The loop's one checkpoint save point (invariant 7): ask, then save.

        The checkpoint plugin answers from its Orbax save-decision policy (a time-based
        answer is taken on process 0 and agreed by every process); every process asks at
        the same steps, so they all enter a save together or none does.
        """
        if self.preempted or self.fast_dev_run:
            return  # a preemption saves once, at the end of fit; fast_dev_run never saves
        if self.hook.should_save_checkpoint(trainer=self, step=self.global_step):
            self.hook.on_save_checkpoint(trainer=self, step=self.global_step, reason="periodic")

    def first_nonfinite_loss(self) -> tuple[int, float] | None:
        """``(step, loss)`` of this fit's first step whose training loss was NaN or Inf.

        ``None`` when every step so far had a finite loss. The train step itself keeps
        this record on device (no extra dispatch per step); reading it waits for the
        device to finish the steps already dispatched, so call it at a cadence.
        """
        record = self._loss_record
        if record is None:
            return None
        first = int(record[0])
        return None if first < 0 else (first, float(record[1]))

    def first_nonfinite_state(self) -> str | None:
        """The path (``"model/..."``, ``"optimizer/..."``) of the first training-state array
        holding a NaN or Inf, or ``None`` when every one is finite.

        The loss can stay finite while the state is not (e.g. batch-norm statistics
        overflow at a huge learning rate), so the loss record alone misses it. One jitted
        reduction over the state and one scalar read (replicated: every process reads the
        same answer); it waits for the device, so call it at a cadence.
        """
        if self._state_flat is not None:  # the loop's form: no tree rebuilt for a check
            leaves = self._state_flat[1]
        elif self._state_tree is not None:
            leaves = jax.tree.leaves(self._state_tree)
        else:
            return None
        index = first_nonfinite_leaf(leaves)
        if index < 0:
            return None
        return leaf_path(self._state, index)

    def _done(self) -> bool:
        if self.preempted or self.should_stop:
            return True
        return self.max_steps is not None and self.global_step >= self.max_steps

    def _log_train_metrics(self) -> None:
        values, self._train_metrics_state = self._compiled("compute_train_metrics")(
            self._train_metrics_state
        )
        metrics = {f"train/{k}": v for k, v in values.items()}
        metrics["epoch"] = self.current_epoch
        self.callback_metrics.update(metrics)
        self.hook.log_metrics(trainer=self, metrics=metrics, step=self.global_step)

    # -------------------------------------------------------------- evaluation

    def _ensure_built(self, task: Task, ckpt_path: str | None, untrained: bool) -> None:
        """Build ``task`` for an evaluation, keeping the trained state (never a silent init).

        After a fit (or a restore), a task whose model has the same state structure is
        evaluated with the trained weights, whichever instance it is; a different
        structure fails. With no trained state, a checkpoint or ``untrained=True`` is needed.
        """
        if self.task is not task or self._state is None:
            trained = self._state if self._has_trained_state else None
            self._plan(task)
            self._build(task)
            if trained is not None and ckpt_path is None:
                self._adopt_trained_state(task, trained)
        if ckpt_path is not None:
            if not self._restore(ckpt_path):
                raise FileNotFoundError(
                    f"ckpt_path={ckpt_path!r}: no checkpoint to evaluate in "
                    f"{self.run_dir}; give a checkpoint directory or fit first"
                )
        elif not self._has_trained_state and not untrained:
            raise RuntimeError(
                f"{self.stage} would use the untrained (freshly initialised) weights of "
                f"{type(task).__name__}'s model: this trainer has no fitted or restored "
                "state. Call fit first, pass ckpt_path ('last', 'best' or a checkpoint "
                "directory), or pass untrained=True to evaluate the initial weights on purpose"
            )

    def _adopt_trained_state(self, task: Task, trained: TrainState) -> None:
        mismatch = structure_mismatch(trained.model, self._state.model)
        if mismatch is not None:
            raise ValueError(
                f"{type(task).__name__}'s model does not have the structure of the trained "
                f"model ({mismatch}), so the trained weights cannot be used for it; "
                "evaluate a task with the same model, or pass ckpt_path= for a checkpoint "
                "of this model"
            )
        optimizer = trained.optimizer
        if structure_mismatch(trained.optimizer, self._state.optimizer) is not None:
            optimizer = self._state.optimizer  # evaluation never reads it; keep it whole
        self._state = self.strategy.place_state(TrainState(trained.model, optimizer))
        self._has_trained_state = True

    def validate(
        self, task: Task, ckpt_path: str | None = None, *, untrained: bool = False
    ) -> dict[str, float]:
        """Evaluate on ``task.val_data()``; returns ``{"val/<metric>": value}``.

        Uses the fitted (or restored) state, or the checkpoint ``ckpt_path``; refuses to
        evaluate freshly initialised weights unless ``untrained=True``.
        """
        return self._standalone_eval(task, "validate", ckpt_path, untrained)

    def test(
        self, task: Task, ckpt_path: str | None = None, *, untrained: bool = False
    ) -> dict[str, float]:
        """Evaluate on ``task.test_data()``; returns ``{"test/<metric>": value}``.

        Weights as :meth:`validate`.
        """
        return self._standalone_eval(task, "test", ckpt_path, untrained)

    def _standalone_eval(
        self, task: Task, stage: str, ckpt_path: str | None, untrained: bool
    ) -> dict[str, float]:
        with self._run(stage):
            self._ensure_built(task, ckpt_path, untrained)
            if stage == "validate":
                self._val_examples = task.val_data()
            metrics = self._run_eval(stage, in_fit=False)
            self.hook.wait_for_checkpoints(trainer=self)
            return {k: float(v) for k, v in metrics.items()}

    def _run_eval(self, stage: str, in_fit: bool) -> dict[str, Any]:
        """One evaluation: every set of ``val_data()`` (or ``test_data()``), one start/end.

        A dataset gives ``val/<metric>``; a ``{name: dataset}`` mapping gives
        ``val/<name>/<metric>`` for each set, all in one ``on_validation_end``, so a
        checkpoint monitor or early stopping can name any of them.
        """
        validating = stage == "validate"
        examples = self._val_examples if validating else self.task.test_data()
        if examples is None:
            return {}
        prefix, source = ("val", "val_data") if validating else ("test", "test_data")
        sets = _named_eval_sets(examples, f"{type(self.task).__name__}.{source}()")
        eval_step = self._compiled(stage)
        self.hook.on_validation_start(trainer=self, stage=stage)
        results: dict[str, Any] = {}
        batch_index = 0
        for name, dataset in sets.items():
            iterator, num_batches = data_lib.eval_pipeline(
                dataset, self.task.eval_transforms(),
                self._pipeline_config(self.eval_batch_size),
                limit_batches=_resolve_limit(
                    self.limit_val_batches, math.ceil(len(dataset) / self.eval_batch_size)
                ),
            )
            # Fresh metric state each evaluation: the eval step donates (consumes) it.
            metrics_state = self.strategy.place_state(nnx.state(self.task.configure_metrics()))
            with data_lib.DevicePrefetcher(
                iter(iterator), self.strategy.shard_batch, size=self.prefetch, limit=num_batches
            ) as prefetcher:
                for batch, _ in prefetcher:
                    t0 = time.perf_counter()
                    metrics_state = eval_step(self._state, metrics_state, batch)
                    if stage not in self.compile_seconds:  # the first call traces and compiles
                        self.compile_seconds[stage] = time.perf_counter() - t0
                    prefetcher.refill()
                    self.hook.on_validation_batch_end(trainer=self, stage=stage,
                                                      batch_index=batch_index)
                    batch_index += 1
            values = self._compiled("compute_eval_metrics")(metrics_state)
            tag = prefix if name is None else f"{prefix}/{name}"
            results.update({f"{tag}/{k}": v for k, v in values.items()})
        self.callback_metrics.update(results)
        self.hook.on_validation_end(trainer=self, stage=stage, metrics=results)
        self.hook.log_metrics(trainer=self, metrics=results, step=self.global_step)
        return results

    def predict(
        self, task: Task, ckpt_path: str | None = None, *, untrained: bool = False
    ) -> Any:
        """Run ``task.predict_step`` on ``task.predict_data()``; host arrays, a row per example.

        Weights as :meth:`validate`.
        """
        with self._run("predict"):
            self._ensure_built(task, ckpt_path, untrained)
            examples = task.predict_data()
            if examples is None:
                raise ValueError(
                    f"{type(task).__name__}.predict_data() returned None; "
                    "override it (or test_data/val_data) to return examples"
                )
            iterator, num_batches = data_lib.eval_pipeline(
                examples, task.eval_transforms(), self._pipeline_config(self.eval_batch_size),
                source=f"{type(task).__name__}.predict_data()",
            )
            predict_step = self._compiled("predict")
            self.hook.on_predict_start(trainer=self)
            chunks, masks = [], []
            with data_lib.DevicePrefetcher(
                iter(iterator), self.strategy.shard_batch, size=self.prefetch, limit=num_batches
            ) as prefetcher:
                for batch, _ in prefetcher:
                    chunks.append(predict_step(self._state, batch))
                    masks.append(batch[data_lib.MASK_KEY])
                    prefetcher.refill()
            mask = np.concatenate([np.asarray(jax.device_get(m)) for m in masks])
            outputs = jax.tree.map(
                lambda *xs: np.concatenate([np.asarray(jax.device_get(x)) for x in xs])[mask],
                *chunks,
            )
            self.hook.on_predict_end(trainer=self, outputs=outputs)
            return outputs

    # ------------------------------------------------------------------ misc

    def hyperparameters(self) -> dict[str, Any]:
        """Trainer options and the task's hyperparameters, as logged at fit start."""
        return {
            "trainer": {
                "max_epochs": self.max_epochs, "max_steps": self.max_steps,
                "batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size,
                "seed": self.seed, "precision": self.precision,
                "strategy": self.strategy.name, "gradient_clip_norm": self.gradient_clip_norm,
                "accumulate_grad_batches": self.accumulate_grad_batches,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                "devices": self.strategy.num_devices, "processes": self.strategy.process_count,
                "optimizers": sorted(self._live[1]) if self._live is not None else [],
                "streamed_training_data": self._streaming,
            },
            "task": self.task.hparams() if self.task is not None else {},
            "model": model_summary(self._state.model) if self._state is not None else {},
        }


def _build_model(task: Task, seed: int) -> nnx.Module:
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


def _checked_update(task: Task, result: Any) -> tuple[jax.Array, Mapping[str, Any]]:
    """``training_update``'s ``(loss, aux)``, or a TypeError naming what came back instead."""
    where = f"{type(task).__name__}.training_update"
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Mapping)):
        raise TypeError(f"{where} must return (scalar loss, dict of metric inputs), got "
                        f"{type(result).__name__}")
    loss, aux = result
    if jnp.shape(loss) != ():
        raise TypeError(f"{where} returned a loss of shape {jnp.shape(loss)}; it must be a "
                        "scalar (average over the batch)")
    return loss, aux


def _record_nonfinite(record: tuple, loss: jax.Array) -> tuple:
    """Fold one step's loss into ``(first bad step, its loss, next step)``; traced in the step."""
    first, bad_loss, step = record
    is_new = (first < 0) & ~jnp.isfinite(loss)  # keep the first: later steps are NaN too
    first = jnp.where(is_new, step, first)
    bad_loss = jnp.where(is_new, loss.astype(jnp.float32), bad_loss)
    return first, bad_loss, step + 1


class _preemption_signals:
    """SIGTERM/SIGINT during fit ask for a clean stop after the current step.

    A second SIGINT falls through to the default handler, so Ctrl-C twice still
    kills a stuck run. Handlers are only installed from the main thread.

    With more than one process and JAX's preemption service on (``jax.distributed``
    starts it by default), SIGTERM is left to that service (``coordinated``): it
    catches the signal in whichever process gets it, tells every process, and agrees
    on the step after which all of them stop (``reached_preemption_sync_point``).
    A Python handler here would replace its handler and stop one process alone, which
    the others' next collective would then wait for forever.
    """

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.previous: dict[int, Any] = {}
        self.coordinated = (trainer.strategy.process_count > 1
                            and bool(jax.config.jax_enable_preemption_service))
        self.signals = (signal.SIGINT,) if self.coordinated else (
            signal.SIGTERM, signal.SIGINT)

    def _handler(self, signum, frame) -> None:
        log.warning("received %s: stopping after the current step", signal.Signals(signum).name)
        self.trainer.preempted = True
        self.trainer.stop_reason = signal.Signals(signum).name
        signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> _preemption_signals:
        try:
            for sig in self.signals:
                self.previous[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread: leave signals to the host program
            self.previous.clear()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _named_eval_sets(examples: Any, where: str) -> dict[str | None, grain.MapDataset]:
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


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_count_or_fraction(**values: int | float | None) -> None:
    """Lightning's rule: an int is a count (>= 1), a float a fraction in (0, 1]."""
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name} must be an int (a count) or a float (a fraction), "
                             f"got {value!r}")
        if isinstance(value, int) and value < 1:
            raise ValueError(f"{name} must be a positive count, got {value}")
        if isinstance(value, float) and not 0.0 < value <= 1.0:
            raise ValueError(
                f"{name}={value!r}: a float is a fraction and must be in (0, 1]; "
                f"pass an int for a count (e.g. {name}={max(1, int(value))})"
            )


def _resolve_limit(limit: int | float | None, total: int) -> int:
    """Batches to run of ``total``: a count caps it, a fraction takes its share (at least 1)."""
    if limit is None:
        return total
    if isinstance(limit, float):
        return max(1, int(limit * total))
    return min(total, limit)


def _check_positive_or_none(**values: float | None) -> None:
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be positive or None, got {value!r}")

