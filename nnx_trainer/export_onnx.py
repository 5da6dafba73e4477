"""ONNX for :func:`nnx_trainer.export.export_model`, through jax2onnx (the ``onnx`` extra).

The function is first traced to a jaxpr here and that jaxpr is converted, at the level of
JAX's own operations: jax2onnx's Flax shims do not handle explicit convolution padding
(``padding=((1, 1), (1, 1))``, what the ResNets use), and its ``reduce_window_max``
becomes a pooling over every axis, which ONNX runtimes reject, so max-pooling is rewritten
as the maximum of shifted slices (the same numbers). An operation jax2onnx cannot convert
fails before conversion, naming it.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Primitives whose sub-jaxpr is replayed inline before ONNX conversion (forward only).
_INLINE = {"pjit": "jaxpr", "jit": "jaxpr", "custom_jvp_call": "call_jaxpr",
           "custom_vjp_call": "call_jaxpr", "closed_call": "call_jaxpr"}


def _sub_jaxprs(params: dict[str, Any]) -> list[Any]:
    found = []
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                found.append(item.jaxpr)
            elif isinstance(item, jax.extend.core.Jaxpr):
                found.append(item)
    return found


def _primitives(jaxpr: Any) -> set[str]:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in _sub_jaxprs(eqn.params):
            names |= _primitives(sub)
    return names


def _check_convertible(jaxpr: Any) -> None:
    from jax2onnx.plugins.plugin_system import PLUGIN_REGISTRY, import_all_plugins

    # jax2onnx 0.13 logs a traceback for each of its dm_pix plugins that this JAX version
    # cannot import; they convert operations the models here never use.
    quiet = logging.getLogger("jax2onnx.plugins.plugin_system")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        import_all_plugins()
    finally:
        quiet.setLevel(level)
    missing = sorted(_primitives(jaxpr) - set(PLUGIN_REGISTRY) - set(_INLINE)
                     - {"reduce_window_max"})
    if missing:
        import jax2onnx

        raise ValueError(
            f"ONNX export: the converter (jax2onnx {getattr(jax2onnx, '__version__', '?')}) "
            f"cannot convert the JAX operation{'s' if len(missing) > 1 else ''} "
            f"{', '.join(map(repr, missing))} used by the model; export to StableHLO "
            "instead (--format stablehlo), or write the model without it")


def _max_pool(x: jax.Array, params: dict[str, Any]) -> jax.Array:
    """``reduce_window_max`` as the maximum of strided slices of the -inf-padded input."""
    dims, strides = params["window_dimensions"], params["window_strides"]
    if any(d != 1 for d in (*params["base_dilation"], *params["window_dilation"])):
        raise ValueError("ONNX export: dilated max-pooling (reduce_window_max with "
                         "dilation) is not supported")
    for axis, (lo, hi) in enumerate(params["padding"]):
        # -inf borders built from the input's own edge rows (jnp.minimum(edge, -inf)) and
        # concatenated: jax2onnx's lax.pad cannot lower a symbolic batch dimension.
        parts = [x]
        if lo:
            parts.insert(0, _lowest(jax.lax.slice_in_dim(x, 0, 1, axis=axis), lo, axis))
        if hi:
            parts.append(_lowest(jax.lax.slice_in_dim(x, 0, 1, axis=axis), hi, axis))
        if len(parts) > 1:
            x = jnp.concatenate(parts, axis=axis)
    pooled = [i for i, (d, s) in enumerate(zip(dims, strides, strict=True)) if (d, s) != (1, 1)]
    result = None
    for offsets in itertools.product(*(range(dims[i]) for i in pooled)):
        part = x
        for axis, offset in zip(pooled, offsets, strict=True):
            count = (x.shape[axis] - dims[axis]) // strides[axis] + 1
            part = jax.lax.slice_in_dim(part, offset, offset + (count - 1) * strides[axis] + 1,
                                        strides[axis], axis)
        result = part if result is None else jnp.maximum(result, part)
    return x if result is None else result


def _lowest(edge: jax.Array, count: int, axis: int) -> jax.Array:
    low = -jnp.inf if jnp.issubdtype(edge.dtype, jnp.floating) else jnp.iinfo(edge.dtype).min
    return jnp.concatenate([jnp.minimum(edge, jnp.asarray(low, edge.dtype))] * count, axis=axis)


def _replay(jaxpr: Any, consts: Sequence[Any], *args: Any) -> list[Any]:
    """Evaluate ``jaxpr`` op by op, inlining calls and rewriting max-pooling (see module)."""
    env: dict[Any, Any] = {}

    def read(var: Any) -> Any:
        return var.val if isinstance(var, jax.extend.core.Literal) else env[var]

    for var, value in zip(jaxpr.constvars, consts, strict=True):
        env[var] = value
    for var, value in zip(jaxpr.invars, args, strict=True):
        env[var] = value
    for eqn in jaxpr.eqns:
        inputs = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in _INLINE and isinstance(eqn.params.get(_INLINE[name]),
                                          jax.extend.core.ClosedJaxpr):
            sub = eqn.params[_INLINE[name]]
            n_extra = len(inputs) - len(sub.jaxpr.invars)  # custom_vjp may pass extras first
            outputs = _replay(sub.jaxpr, sub.consts, *inputs[n_extra:])
        elif name == "reduce_window_max":
            outputs = [_max_pool(inputs[0], eqn.params)]
        else:
            with eqn.ctx.manager:  # as jax.core.eval_jaxpr binds (jax 0.10)
                outputs = eqn.primitive.bind(*inputs, **eqn.primitive.get_bind_params(
                    eqn.params))
            if not eqn.primitive.multiple_results:
                outputs = [outputs]
        for var, value in zip(eqn.outvars, outputs, strict=True):
            env[var] = value
    return [read(v) for v in jaxpr.outvars]


def _onnx_input(spec: jax.ShapeDtypeStruct) -> Any:
    if all(isinstance(d, int) for d in spec.shape):
        return jax.ShapeDtypeStruct(spec.shape, spec.dtype)
    if spec.dtype == np.float32:  # jax2onnx's own symbolic dimension: a name in the shape
        return tuple("batch" if not isinstance(d, int) else d for d in spec.shape)
    raise ValueError(f"ONNX export of an input of dtype {spec.dtype} needs a fixed batch_size "
                     "(jax2onnx makes symbolic inputs float32)")


def to_onnx(infer: Any, specs: Sequence[jax.ShapeDtypeStruct], names: Sequence[str]) -> Any:
    """The ONNX ``ModelProto`` of ``infer(*inputs)`` for inputs ``specs`` named ``names``
    (a symbolic batch dimension only for float32 inputs: jax2onnx's rule)."""
    try:
        from jax2onnx import to_onnx as convert
    except ImportError as exc:
        raise ImportError("ONNX export needs jax2onnx: pip install 'nnx-trainer[onnx]'") from exc
    inputs = [_onnx_input(spec) for spec in specs]
    closed = jax.make_jaxpr(infer)(*specs)
    _check_convertible(closed.jaxpr)
    tree = jax.tree.structure(jax.eval_shape(infer, *specs))

    def replayed(*xs: jax.Array) -> Any:
        return jax.tree.unflatten(tree, _replay(closed.jaxpr, closed.consts, *xs))

    return convert(replayed, inputs, model_name="nnx_trainer_model", input_names=list(names))
