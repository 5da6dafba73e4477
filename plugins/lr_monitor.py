"""Log the learning rate as ``train/lr`` at the trainer's log cadence (or once per epoch).

The value is found, in this order:

1. ``task.learning_rate_schedule``: a schedule (``count -> lr``, as optax schedules
   are) or a number that the task sets, typically in ``configure_optimizer``.
2. ``optax.inject_hyperparams(...)(learning_rate=...)`` anywhere in the optimizer:
   the ``learning_rate`` hyperparameter stored in the optimizer state (several
   such wrappers log ``train/lr``, ``train/lr_1``, ...).
3. Otherwise the learning rate cannot be known from outside the optimizer: the
   plugin warns once and logs nothing.

The logged value is the learning rate of the latest optimizer update, the one
that produced the parameters (and the training loss) logged at the same step:
after ``k`` updates that is ``schedule(k - 1)`` (``schedule(0)`` before the first),
which is also what ``inject_hyperparams`` keeps in its state. With
``accumulate_grad_batches = A`` the optimizer has made ``global_step // A`` updates.

It is sent through the ``log_metrics`` hook in a call of its own, and added to
``trainer.callback_metrics``. The value stays a device scalar (loggers read it at
the log cadence, when they read the other metrics): the plugin never waits for the
device. On by default; costs a few tiny device ops per log step.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from nnx_trainer import hookimpl

if TYPE_CHECKING:
    from nnx_trainer import RunView

log = logging.getLogger("nnx_trainer.lr_monitor")

INTERVALS = ("step", "epoch")
METRIC = "train/lr"


def _key_name(entry: Any) -> Any:
    """The name in one pytree path entry (dict key, attribute or index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return getattr(entry, attr)
    return entry


def find_injected_learning_rates(opt_state: Any) -> list[int]:
    """Leaf indices of ``hyperparams["learning_rate"]`` entries (``optax.inject_hyperparams``)."""
    paths = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    found = []
    for index, (path, _) in enumerate(paths):
        names = [_key_name(entry) for entry in path]
        for a, b in zip(names, names[1:], strict=False):
            if a == "hyperparams" and b == "learning_rate":
                found.append(index)
                break
    return found


class LearningRateMonitor:
    """Add ``train/lr`` to the logged metrics.

    :param logging_interval: ``"step"``: at every ``log_every_n_steps`` step, next to the
        training metrics; ``"epoch"``: at the end of each training epoch.
    """

    name = "lr_monitor"

    def __init__(self, logging_interval: str = "step") -> None:
        if logging_interval not in INTERVALS:
            raise ValueError(
                f"logging_interval must be 'step' (every log_every_n_steps steps) or "
                f"'epoch' (at each epoch end), got {logging_interval!r}"
            )
        self.logging_interval = logging_interval
        self._schedule: Callable[[int], Any] | None = None
        self._leaves: list[int] = []
        self._warned = False

    @property
    def source(self) -> str | None:
        """Where the value comes from: ``"schedule"``, ``"inject_hyperparams"`` or None."""
        if self._schedule is not None:
            return "schedule"
        return "inject_hyperparams" if self._leaves else None

    @hookimpl
    def on_fit_start(self, trainer: RunView) -> None:
        """Find where the learning rate can be read (the optimizer is built by now)."""
        self._schedule, self._leaves = None, []
        schedule = getattr(trainer.task, "learning_rate_schedule", None)
        if callable(schedule):
            self._schedule = schedule
        elif isinstance(schedule, numbers.Real) and not isinstance(schedule, bool):
            value = float(schedule)
            self._schedule = lambda count: value
        else:
            self._leaves = find_injected_learning_rates(trainer.state[1])
        if self.source is None and not self._warned:
            self._warned = True
            log.warning(
                "lr_monitor: cannot determine the learning rate of %s; set "
                "self.learning_rate_schedule in configure_optimizer, or build the optimizer "
                "with optax.inject_hyperparams(...)(learning_rate=...); or disable it with "
                "Trainer(disable_plugins=['lr_monitor'])",
                type(trainer.task).__name__,
            )

    def learning_rates(self, trainer: RunView) -> dict[str, Any]:
        """``{"train/lr": value, ...}`` for the latest optimizer update (device scalars)."""
        if self._schedule is not None:
            updates = trainer.global_step // trainer.accumulate_grad_batches
            return {METRIC: self._schedule(max(updates - 1, 0))}
        if not self._leaves:
            return {}
        leaves = jax.tree.leaves(trainer.state[1])
        values = {}
        for i, index in enumerate(self._leaves):
            # A copy: the state's arrays are donated to the next train step, and a
            # logger may keep the value until after it.
            values[METRIC if i == 0 else f"{METRIC}_{i}"] = jnp.copy(leaves[index])
        return values

    def _log(self, trainer: RunView) -> None:
        values = self.learning_rates(trainer)
        if not values:
            return
        trainer.callback_metrics.update(values)
        # A log call of its own: this runs inside on_train_batch_end, not log_metrics,
        # so there is no recursion.
        trainer.hook.log_metrics(trainer=trainer, metrics=values, step=trainer.global_step)

    @hookimpl
    def on_train_batch_end(self, trainer: RunView) -> None:
        """At the trainer's log cadence, log the learning rate (no host read)."""
        if (
            self.logging_interval == "step"
            and trainer.global_step % trainer.log_every_n_steps == 0
        ):
            self._log(trainer)

    @hookimpl
    def on_train_epoch_end(self, trainer: RunView) -> None:
        """With ``logging_interval="epoch"``, log once per epoch."""
        if self.logging_interval == "epoch":
            self._log(trainer)
