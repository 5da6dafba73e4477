"""Trained models out for serving: StableHLO (``jax.export``) and ONNX.

What is exported is the model's forward pass in **evaluation mode** (``model.eval()``:
BatchNorm uses its running statistics, Dropout is off), as the Trainer evaluates and
predicts (a ``train``/``training``/``deterministic`` argument of the model's ``__call__``
is passed its inference value: :mod:`nnx_trainer.eval_mode`), with the trained weights
closed over as constants, so one file holds everything and the server needs neither this
package nor the model's code:

- ``"stablehlo"``: ``jax.export`` of that function, serialized (``Exported.serialize``).
  In any process with JAX installed::

      exp = jax.export.deserialize(bytearray(open("model.stablehlo", "rb").read()))
      logits = exp.call(images)

  It runs on the platforms it was exported for (``platforms``; default the current
  backend's, e.g. ``("cpu",)``; ``("cpu", "cuda")`` for both).
- ``"onnx"``: converted with jax2onnx (the ``onnx`` extra), for onnxruntime and other ONNX
  runtimes. The function is first traced to a jaxpr here and that jaxpr is converted, at
  the level of JAX's own operations: jax2onnx's Flax shims do not handle explicit
  convolution padding (``padding=((1, 1), (1, 1))``, what the ResNets use), and its
  ``reduce_window_max`` becomes a pooling over every axis, which ONNX runtimes reject, so
  max-pooling is rewritten as the maximum of shifted slices (the same numbers). An
  operation jax2onnx cannot convert fails before conversion, naming it.

The input is one array, the model's (``model(x)``); ``batch_size=None`` exports a symbolic
batch dimension (any batch size at run time), an int a fixed one. The input's shape per
example comes from ``example`` or, in :func:`export_run`, from the task's first
evaluation example (``input_key``, after ``eval_transforms``). nnx_trainer's own
CPU convolution (``nnx_trainer.conv``, a ``custom_vjp`` for a faster backward pass) is
swapped for XLA's, whose forward pass it shares, so the exported program is plain.

``nnx-trainer export --config RUN/config.yaml --ckpt_path best --format onnx OUT``
(``nnx_trainer.cli.export_main``) calls :func:`export_run`.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnx_trainer import conv as conv_lib
from nnx_trainer.eval_mode import training_flag

FORMATS = ("stablehlo", "onnx")
SUFFIXES = {"stablehlo": ".stablehlo", "onnx": ".onnx"}
# Primitives whose sub-jaxpr is replayed inline before ONNX conversion (forward only).
_INLINE = {"pjit": "jaxpr", "jit": "jaxpr", "custom_jvp_call": "call_jaxpr",
           "custom_vjp_call": "call_jaxpr", "closed_call": "call_jaxpr"}


def inference_model(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` in evaluation mode with XLA's convolutions (the input is untouched)."""
    copy = nnx.merge(*nnx.split(model))
    copy.eval()
    ours = {conv_lib.conv_general_dilated, conv_lib.auto_conv_general_dilated}
    for _, module in nnx.iter_graph(copy):
        if isinstance(module, nnx.Conv) and module.conv_general_dilated in ours:
            module.conv_general_dilated = jax.lax.conv_general_dilated
    return copy


def inference_fn(model: nnx.Module) -> Any:
    """``x -> outputs``: :func:`inference_model`'s forward pass, with a model's own
    train/training flag set to its inference value."""
    graphdef, state = nnx.split(inference_model(model))
    flag = training_flag(model)
    kwargs = {} if flag is None else {flag[0]: flag[2]}

    def infer(x: jax.Array) -> Any:
        return nnx.merge(graphdef, state)(x, **kwargs)

    return infer


def _input_spec(example: Any, batch_size: int | None) -> jax.ShapeDtypeStruct:
    shape, dtype = tuple(example.shape), np.dtype(example.dtype)
    if batch_size is None:
        batch = jax.export.symbolic_shape("batch")
    elif isinstance(batch_size, int) and batch_size >= 1:
        batch = (batch_size,)
    else:
        raise ValueError(f"batch_size must be a positive int or None (symbolic), got "
                         f"{batch_size!r}")
    return jax.ShapeDtypeStruct((*batch, *shape), dtype)


