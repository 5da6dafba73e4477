"""PyTorch ResNet weights in and out: torchvision's (and timm's) state-dict layout.

torchvision's ``resnet18`` ... ``resnet152`` and timm's plain ``resnet*`` models name their
tensors the same way (``conv1.weight``, ``bn1.running_mean``, ``layer3.5.conv2.weight``,
``layer2.0.downsample.0.weight``, ``fc.weight``). Our :class:`~resnet_task.models.ResNet`
has the same structure (ResNet v1.5: a bottleneck's stride on its 3x3 convolution, a 1x1
conv + BN projection shortcut, 7x7/2 stem + 3x3/2 max-pool padded by one, global mean
pool, BatchNorm epsilon 1e-5), so a state dict maps onto it tensor by tensor:

=============================  =============================================  ======================
torchvision                    ours (``nnx.state`` path)                      layout
=============================  =============================================  ======================
``conv1.weight``               ``conv1.kernel``                               OIHW -> HWIO
``bn1.weight`` / ``.bias``     ``bn1.scale`` / ``.bias``                      as is
``bn1.running_mean`` / _var    ``bn1.mean`` / ``.var``                        as is (float32)
``layer{i}.{j}.convK``         ``stages.{i-1}.layers.{j}.convK``              OIHW -> HWIO
``layer{i}.{j}.downsample.0``  ``stages.{i-1}.layers.{j}.shortcut.layers.0``  conv: OIHW -> HWIO
``layer{i}.{j}.downsample.1``  ``stages.{i-1}.layers.{j}.shortcut.layers.1``  BN: as is
``fc.weight`` / ``fc.bias``    ``head.kernel`` / ``head.bias``                (out, in) -> (in, out)
=============================  =============================================  ======================

``num_batches_tracked`` (a counter PyTorch keeps per BatchNorm) is ignored on the way in
and written as 0 on the way out. Nothing is downloaded: the caller points at a file,
``.safetensors`` (read with the ``safetensors`` package's NumPy API, the ``pretrained``
extra) or ``.pth``/``.pt`` (read with ``torch.load(weights_only=True)``, when torch is
installed). Any mismatch (another depth, a missing or extra tensor, another shape, e.g.
1000 ImageNet classes into a 10-class head) is a ``ValueError`` naming the tensor and the
shape our model expects; use :func:`infer_architecture` to build the model a file fits, or
``nnx_trainer``'s ``init_from`` for a partial load (everything but a new head).

The model's input is NHWC (PyTorch's is NCHW): transpose images, not weights.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnx_trainer.init_from import read_weight_file

__all__ = [
    "infer_architecture", "is_torchvision_state_dict", "load_torchvision_weights",
    "nnx_weights", "read_state_dict", "save_torchvision_weights", "torchvision_state_dict",
]

#: Blocks per stage of torchvision's ResNets, by (blocks, bottleneck) -> name.
_ARCHITECTURES = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}
# torchvision BatchNorm2d tensor name -> nnx.BatchNorm attribute.
_BN_NAMES = (("weight", "scale"), ("bias", "bias"), ("running_mean", "mean"),
             ("running_var", "var"))
_BLOCK_KEY = re.compile(r"^layer(\d+)\.(\d+)\.")


def _conv_pairs(prefix: str, conv: nnx.Conv) -> Iterator[tuple[str, nnx.Variable, str]]:
    yield f"{prefix}.weight", conv.kernel, "conv"
    if conv.bias is not None:
        yield f"{prefix}.bias", conv.bias, "plain"


def _bn_pairs(prefix: str, bn: nnx.BatchNorm) -> Iterator[tuple[str, nnx.Variable, str]]:
    for torch_name, ours in _BN_NAMES:
        variable = getattr(bn, ours)
        if variable is not None:
            yield f"{prefix}.{torch_name}", variable, "plain"


def _pairs(model: nnx.Module) -> list[tuple[str, nnx.Variable, str]]:
    """``(torchvision key, our Variable, kind)`` for every tensor of a ResNet-style model.

    Works for anything shaped like ``resnet_task.models.ResNet`` / ``SimpleResNet``:
    ``conv1``, ``bn1``, ``stages`` of blocks with ``convK``/``bnK``/``shortcut``, ``head``.
    """
    missing = [a for a in ("conv1", "bn1", "stages", "head") if not hasattr(model, a)]
    if missing:
        raise TypeError(
            f"{type(model).__name__} is not a resnet_task ResNet (no {', '.join(missing)}); "
            "torchvision weights map only onto resnet_task.models.ResNet-style models")
    pairs = [*_conv_pairs("conv1", model.conv1), *_bn_pairs("bn1", model.bn1)]
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage.layers):
            prefix = f"layer{i + 1}.{j}"
            k = 1
            while hasattr(block, f"conv{k}"):
                pairs += _conv_pairs(f"{prefix}.conv{k}", getattr(block, f"conv{k}"))
                pairs += _bn_pairs(f"{prefix}.bn{k}", getattr(block, f"bn{k}"))
                k += 1
            if block.shortcut is not None:
                conv, bn = block.shortcut.layers
                pairs += _conv_pairs(f"{prefix}.downsample.0", conv)
                pairs += _bn_pairs(f"{prefix}.downsample.1", bn)
    pairs.append(("fc.weight", model.head.kernel, "dense"))
    if model.head.bias is not None:
        pairs.append(("fc.bias", model.head.bias, "plain"))
    return pairs


def _to_torch_layout(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":  # HWIO -> OIHW
        return np.ascontiguousarray(np.transpose(value, (3, 2, 0, 1)))
    if kind == "dense":  # (in, out) -> (out, in)
        return np.ascontiguousarray(value.T)
    return value


def _from_torch_layout(value: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":  # OIHW -> HWIO
        return np.transpose(value, (2, 3, 1, 0))
    if kind == "dense":
        return value.T
    return value


def _torch_shape(variable: nnx.Variable, kind: str) -> tuple[int, ...]:
    shape = tuple(variable.shape)
    if kind == "conv":
        return (shape[3], shape[2], shape[0], shape[1])
    if kind == "dense":
        return (shape[1], shape[0])
    return shape


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a PyTorch weight file as NumPy arrays (float32 for floating ones).

    ``.safetensors`` needs the ``safetensors`` package (``pip install
    nnx-trainer[pretrained]``); ``.pth``/``.pt``/``.bin`` need torch. A checkpoint that
    wraps its weights (``{"state_dict": ...}`` or ``{"model": ...}``) is unwrapped, and a
    ``module.`` prefix (``DataParallel``) is dropped.
    """
    tensors = read_weight_file(path)
    out = {}
    for key, value in tensors.items():
        key = key.removeprefix("module.")
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating) or value.dtype.name == "bfloat16":
            value = value.astype(np.float32)
        out[key] = value
    return out


