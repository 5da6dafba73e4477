"""The layers ResNets are built from: convolution and batch norm as torchvision sets them
up, the projection shortcut, and the two residual blocks.

``dtype`` is the compute dtype, ``param_dtype`` the storage dtype of the parameters;
``conv_impl`` selects the convolutions' implementation (see :mod:`resnet_task.models`).
The attribute names (``conv1``, ``bn1``, ..., ``shortcut``) are the parameter paths that
checkpoints and :mod:`resnet_task.torchvision_weights` rely on.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nnx_trainer.conv import resolve_conv_impl

Dtype = Any

__all__ = ["BasicBlock", "BottleneckBlock", "Block", "PAD_3X3", "PAD_7X7", "batch_norm", "conv",
           "projection"]

# Explicit symmetric padding (rather than "SAME") so strided convolutions see the same
# windows as the torchvision reference models.
PAD_3X3 = ((1, 1), (1, 1))
PAD_7X7 = ((3, 3), (3, 3))


def conv(
    in_features: int,
    out_features: int,
    kernel: int,
    strides: int,
    padding: Any,
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    rngs: nnx.Rngs,
    conv_impl: str = "auto",
) -> nnx.Conv:
    """A square ``kernel`` x ``kernel`` convolution without bias, initialised as torchvision's."""
    # No bias: every convolution here is followed by BatchNorm, whose bias makes it redundant.
    # Kernel init is He-normal over fan_out (untruncated), as torchvision's ResNets use.
    return nnx.Conv(
        in_features,
        out_features,
        kernel_size=(kernel, kernel),
        strides=(strides, strides),
        padding=padding,
        use_bias=False,
        kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "normal"),
        dtype=dtype,
        param_dtype=param_dtype,
        conv_general_dilated=resolve_conv_impl(conv_impl),
        rngs=rngs,
    )


def batch_norm(
    features: int, *, zero_scale: bool, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs
) -> nnx.BatchNorm:
    """BatchNorm with PyTorch's defaults; ``zero_scale`` starts its scale at zero."""
    # momentum/epsilon match PyTorch's BatchNorm2d defaults (its momentum 0.1 == ours 0.9).
    return nnx.BatchNorm(
        features,
        momentum=0.9,
        epsilon=1e-5,
        scale_init=nnx.initializers.zeros_init() if zero_scale else nnx.initializers.ones_init(),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def projection(
    in_features: int,
    out_features: int,
    strides: int,
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    rngs: nnx.Rngs,
    conv_impl: str = "auto",
) -> nnx.Sequential | None:
    """The 1x1 conv + BN shortcut, or None when the identity already has the right shape."""
    if strides == 1 and in_features == out_features:
        return None
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    return nnx.Sequential(
        conv(in_features, out_features, 1, strides, "VALID", conv_impl=conv_impl, **kw),
        batch_norm(out_features, zero_scale=False, **kw),
    )


class BasicBlock(nnx.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34, CIFAR ResNets)."""

    expansion = 1

    def __init__(
        self,
        in_features: int,
        features: int,
        strides: int = 1,
        *,
        zero_init_residual: bool = False,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        conv_impl: str = "auto",
        rngs: nnx.Rngs,
    ) -> None:
        """Build the block; ``strides`` applies to the first 3x3 conv and the shortcut.

        ``zero_init_residual`` starts the last BatchNorm scale at zero so the block begins as
        the identity (Goyal et al. 2017). ``conv_impl``: see the module docstring.
        """
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ckw = dict(kw, conv_impl=conv_impl)
        out_features = features * self.expansion
        self.conv1 = conv(in_features, features, 3, strides, PAD_3X3, **ckw)
        self.bn1 = batch_norm(features, zero_scale=False, **kw)
        self.conv2 = conv(features, out_features, 3, 1, PAD_3X3, **ckw)
        self.bn2 = batch_norm(out_features, zero_scale=zero_init_residual, **kw)
        self.shortcut = projection(in_features, out_features, strides, **ckw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the block to an NHWC batch."""
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        identity = x if self.shortcut is None else self.shortcut(x)
        return nnx.relu(y + identity)


class BottleneckBlock(nnx.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a residual connection (ResNet-50 and deeper).

    The stride sits on the 3x3 convolution ("ResNet v1.5", as in torchvision).
    """

    expansion = 4

    def __init__(
        self,
        in_features: int,
        features: int,
        strides: int = 1,
        *,
        zero_init_residual: bool = False,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        conv_impl: str = "auto",
        rngs: nnx.Rngs,
    ) -> None:
        """Build the block; the output has ``features * 4`` channels."""
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ckw = dict(kw, conv_impl=conv_impl)
        out_features = features * self.expansion
        self.conv1 = conv(in_features, features, 1, 1, "VALID", **ckw)
        self.bn1 = batch_norm(features, zero_scale=False, **kw)
        self.conv2 = conv(features, features, 3, strides, PAD_3X3, **ckw)
        self.bn2 = batch_norm(features, zero_scale=False, **kw)
        self.conv3 = conv(features, out_features, 1, 1, "VALID", **ckw)
        self.bn3 = batch_norm(out_features, zero_scale=zero_init_residual, **kw)
        self.shortcut = projection(in_features, out_features, strides, **ckw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply the block to an NHWC batch."""
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = nnx.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        identity = x if self.shortcut is None else self.shortcut(x)
        return nnx.relu(y + identity)


Block = type[BasicBlock] | type[BottleneckBlock]