def export_model(
    model: nnx.Module, example: Any, out: str | Path, *, format: str = "stablehlo",
    batch_size: int | None = None, platforms: Sequence[str] | None = None,
) -> Path:
    """Write ``model``'s evaluation-mode forward pass to ``out``; returns the path.

    ``example``: one input without the batch dimension (an array or a
    ``jax.ShapeDtypeStruct``: only its shape and dtype are used). ``format``:
    ``"stablehlo"`` or ``"onnx"``. ``batch_size``: a fixed batch, or ``None`` for a
    symbolic one. ``platforms`` (StableHLO only): where the file may run.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    spec = _input_spec(example, batch_size)
    infer = inference_fn(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if format == "stablehlo":
        exported = jax.export.export(jax.jit(infer), platforms=platforms)(spec)
        tmp.write_bytes(exported.serialize())
    else:
        tmp.write_bytes(_to_onnx(infer, spec).SerializeToString())
    tmp.replace(out)
    return out


# ----------------------------------------------------------------------------- ONNX


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


def _to_onnx(infer: Any, spec: jax.ShapeDtypeStruct) -> Any:
    try:
        from jax2onnx import to_onnx
    except ImportError as exc:
        raise ImportError("ONNX export needs jax2onnx: pip install 'nnx-trainer[onnx]'") from exc
    closed = jax.make_jaxpr(infer)(spec)
    _check_convertible(closed.jaxpr)
    tree = jax.tree.structure(jax.eval_shape(infer, spec))

    def replayed(x: jax.Array) -> Any:
        return jax.tree.unflatten(tree, _replay(closed.jaxpr, closed.consts, x))

    if all(isinstance(d, int) for d in spec.shape):
        inputs = [jax.ShapeDtypeStruct(spec.shape, spec.dtype)]
    elif spec.dtype == np.float32:  # jax2onnx's own symbolic dimension: a name in the shape
        inputs = [tuple("batch" if not isinstance(d, int) else d for d in spec.shape)]
    else:
        raise ValueError(f"ONNX export of a {spec.dtype} input needs a fixed batch_size "
                         "(jax2onnx makes symbolic inputs float32)")
    return to_onnx(replayed, inputs, model_name="nnx_trainer_model", input_names=["input"])


# ------------------------------------------------------------------ from a run directory


def example_input(task: Any, input_key: str = "image", dtype: Any = None) -> jax.ShapeDtypeStruct:
    """The model input of one example: ``task``'s first predict example (falling back to
    validation, then training data) after ``eval_transforms``, under ``input_key``.

    ``dtype`` defaults to the example's when it is a float, else float32: a task that
    keeps uint8 images on the host converts them in its step, so its model takes floats;
    pass ``dtype`` for a model that takes integers (token ids), or ``"example"`` for the
    example's own (:func:`model_input` tries it when the model refuses floats).
    """
    from nnx_trainer import data as data_lib

    examples = task.predict_data()
    if examples is None:
        examples = task.train_data()
    if isinstance(examples, dict):  # several named sets: the first
        examples = next(iter(examples.values()))
    config = data_lib.PipelineConfig(global_batch_size=1)
    iterator, _ = data_lib.eval_pipeline(examples, task.eval_transforms(), config,
                                         source=f"{type(task).__name__}'s data")
    batch = next(iter(iterator))
    if input_key not in batch:
        keys = ", ".join(k for k in batch if k != data_lib.MASK_KEY)
        raise ValueError(f"the examples of {type(task).__name__} have no {input_key!r}; "
                         f"pass the key of the model's input (--input_key): one of {keys}")
    value = np.asarray(batch[input_key])
    if dtype is None:
        dtype = value.dtype if np.issubdtype(value.dtype, np.floating) else np.float32
    elif dtype == "example":
        dtype = value.dtype
    return jax.ShapeDtypeStruct(value.shape[1:], np.dtype(dtype))


def model_input(model: nnx.Module, task: Any, input_key: str = "image",
                dtype: Any = None) -> jax.ShapeDtypeStruct:
    """:func:`example_input` for ``model``: with no ``dtype``, float32 for integer
    examples (uint8 images converted in the step), unless the model cannot take floats
    and takes the examples' own dtype (token ids for an ``nnx.Embed``)."""
    own = example_input(task, input_key, "example")
    if dtype is not None:
        try:
            return jax.ShapeDtypeStruct(own.shape, np.dtype(dtype))
        except TypeError as exc:
            raise ValueError(f"input dtype {dtype!r} is not a NumPy dtype; name one such as "
                             "int32 or float32") from exc
    if np.issubdtype(own.dtype, np.floating):
        return own
    floats = jax.ShapeDtypeStruct(own.shape, np.dtype(np.float32))
    infer = inference_fn(model)

    def traces(candidate: jax.ShapeDtypeStruct) -> bool:
        try:
            jax.eval_shape(infer, jax.ShapeDtypeStruct((1, *candidate.shape), candidate.dtype))
        except Exception:  # noqa: BLE001 - whatever the model raises for that dtype
            return False
        return True

    return own if not traces(floats) and traces(own) else floats


def trained_model(trainer: Any, task: Any, ckpt_path: str) -> nnx.Module:
    """``task``'s model with the weights of checkpoint ``ckpt_path`` (``"best"``,
    ``"last"`` or a directory), restored as ``Trainer.predict`` restores them."""
    with trainer._run("predict"):
        trainer._ensure_built(task, ckpt_path, untrained=False)
    return trainer.model


def export_run(
    trainer: Any, task: Any, out: str | Path, *, ckpt_path: str | None = "best",
    format: str = "stablehlo", batch_size: int | None = None, input_key: str = "image",
    input_dtype: Any = None, platforms: Sequence[str] | None = None,
) -> Path:
    """Export ``task``'s trained model: from checkpoint ``ckpt_path``, or (``None``) the
    trainer's fitted state. The input shape and dtype are :func:`model_input`'s."""
    model = trainer.model if ckpt_path is None else trained_model(trainer, task, ckpt_path)
    example = model_input(model, task, input_key, input_dtype)
    return export_model(model, example, out, format=format, batch_size=batch_size,
                        platforms=platforms)
