"""Building a task's optimizers: one or several named ones, frozen parameters left out.

Each parameter belongs to at most one optimizer, so the optimizers' updates never
race, and a checkpoint holds each optimizer's state under its name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optax
from flax import nnx

from nnx_trainer.task import DEFAULT_OPTIMIZER, OptimizerSpec, Task


def optimizer_specs(task: Task, total_updates: int) -> tuple[dict[str, OptimizerSpec], bool]:
    """The task's optimizers by name, and whether it named several (``configure_optimizer``
    returned a mapping) rather than one transformation."""
    configured = task.configure_optimizer(total_updates)
    where = f"{type(task).__name__}.configure_optimizer"
    if isinstance(configured, optax.GradientTransformation):
        return {DEFAULT_OPTIMIZER: OptimizerSpec(configured)}, False
    if not isinstance(configured, Mapping) or not configured:
        raise TypeError(
            f"{where} must return an optax.GradientTransformation or a non-empty "
            f"{{name: OptimizerSpec(tx, wrt=filter)}} mapping, got {type(configured).__name__}"
        )
    specs = {}
    for name, spec in configured.items():
        if isinstance(spec, optax.GradientTransformation):
            spec = OptimizerSpec(spec)
        if not isinstance(name, str) or not isinstance(spec, OptimizerSpec):
            raise TypeError(
                f"{where} returned {{{name!r}: {type(spec).__name__}}}; each entry must be "
                "name: OptimizerSpec(tx, wrt=filter) with a string name"
            )
        specs[name] = spec
    return specs, True


def build_optimizers(
    task: Task,
    model: nnx.Module,
    specs: Mapping[str, OptimizerSpec],
    wrap: Callable[[optax.GradientTransformation], optax.GradientTransformation],
) -> dict[str, nnx.Optimizer]:
    """One ``nnx.Optimizer`` per spec over its parameters minus the frozen ones.

    ``wrap`` adds the Trainer's own transformations (clipping, accumulation) to each.
    Raises ``ValueError`` when a parameter is claimed twice or an optimizer gets none.
    """
    frozen = task.frozen_parameters()
    where = f"{type(task).__name__}.configure_optimizer"
    owner: dict[tuple, str] = {}
    optimizers = {}
    for name, spec in specs.items():
        wrt = nnx.All(nnx.Param, spec.wrt, nnx.Not(frozen))
        paths = _param_paths(model, wrt)
        if not paths:
            raise ValueError(
                f"optimizer {name!r} of {where} selects no trainable parameter (wrt="
                f"{spec.wrt!r}, frozen={frozen!r}); model parameters are e.g. "
                f"{_examples(_param_paths(model, nnx.Param))}"
            )
        for path in paths:
            if path in owner:
                raise ValueError(
                    f"parameter {_dotted(path)} is selected by optimizers {owner[path]!r} and "
                    f"{name!r} of {where}; give each parameter to one optimizer (narrow a "
                    "wrt filter, e.g. with nnx.Not(...))"
                )
            owner[path] = name
        optimizers[name] = nnx.Optimizer(model, wrap(spec.tx), wrt=wrt)
    return optimizers


def _param_paths(model: nnx.Module, wrt: Any) -> list[tuple]:
    return [path for path, _ in nnx.to_flat_state(nnx.state(model, wrt))]


def _dotted(path: Sequence[Any]) -> str:
    return ".".join(str(part) for part in path)


def _examples(paths: Sequence[tuple]) -> str:
    shown = ", ".join(_dotted(p) for p in paths[:4])
    return shown + (", ..." if len(paths) > 4 else "")
