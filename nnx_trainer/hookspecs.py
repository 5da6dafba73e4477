"""Every extension point of the engine, grouped by phase.

Hooks are called with keyword arguments only; an implementation may accept any
subset of a spec's arguments (pluggy's rule), so adding an argument to a spec
never breaks existing plugins.

The ``trainer`` argument of every hook is the run as plugins see it, a
:class:`~nnx_trainer.run_view.RunView`: the members that protocol lists are what a
plugin may read and set, and all it may rely on. Plugins share what they know through
hooks, never by looking each other up by name: the plugin that knows something calls
the hook (``trainer.hook.log_model_summary(...)``), and every plugin that wants it
implements that hook, built-in or third-party alike (pytest's ``pytest_report_header``).

Ordering between plugins, where it matters (pluggy calls later-registered
plugins first; ``tryfirst``/``trylast`` pin the exceptions):

- ``on_save_checkpoint``: the non-finite guard (``tryfirst``) checks the loss record
  before the checkpoint plugin (``trylast``) writes, so a NaN state is never committed.
- ``log_metrics`` receives metrics already computed (``compute()`` ran in the loop);
  a logger never computes them. Plugins that react to values (early stopping, the
  checkpoint monitor) read them in ``on_validation_end`` or ``log_metrics`` alike.
- ``on_run_end``: every plugin tears down there, whatever the order; nothing may
  assume another plugin is still open (loggers flush their own files).
- Hooks that plugins call for each other (:func:`log_model_summary`,
  :func:`on_checkpoint_saved`, :func:`checkpoint_dir`, :func:`report_console`,
  :func:`training_time`, :func:`fit_summary_rows`) are called from inside another hook:
  each says when, so an implementation knows which of its own hooks have run by then.

Arguments that carry numbers (losses, metrics) are device arrays: the engine
never forces a host sync for a hook. A plugin that needs a Python number
fetches it (``float(x)``) at its own cadence.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    from rich.console import Console

    from nnx_trainer.flops import StepFlops
    from nnx_trainer.run_view import RunView
    from nnx_trainer.strategy import Strategy
    from nnx_trainer.task import Task

PROJECT_NAME = "nnx_trainer"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


@hookspec(historic=True)
def on_plugins_loaded(trainer: RunView) -> None:
    """Called once every plugin is registered, before any run starts.

    Historic: a plugin registered later still receives it.

    :param trainer: the trainer that owns the plugin manager.
    """


# --------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------


@hookspec(firstresult=True)
def select_strategy(trainer: RunView, name: str) -> Strategy | None:
    """Return the :class:`~nnx_trainer.strategy.Strategy` called ``name``, or None.

    Stops at first non-None result. When no plugin answers for ``"single_device"``
    the engine uses its own single-device strategy; any other unanswered name is
    an error listing the names plugins offered through :func:`strategy_names`.

    :param trainer: the trainer asking.
    :param name: the strategy name the user chose (``Trainer(strategy=...)``).
    """


@hookspec
def strategy_names() -> list[str]:
    """Return the strategy names this plugin can provide (for error messages and ``--help``)."""


# --------------------------------------------------------------------------
# Fit lifecycle
# --------------------------------------------------------------------------


@hookspec
def on_fit_start(trainer: RunView, task: Task) -> None:
    """Called after the model, optimizer and data are built and placed, before the first step.

    A resumed run has already restored its state when this is called.

    :param trainer: the running trainer (``trainer.global_step`` is the first step to run).
    :param task: the task being trained.
    """


@hookspec
def on_fit_end(trainer: RunView, task: Task) -> None:
    """Called after the last training step, validation and checkpoint of a fit that was
    not preempted and raised nothing (``completed`` or ``stopped``). Teardown belongs in
    :func:`on_run_end`, which always runs.

    :param trainer: the running trainer.
    :param task: the task being trained.
    """


@hookspec
def on_run_end(
    trainer: RunView, stage: str, outcome: str, exception: BaseException | None
) -> None:
    """Always called once at the end of every fit, validate, test and predict call.

    Like pytest's ``pytest_sessionfinish(session, exitstatus)``: close files, finish
    runs and release resources here, according to how the run ended. (A call refused
    before it starts, its run directory held by another run, calls no hook at all.)

    :param trainer: the trainer.
    :param stage: ``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``.
    :param outcome: a :class:`nnx_trainer.Outcome`: ``"completed"``, ``"stopped"`` (a plugin
        set ``trainer.should_stop``), ``"preempted"`` (SIGTERM/SIGINT; state saved) or
        ``"exception"``.
    :param exception: the exception when ``outcome`` is ``"exception"`` (re-raised after).
    """


@hookspec
def on_train_epoch_start(trainer: RunView, epoch: int) -> None:
    """Called before the first batch of a training epoch.

    :param trainer: the running trainer.
    :param epoch: zero-based epoch index.
    """


@hookspec
def on_train_epoch_end(trainer: RunView, epoch: int) -> None:
    """Called after the last batch of a training epoch, before end-of-epoch validation.

    :param trainer: the running trainer.
    :param epoch: zero-based epoch index.
    """


@hookspec
def on_train_batch_start(trainer: RunView, step: int, batch: Mapping[str, Any]) -> None:
    """Called before a train step is dispatched.

    :param trainer: the running trainer.
    :param step: the global step about to run (zero-based).
    :param batch: the batch as the compiled step takes it: device arrays, or NumPy
        arrays on a single CPU device (whose memory is host memory).
    """


@hookspec
def on_train_batch_end(trainer: RunView, step: int, loss: Any) -> None:
    """Called after a train step is dispatched (the step may still be running on device).

    ``trainer.global_step`` already counts this step.

    :param trainer: the running trainer.
    :param step: the global step that just ran (zero-based).
    :param loss: the step's loss, a device scalar; fetching it waits for the step.
    """


# --------------------------------------------------------------------------
# Evaluation lifecycle (validation inside fit and standalone; test; predict)
# --------------------------------------------------------------------------


@hookspec
def on_validation_start(trainer: RunView, stage: str) -> None:
    """Called before the first evaluation batch.

    :param trainer: the running trainer.
    :param stage: ``"validate"`` or ``"test"``.
    """


@hookspec
def on_validation_batch_end(trainer: RunView, stage: str, batch_index: int) -> None:
    """Called after each evaluation batch is dispatched.

    :param trainer: the running trainer.
    :param stage: ``"validate"`` or ``"test"``.
    :param batch_index: zero-based index of the batch in this evaluation.
    """


@hookspec
def on_validation_end(trainer: RunView, stage: str, metrics: Mapping[str, Any]) -> None:
    """Called with the computed metrics of a complete evaluation.

    :param trainer: the running trainer.
    :param stage: ``"validate"`` or ``"test"``.
    :param metrics: metric name (prefixed ``val/`` or ``test/``) to device scalar.
    """


@hookspec
def on_predict_start(trainer: RunView) -> None:
    """Called before the first prediction batch.

    :param trainer: the running trainer.
    """


@hookspec
def on_predict_end(trainer: RunView, outputs: Any) -> None:
    """Called with the gathered predictions (padding removed).

    :param trainer: the running trainer.
    :param outputs: the prediction pytree, host arrays with one row per example.
    """


@hookspec
def on_exception(trainer: RunView, exception: BaseException) -> None:
    """Called when a run stops with an exception (KeyboardInterrupt too); it is re-raised after.

    :param trainer: the running trainer.
    :param exception: the exception that stopped the run.
    """


# --------------------------------------------------------------------------
# Checkpointing
# --------------------------------------------------------------------------


@hookspec
def state_dict(trainer: RunView) -> Mapping[str, Any] | None:
    """Return plugin state to store in checkpoints, keyed by a name unique to the plugin.

    The engine merges every plugin's mapping into one; values must be
    JSON-serialisable (numbers, strings, lists, dicts).

    :param trainer: the running trainer.
    """


@hookspec
def load_state_dict(trainer: RunView, state: Mapping[str, Any]) -> None:
    """Restore plugin state from a checkpoint; pick your own key out of ``state``.

    :param trainer: the running trainer.
    :param state: the merged mapping every plugin's :func:`state_dict` produced.
    """


@hookspec
def array_state_dict(trainer: RunView) -> Mapping[str, Any] | None:
    """Return pytrees of device arrays to checkpoint, keyed by a name unique to the plugin.

    For example ``{"ema": (...)}``; None (or nothing) when there is nothing to save.
    Called when the restore target is built (the model and optimizer state exist;
    before a restore and before :func:`on_fit_start`) and at every save. The arrays'
    shapes, dtypes and shardings are the restore target, so they must already exist
    at the first call (allocate them there if need be). A save copies them off the
    device before the next step runs; the values stay the plugin's own.

    :param trainer: the running trainer.
    """


@hookspec
def load_array_state_dict(trainer: RunView, state: Mapping[str, Any]) -> None:
    """Take back the arrays of a restored checkpoint; pick your own key out of ``state``.

    ``state`` holds only the keys that were in the checkpoint and that some plugin of
    this run asked for through :func:`array_state_dict` (an older checkpoint, or one
    saved without your plugin, lacks yours: keep the fresh state). Called after the
    training state and :func:`load_state_dict` are restored, before :func:`on_fit_start`.

    :param trainer: the running trainer (``trainer.state`` is the restored state).
    :param state: plugin key to restored pytree (arrays on the target's shardings).
    """


@hookspec(firstresult=True)
def restore_checkpoint(
    trainer: RunView, ckpt_path: str, target: Mapping[str, Any]
) -> Mapping[str, Any] | None:
    """Return the checkpoint ``ckpt_path`` restored onto ``target``'s shapes and shardings.

    Stops at first non-None result. ``ckpt_path`` is ``"last"``, ``"best"`` or a path.
    Return ``{}`` for "nothing to restore, start fresh".

    :param trainer: the running trainer.
    :param ckpt_path: which checkpoint to restore.
    :param target: the abstract checkpoint (see ``Trainer.checkpoint_target``).
    """


@hookspec(firstresult=True)
def should_save_checkpoint(trainer: RunView, step: int) -> bool | None:
    """Whether the loop's save point after ``step`` steps should save.

    Stops at first non-None result. The loop asks once per step, after that step's
    validation and before the next batch is consumed (invariant 7 of
    :mod:`nnx_trainer.fit_loop`), in every process at the same steps; the answer must be
    the same in every process (a time-based answer is decided on process 0 and agreed).
    The checkpoint plugin answers from its Orbax save-decision policy. Nobody answering
    means no periodic saves.

    :param trainer: the running trainer (counters already at the next step).
    :param step: steps completed.
    """


@hookspec
def on_save_checkpoint(trainer: RunView, step: int, reason: str) -> None:
    """Save now; ``reason``: ``"periodic"``, ``"end"`` or ``"preemption"``.

    The loop calls it at its save point when :func:`should_save_checkpoint` says so
    (``"periodic"``), at the end of fit (``"end"``) and on preemption (``"preemption"``),
    in every process. Every plugin sees each save; the checkpoint plugin's implementation
    (``trylast``) calls ``trainer.checkpoint_state()`` and writes it.

    :param trainer: the running trainer.
    :param step: the global step the state corresponds to (steps completed).
    :param reason: why the engine asks.
    """


@hookspec
def wait_for_checkpoints(trainer: RunView) -> None:
    """Block until every asynchronous save has committed (before exit or preemption)."""


@hookspec
def on_checkpoint_saved(trainer: RunView, step: int) -> None:
    """Called by the checkpoint plugin once the save of ``step`` is under way (its arrays
    off the device; an asynchronous write commits later, see :func:`wait_for_checkpoints`).

    Called from its :func:`on_save_checkpoint` (``trylast``): every other implementation
    of that save has run. A refused or skipped save (``fast_dev_run``) calls nothing.

    :param trainer: the running trainer.
    :param step: the step saved (steps completed).
    """


@hookspec(firstresult=True)
def checkpoint_dir(trainer: RunView) -> Path | None:
    """Return the directory this run's checkpoints are written to, or None.

    Stops at first non-None result. The checkpoint plugin answers; the progress display
    asks from its :func:`on_fit_start` (it prints the directory, and a line per save only
    when someone answered).

    :param trainer: the running trainer.
    """


# --------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------


@hookspec
def log_hyperparams(trainer: RunView, params: Mapping[str, Any]) -> None:
    """Record the run's configuration once, at the start of fit.

    :param trainer: the running trainer.
    :param params: trainer options and the task's hyperparameters (JSON-serialisable).
    """


@hookspec
def log_metrics(trainer: RunView, metrics: Mapping[str, Any], step: int) -> None:
    """Record metrics at the log cadence (training) or after an evaluation.

    :param trainer: the running trainer.
    :param metrics: name (``train/...``, ``val/...``, ``test/...``) to value; device
        scalars or Python numbers.
    :param step: the global step the metrics belong to.
    """


@hookspec
def log_model_summary(
    trainer: RunView, summary: Mapping[str, Any], flops: StepFlops | None
) -> None:
    """Record what the model is and what one train step costs, once per fit.

    Called by the ``model_summary`` plugin from its :func:`on_train_batch_start` of the
    fit's first step (the FLOP count needs a batch): after :func:`log_hyperparams` and
    :func:`on_fit_start`, so a logger adds these to the configuration it recorded. A fit
    that runs no step does not call it. :mod:`nnx_trainer.flops` turns the count into rates.

    :param trainer: the running trainer.
    :param summary: :func:`nnx_trainer.summary.model_summary` of the model (as
        ``params["model"]`` of :func:`log_hyperparams`).
    :param flops: XLA's FLOP count of one train step, or None (not counted).
    """


# --------------------------------------------------------------------------
# Reporting (what plugins show through the progress display)
# --------------------------------------------------------------------------


@hookspec(firstresult=True)
def report_console(trainer: RunView) -> Console | None:
    """Return the Rich console a plugin should print on, or None.

    Stops at first non-None result. Asked whenever a plugin prints (the model summary,
    from :func:`on_fit_start` on). The progress display answers with its console, so the
    lines land above its live bar; nobody answering means stdout.

    :param trainer: the running trainer.
    """


@hookspec(firstresult=True)
def training_time(trainer: RunView) -> Mapping[str, float] | None:
    """Return this fit's training time apart from evaluation and saves, or None.

    Stops at first non-None result. Keys: ``train_seconds``, ``train_steps`` (after
    compilation), ``val_seconds``, ``checkpoint_seconds``. The ``throughput`` plugin
    answers; the progress display asks from its :func:`on_run_end` of a fit, and its
    rates are over the fit's wall time when nobody answers (or ``train_steps`` is 0).

    :param trainer: the running trainer.
    """


@hookspec
def fit_summary_rows(
    trainer: RunView, exception: BaseException | None
) -> list[tuple[str, str]] | None:
    """Return ``(name, value)`` rows to add to the end-of-fit summary (or None).

    Like pytest's ``pytest_report_header``: every plugin contributes its own lines. Called
    by the progress display from its :func:`on_run_end` of a fit that completed, stopped
    or diverged (``exception`` a ``NonFiniteError``). The rows follow the display's own,
    before the stop reason, later-registered plugins first.

    :param trainer: the running trainer (counters at the fit's end).
    :param exception: the error that ended the fit, or None.
    """


# --------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------


@hookspec
def configure_gradient_transforms(trainer: RunView) -> list[Any] | None:
    """Return optax transformations to chain before the task's optimizer (e.g. noise, clipping).

    Called once when the optimizer is built; the results of all plugins are chained
    in plugin order, after the Trainer's own ``gradient_clip_norm``.

    :param trainer: the trainer building the optimizer.
    """
