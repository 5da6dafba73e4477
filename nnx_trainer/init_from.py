"""``Trainer.fit(task, init_from=...)``: start from another run's weights, partially.

Unlike ``ckpt_path`` (a resume: the whole training state, counters and data position),
``init_from`` copies only **parameters and batch statistics** (``nnx.Param`` and
``nnx.BatchStat`` variables), and only those whose path and shape match the model being
trained; the optimizer state, the step counters and everything else start fresh. What
does not match is skipped and reported (a new head for another number of classes is the
common case), so this is how fine-tuning starts; ``Task.frozen_parameters`` then keeps
the loaded backbone fixed if wanted.

A source is

- another run's checkpoint: a run directory (its ``checkpoints/``), a checkpoints
  directory (its latest committed step) or a step directory (``run/checkpoints/120``);
  only the ``model`` part of the Orbax ``state`` item is read;
- a weight file, ``.safetensors`` or ``.npz``, whose tensor names are the model's
  ``nnx`` paths joined by ``/`` or ``.`` (``stages/0/layers/1/conv2/kernel``), as
  :func:`save_weights` writes, or any other naming the task's
  ``Task.import_weights`` maps to them (``ResNetTask`` maps torchvision/timm
  ResNet state dicts);
- a ``{path: array}`` mapping.

The report (:class:`InitReport`, kept as ``trainer.init_report``) lists what was loaded,
what was skipped and why, and the source tensors the model has no place for.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

log = logging.getLogger("nnx_trainer")

_STEP = re.compile(r"^\d+$")
#: The variables init_from copies: trained weights and running statistics.
LOADED_TYPES = (nnx.Param, nnx.BatchStat)


@dataclasses.dataclass
class InitReport:
    """What ``init_from`` did: loaded paths, ``{skipped path: reason}``, unused source names."""

    source: str
    loaded: list[str]
    skipped: dict[str, str]
    unused: list[str]

    def summary(self) -> str:
        """One paragraph for the log."""
        text = (f"init_from {self.source}: loaded {len(self.loaded)} of "
                f"{len(self.loaded) + len(self.skipped)} parameter/batch-stat arrays")
        if self.skipped:
            text += "; skipped (fresh init): " + "; ".join(
                f"{k} ({why})" for k, why in list(self.skipped.items())[:8])
            if len(self.skipped) > 8:
                text += f"; ... {len(self.skipped) - 8} more"
        if self.unused:
            text += (f"; {len(self.unused)} source arrays unused ("
                     f"{', '.join(self.unused[:4])}{', ...' if len(self.unused) > 4 else ''})")
        return text


def _normalise(tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {re.sub(r"[./]value$", "", k).replace(".", "/"): np.asarray(v)
            for k, v in tensors.items()}


def _latest_step(directory: Path) -> Path:
    steps = sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and _STEP.match(p.name))
    if not steps:
        raise FileNotFoundError(f"init_from={str(directory)!r}: no committed checkpoint step in "
                                "it; give a run directory, its checkpoints/ or a step directory")
    return directory / str(steps[-1])


def _checkpoint_step(path: Path) -> Path:
    """The step directory a run, checkpoints or step directory names."""
    if (path / "state").is_dir():
        return path
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    return _latest_step(path)


def _read_checkpoint_model(step_dir: Path) -> dict[str, np.ndarray]:
    """The ``model`` arrays of a checkpoint's ``state`` item, as NumPy, nothing else read."""
    import orbax.checkpoint as ocp

    item_dir = step_dir / "state"
    handler = ocp.StandardCheckpointHandler()
    try:
        tree = handler.metadata(item_dir).tree
    finally:
        handler.close()
    if not isinstance(tree, Mapping) or "model" not in tree:
        raise ValueError(f"init_from: {item_dir} holds no 'model' arrays (not an nnx_trainer "
                         "checkpoint?)")
    meta = tree["model"]
    item = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta)
    restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    with ocp.PyTreeCheckpointer() as reader:
        arrays = reader.restore(item_dir, args=ocp.args.PyTreeRestore(
            {"model": item}, restore_args={"model": restore_args}, partial_restore=True))
    flat = jax.tree_util.tree_flatten_with_path(arrays["model"])[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): leaf
            for path, leaf in flat}


