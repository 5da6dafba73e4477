"""Training and evaluation mode: what the engine does, and the one case it cannot fix.

The Trainer builds the model once and keeps two graph definitions of it: one after
``model.train()`` for the train step, one after ``model.eval()`` for ``validate``,
``test``, ``predict`` and the evaluations inside ``fit``. ``model.eval()`` is Flax NNX's
switch: it sets ``use_running_average=True`` on every ``nnx.BatchNorm`` (the running
statistics, so a prediction does not depend on the rest of its batch or on the evaluation
batch size) and ``deterministic=True`` on every ``nnx.Dropout``; ``model.train()`` sets
them back. A layer reads these attributes only when its call leaves the argument unset:
``bn(x)`` follows the mode, ``bn(x, use_running_average=False)`` does not. Export
(:mod:`nnx_trainer.export`) uses the same evaluation mode.

So a model whose ``__call__`` takes its own flag and passes it down, e.g.
``def __call__(self, x, training=True): ... self.bn(x, use_running_average=not training)``,
overrides the mode: a step that calls ``model(x)`` gets training behaviour in evaluation
too (batch statistics; metrics that change with the evaluation batch size). The engine
cannot know what such a flag means, so when it finds one whose default selects training
behaviour it says so once, with the two fixes: default the flag to ``None`` and pass it
on only when set (``use_running_average=None if training is None else not training``), so
the engine's mode applies; or pass it in the Task's steps (``model(x, training=False)`` in
``validation_step`` and ``predict_step``). :func:`nnx_trainer.export.export_model` passes
it itself (inference values below), since export is always inference.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from flax import nnx

log = logging.getLogger("nnx_trainer")

#: ``__call__`` flags that switch training behaviour, and the value that means inference.
INFERENCE_VALUES = {"train": False, "training": False, "is_training": False,
                    "deterministic": True, "use_running_average": True}


def training_flag(model: nnx.Module) -> tuple[str, Any, Any] | None:
    """``(name, default, inference value)`` of the mode flag of ``model.__call__``, or None."""
    try:
        parameters = inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):
        return None
    for name, inference in INFERENCE_VALUES.items():
        if name in parameters:
            return name, parameters[name].default, inference
    return None


def warn_if_flag_overrides_mode(model: nnx.Module) -> bool:
    """Log the warning of the module doc when ``model.__call__``'s flag defaults to
    training behaviour; returns whether it did."""
    flag = training_flag(model)
    if flag is None:
        return False
    name, default, inference = flag
    if default is inspect.Parameter.empty or default is None or default == inference:
        return False
    cls = type(model).__name__
    log.warning(
        "%s.__call__ takes %s=%r: if it passes that to its layers, it overrides the "
        "engine's evaluation mode (model.eval(): BatchNorm running statistics, no dropout), "
        "so validate/test/predict steps that call model(x) would run in training mode. "
        "Default it to None and pass it on only when set, or call model(x, %s=%r) in "
        "validation_step and predict_step (export passes %s=%r itself)",
        cls, name, default, name, inference, name, inference)
    return True
