"""The forward formulations of :mod:`nnx_trainer.conv` and the router that picks one per shape.

A supported call is described by its :class:`Geometry` (strides, explicit padding,
precision). Its forward pass is computed by one of :data:`FORWARD_PATHS`: XLA's
convolution, one matrix product over channels and the live kernel taps (im2col), or one
product per live tap (shifted); :func:`forward_path` chooses by shape and dtype, from
measurements. Internal to :mod:`nnx_trainer.conv`; the names are public for its gradient
module, its tests and its benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "FORWARD_PATHS", "NHWC", "Geometry", "forward", "forward_im2col", "forward_path",
    "forward_shifted", "geometry_of", "live_taps", "out_size", "tap_slices", "xla_forward",
]

# What nnx.Conv passes for a 4-D input: lhs (0, 3, 1, 2) = NHWC, rhs (3, 2, 0, 1) = HWIO.
NHWC_SPEC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
NHWC = ("NHWC", "HWIO", "NHWC")


class Geometry(NamedTuple):
    """The static part of a supported convolution (hashable: a custom_vjp nondiff arg)."""

    strides: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    precision: Any  # as lax accepts it: None, str, lax.Precision or a pair of them


def _is_ones(v: Sequence[int] | None) -> bool:
    return v is None or all(int(d) == 1 for d in v)


def geometry_of(
    lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]], lhs_dilation: Sequence[int] | None,
    rhs_dilation: Sequence[int] | None, dimension_numbers: Any, feature_group_count: int,
    batch_group_count: int, precision: Any, preferred_element_type: Any, out_sharding: Any,
) -> Geometry | None:
    """The custom path's parameters for a ``lax.conv_general_dilated`` call (same
    arguments), or None when the call must go to XLA's convolution."""
    if lhs.ndim != 4 or rhs.ndim != 4 or len(window_strides) != 2:
        return None
    if not (_is_ones(lhs_dilation) and _is_ones(rhs_dilation)):
        return None
    if feature_group_count != 1 or batch_group_count != 1 or out_sharding is not None:
        return None
    dtype = jnp.dtype(lhs.dtype)
    if jnp.dtype(rhs.dtype) != dtype or not jnp.issubdtype(dtype, jnp.floating):
        return None
    if preferred_element_type is not None and jnp.dtype(preferred_element_type) != dtype:
        return None
    if dimension_numbers is None:  # lax's default is NCHW / OIHW
        return None
    try:
        dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    except (TypeError, ValueError):
        return None  # let lax raise its own error
    if dn != NHWC_SPEC:
        return None
    strides = (int(window_strides[0]), int(window_strides[1]))
    if min(strides) < 1 or lhs.shape[3] != rhs.shape[2]:
        return None
    if isinstance(padding, str):
        try:
            pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
        except (TypeError, ValueError):
            return None
    else:
        pads = list(padding)
    if len(pads) != 2:
        return None
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    if min(min(p) for p in pads) < 0:
        return None
    for size, k, (lo, hi) in zip(lhs.shape[1:3], rhs.shape[:2], pads, strict=True):
        if size + lo + hi < k:  # empty output: XLA's business
            return None
    # Passed through to the forward convolution and the products; it must be hashable
    # (None, a string, a lax.Precision or a pair of them) to be a static argument.
    prec = tuple(precision) if isinstance(precision, list) else precision
    try:
        hash(prec)
    except TypeError:
        return None
    return Geometry(strides, pads, prec)  # type: ignore[arg-type]


def xla_forward(x: jax.Array, w: jax.Array, geo: Geometry) -> jax.Array:
    """XLA's own convolution of this geometry."""
    return lax.conv_general_dilated(
        x, w, geo.strides, geo.padding, dimension_numbers=NHWC, precision=geo.precision
    )


def out_size(size: int, k: int, stride: int, pads: tuple[int, int]) -> int:
    """Output pixels along one side."""
    return (size + pads[0] + pads[1] - k) // stride + 1


def live_taps(x_shape: Sequence[int], w_shape: Sequence[int], geo: Geometry) -> list:
    """The kernel taps ``(i, j)`` that read at least one real (unpadded) pixel.

    The others only ever multiply padding zeros, so dropping them changes nothing; when
    the kernel is larger than the image most taps are such (3x3 over 1x1: 8 of 9).
    """
    (sh, sw), (ph, pw) = geo.strides, geo.padding
    ho = out_size(x_shape[1], w_shape[0], sh, ph)
    wo = out_size(x_shape[2], w_shape[1], sw, pw)

    def live(k: int, stride: int, n_out: int, lo: int, size: int) -> list[int]:
        return [i for i in range(k)
                if any(0 <= i + stride * o - lo < size for o in range(n_out))]

    rows = live(w_shape[0], sh, ho, ph[0], x_shape[1])
    cols = live(w_shape[1], sw, wo, pw[0], x_shape[2])
    return [(i, j) for i in rows for j in cols]