def read_weights(source: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """``({name: array}, description)`` of an ``init_from`` source (see the module doc)."""
    if isinstance(source, Mapping):
        return dict(source), "the given arrays"
    path = Path(source)
    if path.is_dir():  # absolute: Orbax refuses relative checkpoint paths
        step_dir = _checkpoint_step(path.absolute())
        return _read_checkpoint_model(step_dir), str(step_dir)
    return read_weight_file(path), str(path)


def read_weight_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a weight file as NumPy: ``.safetensors`` (the ``safetensors``
    package, ``pip install 'nnx-trainer[pretrained]'``), ``.npz``, or a PyTorch pickle
    (``.pth``/``.pt``/``.bin``, read with ``torch.load(weights_only=True)`` where torch is
    installed; a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper and a
    ``module.`` prefix are dropped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weight file or checkpoint directory at {path}")
    if path.suffix == ".npz":
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    if path.suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError as exc:
            raise ImportError(f"reading {path} needs the safetensors package: pip install "
                              "'nnx-trainer[pretrained]' (or safetensors)") from exc
        return load_file(str(path))
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            import torch
        except ImportError as exc:
            raise ImportError(
                f"reading {path} (a PyTorch pickle) needs torch; install it, or convert the "
                "file to .safetensors where torch is (safetensors.torch.save_file)") from exc
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model"):
            if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
                loaded = loaded[wrapper]
        if not isinstance(loaded, Mapping):
            raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state dict")
        return {k.removeprefix("module."): (v.float() if v.is_floating_point() else v)
                .detach().numpy() for k, v in loaded.items() if hasattr(v, "numpy")}
    raise ValueError(f"{path}: unknown weight file type {path.suffix!r}; expected "
                     ".safetensors, .npz, or .pth/.pt with torch installed")


def partial_state(model_state: nnx.State, tensors: Mapping[str, Any],
                  source: str) -> tuple[nnx.State, InitReport]:
    """``model_state`` with every Param/BatchStat whose path and shape ``tensors`` has
    replaced (cast to its dtype), and the report. Raises if nothing matches."""
    tensors = _normalise(tensors)
    loaded, skipped, used = [], {}, set()
    flat = []
    for path, variable in nnx.to_flat_state(model_state):
        key = "/".join(map(str, path))
        if isinstance(variable, LOADED_TYPES):
            if key not in tensors:
                skipped[key] = "not in the source"
            elif tuple(tensors[key].shape) != tuple(variable.shape):
                used.add(key)
                skipped[key] = (f"shape {tuple(tensors[key].shape)} in the source, "
                                f"{tuple(variable.shape)} here")
            else:
                used.add(key)
                loaded.append(key)
                variable = variable.replace(jnp.asarray(tensors[key], dtype=variable.dtype))
        flat.append((path, variable))
    report = InitReport(source, loaded, skipped, sorted(set(tensors) - used))
    if not loaded:
        theirs = ", ".join(list(tensors)[:3]) or "none"
        ours = ", ".join(list(skipped)[:3])
        raise ValueError(f"init_from {source}: no array matches the model by path and shape "
                         f"(the source has {theirs}, ...; the model {ours}, ...); is it a "
                         "checkpoint of another model, or a file the task cannot map?")
    return nnx.from_flat_state(flat), report


def save_weights(model_state: nnx.State | nnx.Module, path: str | os.PathLike) -> Path:
    """Write a model's parameters and batch statistics as ``.npz`` or ``.safetensors``
    under their ``/``-joined paths: a file ``init_from`` reads back by name."""
    state = nnx.state(model_state) if isinstance(model_state, nnx.Module) else model_state
    arrays = {"/".join(map(str, p)): np.asarray(v.get_value())
              for p, v in nnx.to_flat_state(state) if isinstance(v, LOADED_TYPES)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file(arrays, str(tmp))
    elif path.suffix == ".npz":
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    else:
        raise ValueError(f"{path}: write weights as .safetensors or .npz")
    os.replace(tmp, path)
    return path
