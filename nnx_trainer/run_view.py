"""What a plugin may read and set on the run: the contract between hooks and the engine.

Every hook receives the run as ``trainer``, typed :class:`RunView`: the members below,
and nothing else, are what a plugin relies on (like pytest hooks, which receive a
``Session`` or an ``Item`` rather than the whole ``Config``). The
:class:`~nnx_trainer.Trainer` satisfies it structurally; a test fake may be any object
with the members a plugin reads.

Reading is free: counters and options are plain values, and nothing here forces a
device sync except where a member says it reads the device. A plugin sets only what
this view marks as settable (``state``, ``should_stop``, ``stop_reason``, adding its own
compile time to ``compile_seconds``). Plugins share what they know through hooks (called
with ``trainer.hook``), never by looking each other up by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import jax
    import jax.numpy as jnp
    import pluggy

    from nnx_trainer.state import CheckpointContent, TrainState
    from nnx_trainer.strategy import Strategy

__all__ = ["RunView"]


@runtime_checkable
class RunView(Protocol):
    """The run as plugins see it (see the module docstring for the rules).

    Read-only members are properties; ``state``, ``should_stop`` and ``stop_reason`` are
    the ones a plugin may assign.
    """

    # ------------------------------------------------------------ where and what

    @property
    def stage(self) -> str | None:
        """``"fit"``, ``"validate"``, ``"test"`` or ``"predict"``: the latest call."""

    @property
    def task(self) -> Any:
        """The :class:`~nnx_trainer.Task` being run, None before the first call. (Typed
        ``Any`` so that the Task, whose ``trainer`` is this view, and the view need not
        import each other.)"""

    @property
    def has_val_data(self) -> bool:
        """Whether the Task's ``val_data()``, read once at the start of the current call,
        returned examples (a plugin need not call it again)."""

    @property
    def strategy(self) -> Strategy:
        """Where arrays live: devices, processes, ``barrier()``, ``is_main_process``."""

    @property
    def run_dir(self) -> Path:
        """The run directory: every file of the run (logs, checkpoints, configs) goes here."""

    @property
    def is_main_process(self) -> bool:
        """True in the one process that prints and writes run files."""

    @property
    def hook(self) -> pluggy.HookRelay:
        """The hook caller: a plugin that has something to share calls a hook, with
        keywords (``trainer.hook.log_metrics(trainer=trainer, metrics=m, step=s)``)."""

    # ------------------------------------------------------------ counters

    @property
    def global_step(self) -> int:
        """Train steps completed (one batch each); the next step's zero-based index."""

    @property
    def current_epoch(self) -> int:
        """Zero-based index of the running (or next) training epoch."""

    @property
    def batch_in_epoch(self) -> int:
        """Batches of the current epoch already trained (0 at an epoch's start)."""

    @property
    def steps_per_epoch(self) -> int:
        """Train steps in one epoch of this fit (0 before the data is planned)."""

    @property
    def total_steps(self) -> int:
        """Train steps the fit will run in all (``max_steps`` or epochs x steps per epoch)."""

    @property
    def resumed_from(self) -> str | None:
        """The checkpoint this fit restored, or None for a fresh start."""

    # ------------------------------------------------------------ options

    @property
    def max_epochs(self) -> int:
        """``Trainer(max_epochs=...)``."""

    @property
    def batch_size(self) -> int:
        """The global train batch size, over every device and process."""

    @property
    def accumulate_grad_batches(self) -> int:
        """Batches per optimizer update (``global_step // this`` is the update count)."""

    @property
    def log_every_n_steps(self) -> int:
        """The log cadence: train metrics are logged every that many steps."""

    @property
    def seed(self) -> int:
        """The run's seed (shuffling, initialisation, per-step randomness)."""

    @property
    def precision(self) -> str:
        """``Trainer(precision=...)``: ``"fp32"`` or ``"bf16"``."""

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The dtype ``precision`` asks the model to compute in."""

    @property
    def fast_dev_run(self) -> bool:
        """A smoke run: a few batches, nothing saved."""

    # ------------------------------------------------------------ state

    state: TrainState
    """The training state (``state.model``, ``state.optimizer``: ``nnx.State`` of device
    arrays, donated to the next step). Assign a state of the same structure between steps
    (e.g. averaged weights for an evaluation)."""

    def checkpoint_state(self) -> CheckpointContent:
        """Everything a checkpoint of this step holds (arrays and meta), by name."""

    def lower_train_step(self, batch: Mapping[str, Any]) -> jax.stages.Lowered:
        """The train step lowered for ``batch``, not compiled (XLA's cost analysis)."""

    def first_nonfinite_loss(self) -> tuple[int, float] | None:
        """``(step, loss)`` of this fit's first non-finite loss, else None (reads the device)."""

    def first_nonfinite_state(self) -> str | None:
        """Path of the first state array holding NaN/Inf, else None (reads the device)."""

    # ------------------------------------------------------------ stopping

    should_stop: bool
    """Set True to end the fit after the current step (its save point still runs)."""

    stop_reason: str | None
    """Why the fit stops, set with ``should_stop`` (``"early_stopping"``, ``"SIGTERM"``)."""

    @property
    def preempted(self) -> bool:
        """True once SIGTERM/SIGINT asked the run to stop, save and exit."""

    # ------------------------------------------------------------ results and timings

    @property
    def callback_metrics(self) -> Mapping[str, Any]:
        """The latest value of every logged metric (device scalars), by name."""

    @property
    def compile_seconds(self) -> dict[str, float]:
        """Compile time by step (``"train"``, ``"validate"``...); a plugin that compiles
        a step for it (a FLOP count) adds its own seconds to that entry."""

    @property
    def data_wait_seconds(self) -> float:
        """Host seconds this fit has spent blocked on the data pipeline (live)."""

    @property
    def fit_seconds(self) -> float:
        """Wall seconds of the latest fit loop, set when it returns (0 while it runs)."""
