"""From a model's own sharding annotations to ``PartitionSpec``s on a mesh.

Flax's idiom: a parameter carries the names of its dimensions as metadata
(``nnx.with_partitioning(init, ("embed", "mlp"))`` sets the Variable's
``out_sharding``; the optimizer's moment states copy it). A name is a mesh axis
itself (``"model"``), or a logical name that rules map to a mesh axis
(``("mlp", "model")``, Flax's logical axis rules; a Variable's own
``sharding_rules`` metadata adds to them), or neither, and then that dimension is
replicated. Leaves without an annotation are left to the strategy's fallback.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | Sequence[str] | None]]


def annotation(leaf: Any) -> tuple[tuple[Any, ...] | None, Rules]:
    """A Variable's dimension names (``out_sharding``, or the older ``sharding``) and
    its own rules; ``(None, ())`` for anything unannotated."""
    if not isinstance(leaf, nnx.Variable):
        return None, ()
    metadata = leaf.get_metadata()
    names = metadata.get("out_sharding") or metadata.get("sharding")
    if isinstance(names, PartitionSpec):
        names = tuple(names)
    return (tuple(names) if names else None), tuple(metadata.get("sharding_rules") or ())


def resolve(
    names: Sequence[Any], shape: Sequence[int], mesh: Mesh, rules: Rules, where: str
) -> PartitionSpec:
    """The spec an annotation asks for on ``mesh``.

    Raises ``ValueError`` naming the parameter when the annotation does not fit its
    shape (length, or a dimension that does not divide by its mesh axes).
    """
    if len(names) != len(shape):
        raise ValueError(
            f"{where} is annotated with {len(names)} dimension names {tuple(names)} but has "
            f"shape {tuple(shape)}; give one name (or None) per dimension"
        )
    table = dict(rules)
    spec: list[Any] = []
    used: set[str] = set()
    for dim, (name, size) in enumerate(zip(names, shape, strict=True)):
        axes = name if name in mesh.axis_names else table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a in mesh.axis_names and a not in used)
        if not axes:
            spec.append(None)
            continue
        ways = 1
        for axis in axes:
            ways *= mesh.shape[axis]
        if size % ways:
            raise ValueError(
                f"{where}: dimension {dim} ({name!r}, size {size}) does not divide over mesh "
                f"axes {axes} ({ways} devices); change the annotation, the rules "
                f"or the mesh shape {dict(mesh.shape)}"
            )
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def state_shardings(
    abstract_state: Any,
    mesh: Mesh,
    rules: Rules,
    fallback: Callable[[tuple[int, ...]], PartitionSpec],
) -> Any:
    """Shardings for every leaf of a state: by its annotation where it has one that names
    a mesh axis (directly or through ``rules``), else by ``fallback(shape)``."""

    def sharding(path: Any, leaf: Any) -> Any:
        names, own_rules = annotation(leaf)
        shape = tuple(np.shape(leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf))
        spec = None
        if names is not None:
            where = f"parameter {jax.tree_util.keystr(path, simple=True, separator='.')}"
            spec = resolve(names, shape, mesh, (*own_rules, *rules), where)
            if all(axis is None for axis in spec):
                spec = None  # names no mesh axis: nothing to honour here
        result = NamedSharding(mesh, spec if spec is not None else fallback(shape))
        return leaf.replace(result) if isinstance(leaf, nnx.Variable) else result

    return jax.tree_util.tree_map_with_path(
        sharding, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def mesh_shape(axes: Mapping[str, int], devices: int) -> dict[str, int]:
    """Check a ``{axis: size}`` mesh fits ``devices``; ``-1`` for one size takes the rest."""
    axes = dict(axes)
    if "data" not in axes:
        raise ValueError(f"the mesh axes {axes} need a 'data' axis: batches shard over it")
    free = [name for name, size in axes.items() if size == -1]
    for name, size in axes.items():
        if size != -1 and (not isinstance(size, int) or size < 1):
            raise ValueError(f"mesh axis {name!r} has size {size!r}; use a positive int")
    if len(free) > 1:
        raise ValueError(f"only one mesh axis may be -1 (the rest), got {free}")
    if free:
        fixed = math.prod(size for size in axes.values() if size != -1)
        if devices % fixed:
            raise ValueError(f"{devices} devices do not split into mesh axes {axes}")
        axes[free[0]] = devices // fixed
    total = math.prod(axes.values())
    if total != devices:
        raise ValueError(
            f"mesh axes {axes} hold {total} devices but {devices} are used; make the sizes "
            f"multiply to {devices} (or set one size to -1)"
        )
    return axes
