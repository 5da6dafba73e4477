"""ResNet models in Flax NNX.

Two families live here:

* torchvision-style ResNets (``resnet18`` ... ``resnet152``) with either the ImageNet stem
  (7x7 conv + max-pool) or a CIFAR stem (3x3 conv, no pool) for small images;
* the CIFAR ResNet-(6n+2) of He et al. 2016, section 4.2 (``resnet20`` ... ``resnet110``).

Each named model is one row of a table, its depth with the stage sizes and block it binds
(the layout of Flax's ImageNet example); the layers and blocks live in
:mod:`resnet_task.blocks`.

All models take NHWC input and return float32 logits. ``dtype`` is the compute dtype,
``param_dtype`` the storage dtype of the parameters, so mixed precision is
``dtype=jnp.bfloat16, param_dtype=jnp.float32``. BatchNorm running statistics are always float32
(``nnx.BatchNorm`` allocates them as float32 whatever ``param_dtype`` is). Switch BatchNorm
between batch and running statistics with ``model.train()`` / ``model.eval()``.

``conv_impl`` selects the convolutions' implementation: "auto" (the default) uses
``nnx_trainer.conv.conv_general_dilated`` on the CPU backend, whose backward pass XLA:CPU
runs faster (same forward, gradients equal to float tolerance), and XLA's own convolution
on GPU and TPU, decided when the model is traced
(``nnx_trainer.conv.auto_conv_general_dilated``), so building a model never initialises
the backend (a multi-process run joins ``jax.distributed`` after the Task is built);
"xla" and "custom" force one or the other. "xla" is also the choice for forward-mode
differentiation (``jax.jvp``), which a ``custom_vjp`` does not support.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nnx_trainer.conv import resolve_conv_impl
from resnet_task.blocks import (
    PAD_3X3,
    PAD_7X7,
    BasicBlock,
    Block,
    BottleneckBlock,
    batch_norm,
    conv,
)

__all__ = [
    "MODEL_NAMES", "STEMS", "BasicBlock", "BottleneckBlock", "ResNet", "SimpleResNet",
    "create_model", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
]

Dtype = Any

STEMS = ("imagenet", "cifar")


def _check_num_classes(num_classes: int) -> None:
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")


def _stage(
    block: Block,
    in_features: int,
    features: int,
    num_blocks: int,
    strides: int,
    **kw: Any,
) -> tuple[nnx.Sequential, int]:
    """A stage of ``num_blocks`` blocks; returns it with its output channel count."""
    blocks = []
    for i in range(num_blocks):
        blocks.append(block(in_features, features, strides if i == 0 else 1, **kw))
        in_features = features * block.expansion
    return nnx.Sequential(*blocks), in_features


class ResNet(nnx.Module):
    """torchvision-style ResNet with an ImageNet or CIFAR stem."""

    def __init__(
        self,
        stage_sizes: Sequence[int],
        block: Block,
        *,
        num_classes: int,
        in_channels: int = 3,
        stem: str = "imagenet",
        width: int = 64,
        zero_init_residual: bool = False,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        conv_impl: str = "auto",
        rngs: nnx.Rngs,
    ) -> None:
        """Build a ResNet whose stage ``i`` has ``width * 2**i`` block features.

        ``stem="imagenet"``: 7x7/2 conv, BN, relu, 3x3/2 max-pool (for ~224 px images).
        ``stem="cifar"``: 3x3/1 conv, BN, relu, no pooling (for ~32 px images).
        ``conv_impl``: "auto", "xla" or "custom" (see the module docstring).
        """
        _check_num_classes(num_classes)
        resolve_conv_impl(conv_impl)  # an unknown name fails here, with the choices
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; choose one of: {', '.join(STEMS)}")
        if not stage_sizes or any(n < 1 for n in stage_sizes):
            raise ValueError(f"stage_sizes must be non-empty and positive, got {stage_sizes}")
        if width < 1:
            raise ValueError(f"width must be at least 1, got {width}")

        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.stem = stem
        if stem == "imagenet":
            self.conv1 = conv(in_channels, width, 7, 2, PAD_7X7, conv_impl=conv_impl, **kw)
        else:
            self.conv1 = conv(in_channels, width, 3, 1, PAD_3X3, conv_impl=conv_impl, **kw)
        self.bn1 = batch_norm(width, zero_scale=False, **kw)

        stages = []
        features = width
        for i, num_blocks in enumerate(stage_sizes):
            stage, features = _stage(
                block,
                features,
                width * 2**i,
                num_blocks,
                1 if i == 0 else 2,
                zero_init_residual=zero_init_residual,
                conv_impl=conv_impl,
                **kw,
            )
            stages.append(stage)
        self.stages = nnx.List(stages)
        self.head = nnx.Linear(features, num_classes, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Map an NHWC image batch to float32 logits of shape ``(batch, num_classes)``."""
        x = nnx.relu(self.bn1(self.conv1(x.astype(self.dtype))))
        if self.stem == "imagenet":
            # -inf padding (flax's max_pool default) so padded cells never win the max.
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=PAD_3X3)
        for stage in self.stages:
            x = stage(x)
        x = jnp.mean(x, axis=(1, 2))
        return self.head(x).astype(jnp.float32)


