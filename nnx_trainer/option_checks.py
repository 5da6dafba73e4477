"""The Trainer's option checks: every bad value fails at construction, named, with a fix."""

from __future__ import annotations

import logging
import re
from typing import Any

import jax.numpy as jnp
from flax import nnx

log = logging.getLogger("nnx_trainer")

# ``precision`` names to the compute dtype (parameters stay float32).
PRECISIONS = {"fp32": jnp.float32, "32": jnp.float32, "bf16": jnp.bfloat16}


def check_options(
    *, max_epochs: int, max_steps: int | None, batch_size: int, eval_batch_size: int | None,
    log_every_n_steps: int, accumulate_grad_batches: int, gradient_clip_norm: float | None,
    val_check_interval: int | float | None, limit_train_batches: int | float | None,
    limit_val_batches: int | float | None, precision: str, worker_count: int,
) -> None:
    """Every Trainer option that has a rule, checked (``ValueError`` naming the first bad one)."""
    check_positive(max_epochs=max_epochs, batch_size=batch_size,
                   log_every_n_steps=log_every_n_steps,
                   accumulate_grad_batches=accumulate_grad_batches)
    check_positive_or_none(max_steps=max_steps, eval_batch_size=eval_batch_size,
                           gradient_clip_norm=gradient_clip_norm)
    check_count_or_fraction(val_check_interval=val_check_interval,
                            limit_train_batches=limit_train_batches,
                            limit_val_batches=limit_val_batches)
    if precision not in PRECISIONS:
        raise ValueError(
            f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}"
        )
    if worker_count < 0:
        raise ValueError(f"worker_count must be >= 0, got {worker_count}")


#: ``mode`` values of the plugins that rank a monitored metric (checkpoints, early stopping).
MODES = ("auto", "min", "max")
# Metric names where higher is better, matched as a word of the name's last part
# ("val/accuracy", "val/top5", "test/digits/f1"); Keras's "auto" mode looks for "acc" only.
_HIGHER_IS_BETTER = re.compile(
    r"(?:^|[_\-.])(acc|accuracy|auc|f1|precision|recall|iou|miou|map|dice|psnr|ssim|bleu|rouge\w*"
    r"|r2|top_?\d+)"
    r"(?=$|[_\-.\d])", re.IGNORECASE)


def metric_mode(monitor: str | None, mode: str, owner: str) -> str:
    """``"min"`` or ``"max"`` for a plugin's ``mode``: as given, or for ``"auto"`` the
    monitored metric's direction (``"max"`` for accuracy-like names, else ``"min"``, a loss
    or an error). ``owner`` names the plugin in the error for a bad ``mode``."""
    if mode not in MODES:
        raise ValueError(
            f"{owner}: mode must be 'auto' (from the metric's name), 'min' (lower is better, "
            f"e.g. a loss) or 'max' (higher is better, e.g. accuracy), got {mode!r}")
    if mode != "auto":
        return mode
    name = (monitor or "").rsplit("/", 1)[-1]
    return "max" if _HIGHER_IS_BETTER.search(name) else "min"


def check_monitor_validated(monitor: str | None, trainer: Any, owner: str) -> None:
    """Refuse a ``val/`` monitor when the Task validates nothing (``val_data()`` is None,
    ``trainer.has_val_data`` false): it would rank or watch nothing for the whole fit
    (Lightning refuses a monitored metric that is never logged). Called by the plugins at
    fit start with the run (a ``RunView``)."""
    if monitor and monitor.startswith("val/") and not trainer.has_val_data:
        raise ValueError(
            f"{owner}(monitor={monitor!r}) watches a validation metric, but "
            f"{type(trainer.task).__name__}.val_data() returns None, so nothing is validated; "
            "return validation examples from val_data(), or monitor a train/ metric")


def check_positive(**values: int) -> None:
    """Each value must be an int >= 1."""
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_positive_or_none(**values: float | None) -> None:
    """Each value must be None or > 0."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be positive or None, got {value!r}")


def check_count_or_fraction(**values: int | float | None) -> None:
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


def resolve_limit(limit: int | float | None, total: int) -> int:
    """Batches to run of ``total``: a count caps it, a fraction takes its share (at least 1)."""
    if limit is None:
        return total
    if isinstance(limit, float):
        return max(1, int(limit * total))
    return min(total, limit)


def warn_if_precision_unused(model: nnx.Module, compute_dtype: Any, task_name: str) -> bool:
    """Warn (returns True) when ``precision`` asks for a dtype no layer of ``model``
    computes in: the Trainer casts nothing itself (parameters stay float32, as in
    Lightning's mixed precision); the Task builds its layers with
    ``dtype=self.compute_dtype``, and a model that ignores it trains in float32."""
    wanted = jnp.dtype(compute_dtype)
    if wanted == jnp.float32:
        return False
    for _, module in nnx.iter_graph(model):
        dtype = getattr(module, "dtype", None) if isinstance(module, nnx.Module) else None
        if dtype is not None and jnp.dtype(dtype) == wanted:
            return False
    log.warning(
        "precision asks for %s, but no layer of %s's model computes in it (none was built "
        "with dtype=%s): unless the model casts by itself, this fit runs in float32. Build "
        "the layers with dtype=self.compute_dtype in configure_model (the Task guide's MLP)",
        wanted.name, task_name, wanted.name)
    return True