def _as_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
    if isinstance(source, Mapping):
        return {k.removeprefix("module."): np.asarray(v) for k, v in source.items()}
    return read_state_dict(source)


def infer_architecture(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """What a torchvision-layout state dict is: ``{"model": "resnet50" (or None for a
    non-standard depth), "stage_sizes": (3, 4, 6, 3), "bottleneck": True, "width": 64,
    "num_classes": 1000, "in_channels": 3, "stem": "imagenet"}``."""
    state = _as_state_dict(source)
    if "conv1.weight" not in state or "fc.weight" not in state:
        raise ValueError("not a torchvision/timm ResNet state dict: no conv1.weight or "
                         f"fc.weight among its {len(state)} tensors (first: "
                         f"{', '.join(list(state)[:3])})")
    blocks: dict[int, set[int]] = {}
    for key in state:
        if m := _BLOCK_KEY.match(key):
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
    stage_sizes = tuple(len(blocks[i]) for i in sorted(blocks))
    bottleneck = "layer1.0.conv3.weight" in state
    conv1 = state["conv1.weight"].shape
    return {
        "model": _ARCHITECTURES.get((stage_sizes, bottleneck)),
        "stage_sizes": stage_sizes, "bottleneck": bottleneck, "width": int(conv1[0]),
        "num_classes": int(state["fc.weight"].shape[0]), "in_channels": int(conv1[1]),
        "stem": "imagenet" if conv1[2] == 7 else "cifar",
    }


def _describe(shapes: Mapping[str, tuple[int, ...]]) -> str:
    try:
        arch = infer_architecture({k: np.broadcast_to(np.float32(0), v) for k, v in shapes.items()})
    except ValueError:
        return "no torchvision ResNet"
    name = arch["model"] or f"a ResNet with {arch['stage_sizes']} blocks per stage"
    return f"{name} layout, width {arch['width']}, {arch['num_classes']} classes"


def load_torchvision_weights(
    model: nnx.Module, source: str | os.PathLike | Mapping[str, Any], *,
    epsilon: float = 1e-5,
) -> nnx.Module:
    """Copy a torchvision/timm ResNet state dict into ``model`` (in place; returned).

    ``source`` is a file (see :func:`read_state_dict`) or a ``{name: array}`` mapping.
    Every tensor must match: a missing, extra or differently shaped one raises a
    ``ValueError`` naming it and the shape ``model`` expects (in PyTorch's layout), before
    anything is changed. ``epsilon`` is set on every BatchNorm (PyTorch's default, 1e-5;
    a state dict does not carry it). Parameters keep ``model``'s dtypes.
    """
    state = _as_state_dict(source)
    pairs = _pairs(model)
    expected = {key: (variable, kind) for key, variable, kind in pairs}
    ignored = {k for k in state if k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in state]
    extra = sorted(set(state) - set(expected) - ignored)
    where = (f"the weights are {_describe({k: v.shape for k, v in state.items()})}, "
             f"the model ({type(model).__name__}) "
             f"{_describe({k: _torch_shape(*vk) for k, vk in expected.items()})}")
    if missing:
        key = missing[0]
        shape = _torch_shape(*expected[key])
        raise ValueError(
            f"the weights lack {key} (expected shape {shape}){_more(missing)}: {where} "
            "(another depth or stem?)")
    if extra:
        raise ValueError(
            f"the weights have {extra[0]} (shape {tuple(state[extra[0]].shape)}), which "
            f"the model does not{_more(extra)}: {where} (another depth?)")
    for key, (variable, kind) in expected.items():
        want = _torch_shape(variable, kind)
        got = tuple(state[key].shape)
        if got != want:
            hint = (" (another number of classes: build the model with the file's, or "
                    "load everything but the head with init_from)" if key.startswith("fc.")
                    else "")
            raise ValueError(f"{key} has shape {got}, the model expects {want}{hint}: {where}")
    for key, (variable, kind) in expected.items():
        value = _from_torch_layout(np.asarray(state[key], np.float32), kind)
        variable.set_value(jnp.asarray(value, dtype=variable.dtype))
    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.BatchNorm):
            module.epsilon = epsilon
    return model