class SimpleResNet(nnx.Module):
    """The CIFAR ResNet-(6n+2) of He et al. 2016, section 4.2 (n = ``num_blocks``).

    Three stages of ``num_blocks`` BasicBlocks with ``initial_features * (1, 2, 4)`` channels.
    Shortcuts that change shape use a 1x1 projection (the paper's option B) rather than
    zero-padding, so parameter counts are slightly above the paper's (ResNet-20: 272,474 for 10
    classes versus the paper's 0.27M).
    """

    def __init__(
        self,
        num_blocks: int,
        initial_features: int = 16,
        *,
        num_classes: int,
        in_channels: int = 3,
        zero_init_residual: bool = False,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        conv_impl: str = "auto",
        rngs: nnx.Rngs,
    ) -> None:
        """Build a ResNet with ``6 * num_blocks + 2`` weighted layers.

        ``conv_impl``: "auto", "xla" or "custom" (see the module docstring).
        """
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        if initial_features < 1:
            raise ValueError(f"initial_features must be at least 1, got {initial_features}")
        _check_num_classes(num_classes)
        resolve_conv_impl(conv_impl)  # an unknown name fails here, with the choices

        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.conv1 = conv(
            in_channels, initial_features, 3, 1, PAD_3X3, conv_impl=conv_impl, **kw
        )
        self.bn1 = batch_norm(initial_features, zero_scale=False, **kw)
        stages = []
        features = initial_features
        for i in range(3):
            stage, features = _stage(
                BasicBlock,
                features,
                initial_features * 2**i,
                num_blocks,
                1 if i == 0 else 2,
                zero_init_residual=zero_init_residual,
                conv_impl=conv_impl,
                **kw,
            )
            stages.append(stage)
        self.stages = nnx.List(stages)
        self.head = nnx.Linear(features, num_classes, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Map an NHWC image batch to float32 logits of shape ``(batch, num_classes)``."""
        x = nnx.relu(self.bn1(self.conv1(x.astype(self.dtype))))
        for stage in self.stages:
            x = stage(x)
        x = jnp.mean(x, axis=(1, 2))
        return self.head(x).astype(jnp.float32)


def _torchvision_variant(depth: int, stage_sizes: tuple[int, ...],
                         block: Block) -> Callable[..., ResNet]:
    """The ``resnet<depth>`` factory: :class:`ResNet` with these stages and block."""

    def factory(*, num_classes: int, in_channels: int = 3, stem: str = "imagenet",
                dtype: Dtype = jnp.float32, rngs: nnx.Rngs, **kwargs: Any) -> ResNet:
        return ResNet(stage_sizes, block, num_classes=num_classes, in_channels=in_channels,
                      stem=stem, dtype=dtype, rngs=rngs, **kwargs)

    factory.__name__ = factory.__qualname__ = f"resnet{depth}"
    factory.__doc__ = (f"ResNet-{depth}; extra keyword arguments (``width``, ``param_dtype``, "
                       "...) go to ResNet.")
    return factory


def _cifar_variant(depth: int) -> Callable[..., SimpleResNet]:
    """The ``resnet<depth>`` factory: :class:`SimpleResNet` with ``(depth - 2) / 6`` blocks."""
    num_blocks = (depth - 2) // 6

    def factory(*, num_classes: int, in_channels: int = 3, dtype: Dtype = jnp.float32,
                rngs: nnx.Rngs, **kwargs: Any) -> SimpleResNet:
        return SimpleResNet(num_blocks, num_classes=num_classes, in_channels=in_channels,
                            dtype=dtype, rngs=rngs, **kwargs)

    factory.__name__ = factory.__qualname__ = f"resnet{depth}"
    factory.__doc__ = (f"CIFAR ResNet-{depth} ({num_blocks} blocks per stage); extra keyword "
                       "arguments (``initial_features``, ``param_dtype``, ...) go to SimpleResNet.")
    return factory


# The model families as tables (as Flax's ImageNet example writes
# ``ResNet18 = partial(ResNet, stage_sizes=[2, 2, 2, 2], block_cls=ResNetBlock)``).
resnet18 = _torchvision_variant(18, (2, 2, 2, 2), BasicBlock)
resnet34 = _torchvision_variant(34, (3, 4, 6, 3), BasicBlock)
resnet50 = _torchvision_variant(50, (3, 4, 6, 3), BottleneckBlock)
resnet101 = _torchvision_variant(101, (3, 4, 23, 3), BottleneckBlock)
resnet152 = _torchvision_variant(152, (3, 8, 36, 3), BottleneckBlock)
# Depth 6n + 2 (He et al. 2016, section 4.2).
resnet20 = _cifar_variant(20)
resnet32 = _cifar_variant(32)
resnet44 = _cifar_variant(44)
resnet56 = _cifar_variant(56)
resnet110 = _cifar_variant(110)

_TORCHVISION_STYLE: dict[str, Callable[..., ResNet]] = {
    f.__name__: f for f in (resnet18, resnet34, resnet50, resnet101, resnet152)}
_CIFAR_STYLE: dict[str, Callable[..., SimpleResNet]] = {
    **{f.__name__: f for f in (resnet20, resnet32, resnet44, resnet56, resnet110)},
    "simple": SimpleResNet,  # needs num_blocks
}

MODEL_NAMES: tuple[str, ...] = (*_TORCHVISION_STYLE, *_CIFAR_STYLE)


def create_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    stem: str = "cifar",
    dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
    **kwargs: Any,
) -> nnx.Module:
    """Build the model called ``name`` (one of ``MODEL_NAMES``).

    ``stem`` only selects between stems for the torchvision-style ResNets; the CIFAR family
    ("resnet20" ... "resnet110", "simple") always has the CIFAR stem, so it accepts only
    ``stem="cifar"``. "simple" needs ``num_blocks`` (and optionally ``initial_features``) in
    ``kwargs``; other keyword arguments are passed to the model's constructor.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; choose one of: {', '.join(STEMS)}")
    _check_num_classes(num_classes)
    common = dict(num_classes=num_classes, in_channels=in_channels, dtype=dtype, rngs=rngs)
    if name in _TORCHVISION_STYLE:
        return _TORCHVISION_STYLE[name](stem=stem, **common, **kwargs)
    if stem != "cifar":
        raise ValueError(f"model {name!r} only supports stem 'cifar', got {stem!r}")
    if name == "simple" and "num_blocks" not in kwargs:
        raise ValueError("model 'simple' needs num_blocks=... (and optionally initial_features)")
    return _CIFAR_STYLE[name](**common, **kwargs)