def tap_slices(x: jax.Array, w_shape: Sequence[int], geo: Geometry,
                taps: Sequence[tuple[int, int]]) -> list[jax.Array]:
    """For each tap, the (B, Ho, Wo, Cin) input pixels it multiplies (strided slices)."""
    kh, kw, ci, _ = w_shape
    (sh, sw), ((pt, _), (pl, _)) = geo.strides, geo.padding
    ho = out_size(x.shape[1], kh, sh, geo.padding[0])
    wo = out_size(x.shape[2], kw, sw, geo.padding[1])
    # Pad (or crop: a strided window may never reach the last rows) to exactly the rows
    # and columns the windows read, so every tap is one in-bounds strided slice.
    need_h, need_w = (ho - 1) * sh + kh, (wo - 1) * sw + kw
    xp = lax.pad(
        x, jnp.zeros((), x.dtype),
        ((0, 0, 0), (pt, need_h - x.shape[1] - pt, 0), (pl, need_w - x.shape[2] - pl, 0),
         (0, 0, 0)),
    )
    return [
        lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + (ho - 1) * sh + 1,
                                     j + (wo - 1) * sw + 1, ci), (1, sh, sw, 1))
        for i, j in taps
    ]


def forward_im2col(x: jax.Array, w: jax.Array, geo: Geometry) -> jax.Array:
    """The convolution as one matrix product over (live taps x Cin).

    A 1x1 kernel (or any kernel of which one tap is live) is a single product of the
    (strided) input with ``w[i, j]`` over channels, with no copy at stride 1. Otherwise
    the live taps' slices are concatenated along channels (im2col) and multiplied by the
    matching rows of the kernel. Accumulates in float32 for bfloat16 inputs.
    """
    taps = live_taps(x.shape, w.shape, geo)
    cols = tap_slices(x, w.shape, geo, taps)
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    lhs = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=3)
    rhs = jnp.concatenate([w[i, j] for i, j in taps], axis=0) if len(taps) > 1 else \
        w[taps[0][0], taps[0][1]]
    out = lax.dot_general(lhs, rhs, (((3,), (0,)), ((), ())), precision=geo.precision,
                          preferred_element_type=acc_dtype)
    return out.astype(x.dtype)


def forward_shifted(x: jax.Array, w: jax.Array, geo: Geometry) -> jax.Array:
    """The convolution as a sum of one product per live tap (no im2col copy)."""
    taps = live_taps(x.shape, w.shape, geo)
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    out = None
    for (i, j), xs in zip(taps, tap_slices(x, w.shape, geo, taps), strict=True):
        y = lax.dot_general(xs, w[i, j], (((3,), (0,)), ((), ())), precision=geo.precision,
                            preferred_element_type=acc_dtype)
        out = y if out is None else out + y
    return out.astype(x.dtype)


FORWARD_PATHS: dict[str, Callable[[jax.Array, jax.Array, Geometry], jax.Array]] = {
    "xla": xla_forward, "im2col": forward_im2col, "shifted": forward_shifted,
}


def forward_path(x_shape: Sequence[int], w_shape: Sequence[int], geo: Geometry,
                  dtype: Any = None) -> str:
    """Which formulation computes this forward convolution (a key of ``FORWARD_PATHS``).

    Measured per shape, forward alone, paired rounds in one run
    (``benchmarks/conv_sweep.py --forward-paths``, on a machine shared with other work, so
    only large or repeated ratios count; table in ``benchmarks/README.md``, 7b):

    * kernel larger than the image (3x3 over 2x2 or 1x1, 3x3/2 over 2x2): XLA:CPU's
      convolution is pathological, im2col + one product is 70-430x faster with 256-512
      channels (3x3 over 2x2, 512 -> 512, batch 32: 2492 -> 33 ms; 3x3/2 over 2x2:
      588 -> 1.4 ms), 3-9x with 64-128 channels;
    * one live tap (every 1x1 kernel, any stride): one product over channels, at stride 1
      0.2-1.0x XLA's time (median 0.5 over ResNet-50's 224x224 1x1s, 0.43-0.91 at 64x64
      but one 1.17), up to 3-4x faster where XLA's output is 1x1; at stride 2 (a strided
      copy first) 0.75-1.12x, kept for its input gradient (the transposed product, not
      XLA's dilated transpose: 1.8-5.8x faster);
    * everything else stays XLA's: 3x3 from a 3x3 image up, strided 3x3, the 7x7/2 and
      CIFAR stems. There im2col and shifted products were 1.5-4x slower at 8x8 and up
      (3x3 over 56x56, 64 channels: 89 vs 192 ms) and within +-30% of XLA, one way or the
      other from run to run, at 3x3-7x7 images;
    * bfloat16 differs: XLA:CPU's bfloat16 convolution is slow on small images, and one
      product per tap beats it (and im2col) consistently there: 3x3 with outputs of at
      most 8x8 pixels (stride 1 or 2, >= 16 input channels) take 0.27-0.82x XLA's time
      over ResNet-18/50 at 32x32 and 64x64, both stems; kernel larger than the image
      0.5x im2col's. At 16x16 outputs and up it is mixed (0.49-1.5x): left to XLA.
    """
    kh, kw, ci = w_shape[:3]
    low_precision = dtype is not None and jnp.dtype(dtype) == jnp.bfloat16
    if kh > x_shape[1] or kw > x_shape[2]:
        return "shifted" if low_precision else "im2col"
    if len(live_taps(x_shape, w_shape, geo)) == 1:
        return "im2col"
    if low_precision and ci >= 16:
        ho = out_size(x_shape[1], kh, geo.strides[0], geo.padding[0])
        wo = out_size(x_shape[2], kw, geo.strides[1], geo.padding[1])
        if ho * wo <= 64:
            return "shifted"
    return "xla"


def forward(x: jax.Array, w: jax.Array, geo: Geometry) -> jax.Array:
    """The forward convolution, by the formulation :func:`forward_path` picks."""
    return FORWARD_PATHS[forward_path(x.shape, w.shape, geo, x.dtype)](x, w, geo)
