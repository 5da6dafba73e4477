"""A drop-in ``conv_general_dilated`` whose forward and backward passes run well on XLA:CPU.

``jax.lax.conv_general_dilated``'s autodiff computes the kernel gradient as one more
convolution, with the batch as the contraction axis and the output gradient as a huge
"kernel". XLA:CPU runs that form at a fraction of its matrix-product speed, and on a CPU
the kernel gradient is the slowest third of a convolution's training cost.

:func:`conv_general_dilated` has the same signature and forward result. The forward
pass is routed shape by shape (``conv_forward.forward_path``) to XLA's convolution or to one
matrix product over channels and the live kernel taps (``forward_im2col``: a 1x1 kernel needs
no copy; otherwise the taps' strided slices are concatenated, im2col). XLA:CPU's
convolution is pathologically slow when the kernel is larger than the image (3x3 over a
2x2 image, 512 -> 512 channels: 70-130x slower than im2col + dot), which happens in the
last stages of every ResNet fed 32x32 or 64x64 images. With 64 channels (every ResNet's
first stage) XLA:CPU's convolution runs at half its matrix-product speed; there the
forward is one product per kernel row over that row's taps side by side, looped over
chunks of images that stay in cache (``forward_rows``: 3x3 64 -> 64 at 32x32, batch 128,
137 -> 68 ms). In bfloat16 one product per live tap (``forward_shifted``) or per kernel
row also replaces XLA's convolution on small images, where XLA:CPU's bfloat16
convolution is slow. A ``jax.custom_vjp`` whose backward pass computes

* the kernel gradient, where that measured faster (1x1 kernels, and 3x3 with many
  channels or large images: see ``conv_gradients.shifted_products_pay``), as ``kh * kw`` matrix
  products per chunk of images (``kh``, one per kernel row, with 64 input channels at
  stride 1),
  ``dW[i, j] = sum_{b,h,w} x_pad[b, h*s + i, w*s + j, :]^T  g[b, h, w, :]``, looped over
  chunks of images of about ``CHUNK_BYTES`` per tap, so each chunk's shifted copies of
  the input stay in cache (1.2-2.5x faster than one product over the whole batch,
  whose copies are each the size of the input), each product as ``g^T x`` or ``x^T g``,
  whichever runs faster for its shape (``conv_gradients.output_grad_first``);
* the input gradient at stride 1 as the forward convolution of the output gradient with
  the flipped kernel, routed like any forward; at stride 2 on larger images as ``s * s``
  stride-1 convolutions with the kernel's stride phases (sub-pixel form), which do only
  the useful products where XLA's rule convolves a zero-dilated copy of the output
  gradient (``input_grad_by_phases``; 1.5-2.2x on ResNet-18's 3x3/2 layers); otherwise
  as the transpose of the forward's own formulation.

Only what ResNet-style models use takes this path: 2-D NHWC inputs, HWIO kernels, NHWC
outputs (what ``flax.nnx.Conv`` passes), any strides, any non-negative padding, no
dilation, no grouping, floating inputs of one dtype. Everything else goes to
``jax.lax.conv_general_dilated`` unchanged, so the result is never wrong, only
sometimes not faster. A ``custom_vjp`` function cannot be differentiated in forward
mode (``jax.jvp``, ``jax.jacfwd``); use XLA's convolution for that.

``default_conv_for_backend()`` picks this convolution on the CPU backend and XLA's on
GPU and TPU, where XLA's own kernels are already fast; ``resolve_conv_impl`` maps the
names ``"auto"``, ``"xla"`` and ``"custom"`` (what models accept) to a function.
``"auto"`` maps to :func:`auto_conv_general_dilated`, which makes that choice each time
it is traced, not when the model is built: asking for the backend initialises it, and a
multi-process run must call ``jax.distributed.initialize()`` before that happens, so
building a model (or a Task that builds one) must leave the backend alone.

The forward formulations and their router live in :mod:`nnx_trainer.conv_forward`, the
gradient formulations in :mod:`nnx_trainer.conv_gradients`, the loop over chunks of a
batch both use in :mod:`nnx_trainer.conv_chunks`; this module ties them into one
``custom_vjp`` and chooses between it and XLA's convolution.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax import lax

from nnx_trainer import conv_forward
from nnx_trainer.conv_forward import FORWARD_PATHS, Geometry, geometry_of
from nnx_trainer.conv_gradients import conv_bwd

__all__ = [
    "CONV_IMPLS", "auto_conv_general_dilated", "conv_general_dilated", "default_conv_for_backend",
    "resolve_conv_impl", "FORWARD_PATHS",
]

ConvFn = Callable[..., jax.Array]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x: jax.Array, w: jax.Array, geo: Geometry) -> jax.Array:
    return conv_forward.forward(x, w, geo)


def _conv_fwd(x: jax.Array, w: jax.Array, geo: Geometry) -> tuple[jax.Array, tuple]:
    return conv_forward.forward(x, w, geo), (x, w)


_conv.defvjp(_conv_fwd, conv_bwd)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
) -> jax.Array:
    """``jax.lax.conv_general_dilated`` with a backward pass that is fast on XLA:CPU.

    Same arguments and forward result. NHWC/HWIO/NHWC 2-D convolutions without dilation
    or grouping (every ``nnx.Conv`` of a ResNet) get the custom VJP described in this
    module's docstring; any other call is passed to ``jax.lax.conv_general_dilated``.
    """
    geo = geometry_of(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type, out_sharding,
    )
    if geo is None:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count,
            precision=precision, preferred_element_type=preferred_element_type,
            out_sharding=out_sharding,
        )
    return _conv(lhs, rhs, geo)


CONV_IMPLS = ("auto", "xla", "custom")
# Overrides what "auto" picks, for every model in this process and its subprocesses
# (e.g. NNX_TRAINER_CONV_IMPL=xla to compare against XLA's own gradient).
CONV_IMPL_ENV = "NNX_TRAINER_CONV_IMPL"


def default_conv_for_backend(backend: str | None = None) -> ConvFn:
    """This module's convolution on the CPU backend, ``jax.lax``'s on GPU and TPU.

    ``backend`` defaults to ``jax.default_backend()``. ``$NNX_TRAINER_CONV_IMPL``
    (``xla`` or ``custom``), when set, decides instead.
    """
    forced = os.environ.get(CONV_IMPL_ENV, "").strip().lower()
    if forced:
        if forced not in ("xla", "custom"):
            raise ValueError(f"{CONV_IMPL_ENV}={forced!r}: choose xla or custom (or unset it)")
        return lax.conv_general_dilated if forced == "xla" else conv_general_dilated
    backend = backend or jax.default_backend()
    return conv_general_dilated if backend == "cpu" else lax.conv_general_dilated


def auto_conv_general_dilated(*args: Any, **kwargs: Any) -> jax.Array:
    """``jax.lax.conv_general_dilated``'s signature; runs :func:`default_conv_for_backend`'s
    pick, decided at each call, i.e. when the model is traced (once per compilation).

    Deciding here rather than when the model is built keeps model construction free of
    backend queries, which would initialise the XLA backend before a multi-process run
    has joined ``jax.distributed``.
    """
    return default_conv_for_backend()(*args, **kwargs)


def resolve_conv_impl(name: str) -> ConvFn:
    """The convolution for ``conv_impl=name``: "auto" (by backend, decided at trace time:
    :func:`auto_conv_general_dilated`), "xla" or "custom". Never touches the backend."""
    if name == "auto":
        return auto_conv_general_dilated
    if name == "xla":
        return lax.conv_general_dilated
    if name == "custom":
        return conv_general_dilated
    raise ValueError(f"unknown conv_impl {name!r}; choose one of: {', '.join(CONV_IMPLS)}")
