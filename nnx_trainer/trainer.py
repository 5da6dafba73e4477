"""The Trainer: fit / validate / test / predict around a user's Task.

The Trainer holds the options and the plugin manager and hands each call's parts to
the modules that own them: :mod:`~nnx_trainer.fit_plan` (step counts, the cadence),
:mod:`~nnx_trainer.progress` (counters, stop flags), :mod:`~nnx_trainer.model_state`,
:mod:`~nnx_trainer.steps` (the jitted steps), :mod:`~nnx_trainer.fit_loop` (the loop and
its ordering invariants), :mod:`~nnx_trainer.evaluation`,
:mod:`~nnx_trainer.checkpoint_content` and :mod:`~nnx_trainer.preemption`. Plugins see
the Trainer itself (``trainer=`` in every hook); its run-state attributes read and set
the fit's :class:`~nnx_trainer.progress.FitProgress`.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nnx_trainer import init_from as init_from_lib
from nnx_trainer.checkpoint_content import apply_init_from, checkpoint_target, resume
from nnx_trainer.checkpoint_content import checkpoint_content as checkpoint_content_of
from nnx_trainer.compile_cache import enable_compilation_cache
from nnx_trainer.evaluation import evaluate, use_weights
from nnx_trainer.evaluation import predict as run_predict
from nnx_trainer.fit_loop import run_fit
from nnx_trainer.fit_plan import FitPlan, plan_fit
from nnx_trainer.model_state import ModelState
from nnx_trainer.option_checks import PRECISIONS, check_options
from nnx_trainer.plugin_manager import create_plugin_manager
from nnx_trainer.progress import FitProgress
from nnx_trainer.run_call import default_run_dir, lock_in_every_process, run_call
from nnx_trainer.run_context import RunContext
from nnx_trainer.run_lock import RunDirLock
from nnx_trainer.state import CheckpointContent, TrainState
from nnx_trainer.steps import CompiledSteps
from nnx_trainer.strategy import Strategy, resolve_strategy
from nnx_trainer.summary import model_summary
from nnx_trainer.task import Task


def _on_progress(field: str, doc: str) -> property:
    """A Trainer attribute that reads and sets the fit's :class:`FitProgress` field."""
    return property(lambda self: getattr(self.progress, field),
                    lambda self, value: setattr(self.progress, field, value), doc=doc)


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
        check_options(
            max_epochs=max_epochs, max_steps=max_steps, batch_size=batch_size,
            eval_batch_size=eval_batch_size, log_every_n_steps=log_every_n_steps,
            accumulate_grad_batches=accumulate_grad_batches,
            gradient_clip_norm=gradient_clip_norm, val_check_interval=val_check_interval,
            limit_train_batches=limit_train_batches, limit_val_batches=limit_val_batches,
            precision=precision, worker_count=worker_count,
        )
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
        self.strategy = resolve_strategy(strategy, self.hook, self)
        # After the strategy (which joins a multi-process run): every process must
        # write into the same default directory, so process 0's clock names it.
        self.run_dir = Path(run_dir) if run_dir is not None else default_run_dir(self.strategy)
        # Run state: the parts below, plus what plugins read here.
        self.task: Task | None = None
        self.stage: str | None = None  # "fit", "validate", "test" or "predict": the latest call
        self.progress = FitProgress()  # counters and stop flags, fresh each fit
        self.callback_metrics: dict[str, Any] = {}
        self.init_report: init_from_lib.InitReport | None = None  # fit(init_from=...)'s
        self._plan: FitPlan | None = None  # the latest plan_fit's
        self._model = ModelState(self.strategy)
        self._steps: CompiledSteps | None = None
        self._val_examples: Any = None  # task.val_data() of the current call
        self._run_lock: RunDirLock | None = None  # held during fit/validate/test/predict
        self.hook.on_plugins_loaded.call_historic(kwargs={"trainer": self})

    # The fit's progress, read and set by plugins as Trainer attributes.
    global_step = _on_progress("global_step", "Steps completed (one batch each).")
    current_epoch = _on_progress("epoch", "The epoch the next step belongs to.")
    batch_in_epoch = _on_progress("batch_in_epoch", "Batches of the current epoch consumed.")
    should_stop = _on_progress("should_stop", "Set by a plugin: stop after this step.")
    stop_reason = _on_progress("stop_reason", "Why the fit stopped early, if it did.")
    preempted = _on_progress("preempted", "A signal stopped the fit (the state was saved).")
    resumed_from = _on_progress("resumed_from", "The checkpoint the latest restore read.")
    fit_seconds = _on_progress("fit_seconds", "Wall seconds of the latest fit's loop.")
    compile_seconds = _on_progress("compile_seconds",
                                   "Seconds of each step kind's first (compiling) call.")

    @property
    def data_wait_seconds(self) -> float:
        """Host seconds this fit spent blocked on the data pipeline (live, no device sync)."""
        return self.progress.data_wait_seconds

    @property
    def steps_per_epoch(self) -> int:
        """Training steps in one epoch (0 before a fit or evaluation planned one)."""
        return self._plan.steps_per_epoch if self._plan is not None else 0

    @property
    def total_steps(self) -> int:
        """Steps the fit runs when nothing stops it early (0 before planning)."""
        return self._plan.total_steps if self._plan is not None else 0

    @property
    def has_val_data(self) -> bool:
        """Whether ``task.val_data()`` of the current call returned examples."""
        return self._val_examples is not None

    @property
    def is_main_process(self) -> bool:
        """True in the process that logs and writes run files."""
        return self.strategy.is_main_process

    @property
    def model(self) -> nnx.Module:
        """The live model, synchronised with the training state (valid until the next step)."""
        return self._model.sync_live()[0]

    @property
    def optimizer(self) -> nnx.Optimizer:
        """The live optimizer, synchronised with the training state (one optimizer only;
        see :attr:`optimizers` for several)."""
        return self._model.single_optimizer()

    @property
    def optimizers(self) -> dict[str, nnx.Optimizer]:
        """The live optimizers by name (``"default"`` for a single one), synchronised."""
        return dict(self._model.sync_live()[1])

    @property
    def state(self) -> TrainState:
        """The training state: ``state.model`` and ``state.optimizer``, each an
        ``nnx.State`` of device arrays.

        The arrays are donated to the next train step: copy what must outlive it.
        Assigning a new state (same structure, shapes and dtypes, e.g. swapped-in
        averaged weights) is allowed between steps.
        """
        return self._model.state

    @state.setter
    def state(self, new_state: TrainState) -> None:
        self._model.replace(new_state)

    # ------------------------------------------------------------------ setup

    def _build(self, task: Task) -> None:
        """Plan from the data (bad sizes fail first), then model, optimizers, metrics."""
        self._plan = plan_fit(
            task, self.strategy, batch_size=self.batch_size,
            eval_batch_size=self.eval_batch_size, max_epochs=self.max_epochs,
            max_steps=self.max_steps, limit_train_batches=self.limit_train_batches,
            check_val_every_n_epoch=self.check_val_every_n_epoch,
            val_check_interval=self.val_check_interval,
            log_every_n_steps=self.log_every_n_steps, worker_count=self.worker_count,
            fast_dev_run=self.fast_dev_run,
        )
        task.trainer = self
        self.task = task
        self._model.build(
            task, seed=self.seed, total_steps=self.total_steps,
            accumulate_grad_batches=self.accumulate_grad_batches,
            gradient_clip_norm=self.gradient_clip_norm, warn=self.is_main_process,
            extra_transforms=lambda: self.hook.configure_gradient_transforms(trainer=self),
        )
        self._steps = CompiledSteps(task, self._model, self.strategy)

    def _context(self) -> RunContext:
        """The current call's parts, for the modules that run them."""
        return RunContext(
            view=self, hook=self.hook, strategy=self.strategy, task=self.task,
            plan=self._plan, progress=self.progress, model=self._model, steps=self._steps,
            callback_metrics=self.callback_metrics, seed=self.seed,
            batch_size=self.batch_size, eval_batch_size=self.eval_batch_size,
            limit_val_batches=self.limit_val_batches, worker_count=self.worker_count,
            prefetch=self.prefetch, val_examples=self._val_examples,
        )

    # ------------------------------------------------------------ checkpoints

    def lower_train_step(self, batch: Mapping[str, Any]) -> jax.stages.Lowered:
        """The compiled train step lowered for ``batch`` (a batch as ``on_train_batch_start``
        sees it), without compiling or running it: ``.cost_analysis()["flops"]`` is XLA's
        FLOP count of one step, ``.as_text()`` its StableHLO. Valid once fit has built
        the state (from ``on_fit_start``)."""
        if self._model.state is None:
            raise RuntimeError("no train step yet: call from a fit (on_fit_start or later)")
        return self._steps.lower_train(batch)

    def checkpoint_state(self) -> CheckpointContent:
        """Everything a checkpoint holds, with named fields (arrays and JSON meta)."""
        return checkpoint_content_of(self._context())

    def checkpoint_target(self) -> dict[str, Any]:
        """The abstract arrays of a checkpoint (shapes, dtypes, shardings) to restore onto.

        Keys as :meth:`CheckpointContent.arrays`: ``model``, ``optimizer``,
        ``train_metrics`` and, when plugins have arrays, ``plugins``.
        """
        return checkpoint_target(self._context())

    def first_nonfinite_loss(self) -> tuple[int, float] | None:
        """``(step, loss)`` of this fit's first step whose training loss was NaN or Inf.

        ``None`` when every step so far had a finite loss. The train step itself keeps
        this record on device (no extra dispatch per step); reading it waits for the
        device to finish the steps already dispatched, so call it at a cadence.
        """
        return self._model.first_nonfinite_loss()

    def first_nonfinite_state(self) -> str | None:
        """The path (``"model/..."``, ``"optimizer/..."``) of the first training-state array
        holding a NaN or Inf, or ``None`` when every one is finite.

        The loss can stay finite while the state is not (e.g. batch-norm statistics
        overflow at a huge learning rate), so the loss record alone misses it. Checked on the
        device, a flag per array read back (replicated: every process reads the same
        answer); it waits for the device, so call it at a cadence.
        """
        return self._model.first_nonfinite_state()

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

        A model build that compiled many one-off programs (ResNet-50's does) ends with
        ``jax.clear_caches()``: functions jitted before compile again at their next call
        (:mod:`nnx_trainer.host_memory`).
        """
        # A Trainer can fit again (e.g. after early stopping): counters start at zero
        # unless a checkpoint restores them; stop flags and timings are per fit.
        self.progress = FitProgress()
        with self._run("fit"):
            self._build(task)
            ctx = self._context()
            self.init_report = None  # stays None if init_from fails
            self.init_report = apply_init_from(ctx, init_from, report=self.is_main_process)
            resume(ctx, ckpt_path)  # a checkpoint replaces init_from's weights
            self._model.trained = True  # from here on the state is this fit's
            self._val_examples = task.val_data()
            run_fit(self._context(), self.hyperparameters)
        return self

    @contextlib.contextmanager
    def _run(self, stage: str) -> Iterator[None]:
        """One fit/validate/test/predict call (:func:`~nnx_trainer.run_call.run_call`).

        It holds ``run_dir``'s lock (refused: raises before any hook or write); a call
        made while this trainer already runs (a plugin validating inside fit) shares it.
        """
        self.stage = stage
        outer = self._run_lock
        if outer is None:
            self._run_lock = lock_in_every_process(self.run_dir, stage, self.strategy)
        try:
            with run_call(self, self.plugin_manager, stage, self.progress,
                          self._run_lock if outer is None else None):
                yield
        finally:
            self._run_lock = outer

    # -------------------------------------------------------------- evaluation

    def _ensure_built(self, task: Task, ckpt_path: str | None, untrained: bool) -> None:
        """Build ``task`` for an evaluation, keeping the trained state (never a silent init).

        After a fit (or a restore), a task whose model has the same state structure is
        evaluated with the trained weights, whichever instance it is; a different
        structure fails. With no trained state, a checkpoint or ``untrained=True`` is needed.
        """
        if self.task is not task or self._model.state is None:
            trained = self._model.state if self._model.trained else None
            self._build(task)
            if trained is not None and ckpt_path is None:
                self._model.adopt(task, trained)
        use_weights(self._context(), ckpt_path, untrained=untrained, stage=self.stage,
                    run_dir=self.run_dir)

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
            metrics = evaluate(self._context(), stage)
            self.hook.wait_for_checkpoints(trainer=self)
            return {k: float(v) for k, v in metrics.items()}

    def predict(
        self, task: Task, ckpt_path: str | None = None, *, untrained: bool = False
    ) -> Any:
        """Run ``task.predict_step`` on ``task.predict_data()``; host arrays, a row per example.

        Weights as :meth:`validate`.
        """
        with self._run("predict"):
            self._ensure_built(task, ckpt_path, untrained)
            return run_predict(self._context())

    # ------------------------------------------------------------------ misc

    def hyperparameters(self) -> dict[str, Any]:
        """Trainer options and the task's hyperparameters, as logged at fit start."""
        live, state = self._model.live, self._model.state
        return {
            "trainer": {
                "max_epochs": self.max_epochs, "max_steps": self.max_steps,
                "batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size,
                "seed": self.seed, "precision": self.precision,
                "strategy": self.strategy.name, "gradient_clip_norm": self.gradient_clip_norm,
                "accumulate_grad_batches": self.accumulate_grad_batches,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                "devices": self.strategy.num_devices, "processes": self.strategy.process_count,
                "optimizers": sorted(live[1]) if live is not None else [],
                "streamed_training_data": bool(self._plan and self._plan.streaming),
            },
            "task": self.task.hparams() if self.task is not None else {},
            "model": model_summary(state.model) if state is not None else {},
        }
