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
  runtimes (:mod:`nnx_trainer.export_onnx`: how, and what it rewrites).

The inputs are the model's positional arguments: one array (``model(x)``) or several
(``model(tokens, mask)``); ``batch_size=None`` exports a symbolic batch dimension, shared
by every input (any batch size at run time), an int a fixed one. Each input's shape per
example comes from ``example`` or, in :func:`export_run`, from the task's first
evaluation example (``input_key``: one key, or several in the order of ``__call__``,
after ``eval_transforms``). nnx_trainer's own CPU convolution (``nnx_trainer.conv``, a
``custom_vjp`` for a faster backward pass) is swapped for XLA's, whose forward pass it
shares, so the exported program is plain.

``nnx-trainer export --config RUN/config.yaml --ckpt_path best --format onnx OUT``
(``nnx_trainer.cli.export_main``) calls :func:`export_run`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from nnx_trainer import conv as conv_lib
from nnx_trainer import export_onnx
from nnx_trainer.eval_mode import training_flag

FORMATS = ("stablehlo", "onnx")
SUFFIXES = {"stablehlo": ".stablehlo", "onnx": ".onnx"}


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
    """``(*inputs) -> outputs``: :func:`inference_model`'s forward pass, with a model's own
    train/training flag set to its inference value."""
    graphdef, state = nnx.split(inference_model(model))
    flag = training_flag(model)
    kwargs = {} if flag is None else {flag[0]: flag[2]}

    def infer(*inputs: jax.Array) -> Any:
        return nnx.merge(graphdef, state)(*inputs, **kwargs)

    return infer


def _input_specs(examples: Sequence[Any], batch_size: int | None) -> list[jax.ShapeDtypeStruct]:
    if batch_size is None:  # one symbol for every input: they share the batch
        batch = jax.export.symbolic_shape("batch")
    elif isinstance(batch_size, int) and batch_size >= 1:
        batch = (batch_size,)
    else:
        raise ValueError(f"batch_size must be a positive int or None (symbolic), got "
                         f"{batch_size!r}")
    return [jax.ShapeDtypeStruct((*batch, *e.shape), np.dtype(e.dtype)) for e in examples]


def _check_arity(model: nnx.Module, count: int, names: Sequence[str] | None) -> None:
    """A model called with fewer or more inputs than its ``__call__`` takes fails here,
    naming them, rather than in tracing."""
    try:
        parameters = list(inspect.signature(type(model).__call__).parameters.values())[1:]
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p.name for p in positional if p.default is p.empty]
    if len(required) <= count <= len(positional):
        return
    given = f" ({', '.join(names)})" if names else ""
    raise ValueError(
        f"{type(model).__name__}.__call__ takes {', '.join(required) or 'no input'} "
        f"({len(required)} input{'s' if len(required) != 1 else ''}), not {count}{given}: "
        "pass the examples' key of each, in that order (--input_key "
        f"{','.join(required) or '...'} when the examples use those names)")


def export_model(
    model: nnx.Module, example: Any, out: str | Path, *, format: str = "stablehlo",
    batch_size: int | None = None, platforms: Sequence[str] | None = None,
    input_names: Sequence[str] | None = None,
) -> Path:
    """Write ``model``'s evaluation-mode forward pass to ``out``; returns the path.

    ``example``: one input without the batch dimension (an array or a
    ``jax.ShapeDtypeStruct``: only its shape and dtype are used), or a tuple or list of
    them for a model of several inputs (``model(tokens, mask)``). ``format``:
    ``"stablehlo"`` or ``"onnx"``. ``batch_size``: a fixed batch, or ``None`` for a
    symbolic one. ``platforms`` (StableHLO only): where the file may run.
    ``input_names`` (ONNX): the graph's input names (default ``input``, or ``input_0``,
    ``input_1``, ... for several).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of: {', '.join(FORMATS)}")
    examples = list(example) if isinstance(example, (tuple, list)) else [example]
    _check_arity(model, len(examples), input_names)
    specs = _input_specs(examples, batch_size)
    infer = inference_fn(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if format == "stablehlo":
        exported = jax.export.export(jax.jit(infer), platforms=platforms)(*specs)
        tmp.write_bytes(exported.serialize())
    else:
        names = list(input_names or (["input"] if len(specs) == 1 else
                                     [f"input_{i}" for i in range(len(specs))]))
        tmp.write_bytes(export_onnx.to_onnx(infer, specs, names).SerializeToString())
    tmp.replace(out)
    return out


# ------------------------------------------------------------------ from a run directory


def example_input(task: Any, input_key: str = "image", dtype: Any = None) -> jax.ShapeDtypeStruct:
    """The model input of one example: ``task``'s first predict example (falling back to
    validation, then training data) after ``eval_transforms``, under ``input_key``.

    ``dtype`` defaults to float32 when the example is an integer, else its own (floats,
    bool masks): a task that keeps uint8 images on the host converts them in its step, so
    its model takes floats;
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
        dtype = np.float32 if np.issubdtype(value.dtype, np.integer) else value.dtype
    elif dtype == "example":
        dtype = value.dtype
    return jax.ShapeDtypeStruct(value.shape[1:], np.dtype(dtype))