def _more(keys: list[str]) -> str:
    return f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""


def torchvision_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """``model``'s weights as a torchvision ResNet state dict of NumPy arrays (float32,
    PyTorch layout, ``num_batches_tracked`` 0), ready for ``load_state_dict``."""
    out: dict[str, np.ndarray] = {}
    for key, variable, kind in _pairs(model):
        out[key] = _to_torch_layout(np.asarray(variable.get_value(), np.float32), kind)
        if key.endswith(".running_var"):
            out[key.removesuffix("running_var") + "num_batches_tracked"] = np.zeros((), np.int64)
    return out


def save_torchvision_weights(model: nnx.Module, path: str | os.PathLike) -> Path:
    """Write :func:`torchvision_state_dict` to a ``.safetensors`` file (atomically).

    In PyTorch: ``model.load_state_dict(safetensors.torch.load_file(path))`` on a
    torchvision ResNet of the same depth, width and number of classes.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: weights are written as .safetensors; name the file so")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(torchvision_state_dict(model), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return path


def is_torchvision_state_dict(tensors: Mapping[str, Any]) -> bool:
    """Whether ``tensors`` is named like a torchvision/timm ResNet state dict."""
    keys = {k.removeprefix("module.") for k in tensors}
    return "conv1.weight" in keys and "fc.weight" in keys


def _nnx_name(key: str) -> tuple[str, str]:
    """(our ``/``-joined path, kind) of a torchvision key, by name alone."""
    prefix = ""
    if m := _BLOCK_KEY.match(key):
        prefix, key = f"stages/{int(m[1]) - 1}/layers/{m[2]}/", key[m.end():]
    module, _, leaf = key.rpartition(".")
    if not module:  # not a module's tensor: left as it is (reported unused)
        return key, "plain"
    module = module.replace("downsample.", "shortcut/layers/")
    if module == "fc":
        return "head/" + ("kernel" if leaf == "weight" else leaf), "dense"
    if leaf == "weight" and (module.startswith("conv") or module == "shortcut/layers/0"):
        return f"{prefix}{module}/kernel", "conv"
    return f"{prefix}{module}/{dict(_BN_NAMES).get(leaf, leaf)}", "plain"


def nnx_weights(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A torchvision/timm ResNet state dict renamed to our models' ``nnx`` paths and
    layouts, tensor by tensor and by name alone (``layer2.0.downsample.0.weight`` ->
    ``stages/1/layers/0/shortcut/layers/0/kernel``, HWIO), for ``Trainer.fit(init_from=)``,
    which then loads what matches the model by path and shape and reports the rest."""
    out = {}
    for key, value in _as_state_dict(source).items():
        if key.endswith("num_batches_tracked"):
            continue
        name, kind = _nnx_name(key)
        out[name] = _from_torch_layout(np.asarray(value), kind)
    return out