def _keys(value: str | Sequence[str]) -> list[str]:
    """``"tokens,mask"`` (the command line's spelling) or a sequence: the keys, in order."""
    return [k.strip() for k in value.split(",")] if isinstance(value, str) else list(value)


def model_input(model: nnx.Module, task: Any, input_key: str | Sequence[str] = "image",
                dtype: Any = None) -> jax.ShapeDtypeStruct | list[jax.ShapeDtypeStruct]:
    """:func:`example_input` for ``model``: with no ``dtype``, float32 for integer
    examples (uint8 images converted in the step), unless the model cannot take floats
    and takes the examples' own dtypes (token ids for an ``nnx.Embed``); floats and bools
    keep theirs. Several keys
    (``"tokens,mask"`` or a list; ``dtype`` likewise, one per key) give a list."""
    keys = _keys(input_key)
    _check_arity(model, len(keys), keys)
    own = [example_input(task, key, "example") for key in keys]
    if dtype is not None:
        dtypes = _keys(dtype) if isinstance(dtype, str) else (
            list(dtype) if isinstance(dtype, (tuple, list)) else [dtype])
        if len(dtypes) != len(keys):
            raise ValueError(f"{len(dtypes)} input dtype(s) for {len(keys)} input keys "
                             f"({', '.join(keys)}): give one per key, in the same order")
        try:
            chosen = [jax.ShapeDtypeStruct(o.shape, np.dtype(d))
                      for o, d in zip(own, dtypes, strict=True)]
        except TypeError as exc:
            raise ValueError(f"input dtype {dtype!r} is not a NumPy dtype; name one such as "
                             "int32 or float32") from exc
    else:
        floats = [jax.ShapeDtypeStruct(o.shape, np.dtype(np.float32))
                  if np.issubdtype(o.dtype, np.integer) else o for o in own]
        infer = inference_fn(model)

        def traces(candidates: list[jax.ShapeDtypeStruct]) -> bool:
            try:
                jax.eval_shape(infer, *(jax.ShapeDtypeStruct((1, *c.shape), c.dtype)
                                        for c in candidates))
            except Exception:  # noqa: BLE001 - whatever the model raises for that dtype
                return False
            return True

        chosen = own if floats != own and not traces(floats) and traces(own) else floats
    return chosen[0] if isinstance(input_key, str) and len(keys) == 1 else chosen


def trained_model(trainer: Any, task: Any, ckpt_path: str) -> nnx.Module:
    """``task``'s model with the weights of checkpoint ``ckpt_path`` (``"best"``,
    ``"last"`` or a directory), restored as ``Trainer.predict`` restores them."""
    with trainer._run("predict"):
        trainer._ensure_built(task, ckpt_path, untrained=False)
    return trainer.model


def export_run(
    trainer: Any, task: Any, out: str | Path, *, ckpt_path: str | None = "best",
    format: str = "stablehlo", batch_size: int | None = None,
    input_key: str | Sequence[str] = "image", input_dtype: Any = None,
    platforms: Sequence[str] | None = None,
) -> Path:
    """Export ``task``'s trained model: from checkpoint ``ckpt_path``, or (``None``) the
    trainer's fitted state. The inputs' shapes and dtypes are :func:`model_input`'s (several
    keys: ``"tokens,mask"``, the model's positional arguments in that order; ONNX names
    its inputs after them)."""
    model = trainer.model if ckpt_path is None else trained_model(trainer, task, ckpt_path)
    example = model_input(model, task, input_key, input_dtype)
    keys = _keys(input_key)
    return export_model(model, example, out, format=format, batch_size=batch_size,
                        platforms=platforms, input_names=keys if len(keys) > 1 else None)
