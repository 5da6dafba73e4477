"""A drop-in ``conv_general_dilated`` whose forward and backward passes run well on XLA:CPU.

``jax.lax.conv_general_dilated``'s autodiff computes the kernel gradient as one more
convolution, with the batch as the contraction axis and the output gradient as a huge
"kernel". XLA:CPU runs that form at a fraction of its matrix-product speed, and on a CPU
the kernel gradient is the slowest third of a convolution's training cost.

:func:`conv_general_dilated` has the same signature and forward result. The forward
pass is routed shape by shape (``_forward_path``) to XLA's convolution or to one matrix
product over channels and the live kernel taps (``_forward_im2col``: a 1x1 kernel needs
no copy; otherwise the taps' strided slices are concatenated, im2col). XLA:CPU's
convolution is pathologically slow when the kernel is larger than the image (3x3 over a
2x2 image, 512 -> 512 channels: 70-130x slower than im2col + dot), which happens in the
last stages of every ResNet fed 32x32 or 64x64 images. In bfloat16 one product per
live tap (``_forward_shifted``) also replaces XLA's convolution on small images, where
XLA:CPU's bfloat16 convolution is slow. A ``jax.custom_vjp`` whose backward pass computes

* the kernel gradient, where that measured faster (1x1 kernels, and 3x3 with many
  channels or large images: see ``_shifted_products_pay``), as ``kh * kw`` matrix
  products per chunk of images,
  ``dW[i, j] = sum_{b,h,w} x_pad[b, h*s + i, w*s + j, :]^T  g[b, h, w, :]``, looped over
  chunks of images of about ``_CHUNK_BYTES`` per tap, so each chunk's shifted copies of
  the input stay in cache (1.2-2.5x faster than one product over the whole batch,
  whose copies are each the size of the input);
* the input gradient at stride 1 as the forward convolution of the output gradient with
  the flipped kernel, routed like any forward; at stride 2 on larger images as ``s * s``
  stride-1 convolutions with the kernel's stride phases (sub-pixel form), which do only
  the useful products where XLA's rule convolves a zero-dilated copy of the output
  gradient (``_input_grad_by_phases``; 1.5-2.2x on ResNet-18's 3x3/2 layers); otherwise
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
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "CONV_IMPLS", "auto_conv_general_dilated", "conv_general_dilated", "default_conv_for_backend",
    "resolve_conv_impl",
]

ConvFn = Callable[..., jax.Array]

# Bytes of one tap's input rows plus the output-gradient rows per chunk of the
# kernel-gradient loop. Measured with benchmarks/conv_grad.py --explore (benchmarks/README.md, 7):
# about 1 MiB keeps a chunk's tap copies and gradient rows in L2 and gives 1.2-2.5x
# over one product across the whole batch (whose tap copies are each the size of the
# input); much smaller chunks pay the loop's overhead, larger ones drift back towards
# the whole-batch speed.
_CHUNK_BYTES = 1 << 20
# ...but at least this many rows, so that the per-chunk update of a large kernel
# gradient (512x512x3x3 float32 is 9 MiB) stays small next to the chunk's products.
_MIN_CHUNK_ROWS = 512

# What nnx.Conv passes for a 4-D input: lhs (0, 3, 1, 2) = NHWC, rhs (3, 2, 0, 1) = HWIO.
_NHWC_SPEC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
_NHWC = ("NHWC", "HWIO", "NHWC")


class _Geometry(NamedTuple):
    """The static part of a supported convolution (hashable: a custom_vjp nondiff arg)."""

    strides: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    precision: Any  # as lax accepts it: None, str, lax.Precision or a pair of them


def _is_ones(v: Sequence[int] | None) -> bool:
    return v is None or all(int(d) == 1 for d in v)


def _geometry(
    lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]], lhs_dilation: Sequence[int] | None,
    rhs_dilation: Sequence[int] | None, dimension_numbers: Any, feature_group_count: int,
    batch_group_count: int, precision: Any, preferred_element_type: Any, out_sharding: Any,
) -> _Geometry | None:
    """The custom path's parameters, or None when the call must go to XLA's convolution."""
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
    if dn != _NHWC_SPEC:
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
    return _Geometry(strides, pads, prec)  # type: ignore[arg-type]


def _xla_forward(x: jax.Array, w: jax.Array, geo: _Geometry) -> jax.Array:
    return lax.conv_general_dilated(
        x, w, geo.strides, geo.padding, dimension_numbers=_NHWC, precision=geo.precision
    )


def _out_size(size: int, k: int, stride: int, pads: tuple[int, int]) -> int:
    return (size + pads[0] + pads[1] - k) // stride + 1


def _live_taps(x_shape: Sequence[int], w_shape: Sequence[int], geo: _Geometry) -> list:
    """The kernel taps ``(i, j)`` that read at least one real (unpadded) pixel.

    The others only ever multiply padding zeros, so dropping them changes nothing; when
    the kernel is larger than the image most taps are such (3x3 over 1x1: 8 of 9).
    """
    (sh, sw), (ph, pw) = geo.strides, geo.padding
    ho = _out_size(x_shape[1], w_shape[0], sh, ph)
    wo = _out_size(x_shape[2], w_shape[1], sw, pw)

    def live(k: int, stride: int, n_out: int, lo: int, size: int) -> list[int]:
        return [i for i in range(k)
                if any(0 <= i + stride * o - lo < size for o in range(n_out))]

    rows = live(w_shape[0], sh, ho, ph[0], x_shape[1])
    cols = live(w_shape[1], sw, wo, pw[0], x_shape[2])
    return [(i, j) for i in rows for j in cols]


def _tap_slices(x: jax.Array, w_shape: Sequence[int], geo: _Geometry,
                taps: Sequence[tuple[int, int]]) -> list[jax.Array]:
    """For each tap, the (B, Ho, Wo, Cin) input pixels it multiplies (strided slices)."""
    kh, kw, ci, _ = w_shape
    (sh, sw), ((pt, _), (pl, _)) = geo.strides, geo.padding
    ho = _out_size(x.shape[1], kh, sh, geo.padding[0])
    wo = _out_size(x.shape[2], kw, sw, geo.padding[1])
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


def _forward_im2col(x: jax.Array, w: jax.Array, geo: _Geometry) -> jax.Array:
    """The convolution as one matrix product over (live taps x Cin).

    A 1x1 kernel (or any kernel of which one tap is live) is a single product of the
    (strided) input with ``w[i, j]`` over channels, with no copy at stride 1. Otherwise
    the live taps' slices are concatenated along channels (im2col) and multiplied by the
    matching rows of the kernel. Accumulates in float32 for bfloat16 inputs.
    """
    taps = _live_taps(x.shape, w.shape, geo)
    cols = _tap_slices(x, w.shape, geo, taps)
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    lhs = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=3)
    rhs = jnp.concatenate([w[i, j] for i, j in taps], axis=0) if len(taps) > 1 else \
        w[taps[0][0], taps[0][1]]
    out = lax.dot_general(lhs, rhs, (((3,), (0,)), ((), ())), precision=geo.precision,
                          preferred_element_type=acc_dtype)
    return out.astype(x.dtype)


def _forward_shifted(x: jax.Array, w: jax.Array, geo: _Geometry) -> jax.Array:
    """The convolution as a sum of one product per live tap (no im2col copy)."""
    taps = _live_taps(x.shape, w.shape, geo)
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    out = None
    for (i, j), xs in zip(taps, _tap_slices(x, w.shape, geo, taps), strict=True):
        y = lax.dot_general(xs, w[i, j], (((3,), (0,)), ((), ())), precision=geo.precision,
                            preferred_element_type=acc_dtype)
        out = y if out is None else out + y
    return out.astype(x.dtype)


FORWARD_PATHS: dict[str, Callable[[jax.Array, jax.Array, _Geometry], jax.Array]] = {
    "xla": _xla_forward, "im2col": _forward_im2col, "shifted": _forward_shifted,
}


def _forward_path(x_shape: Sequence[int], w_shape: Sequence[int], geo: _Geometry,
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
    if len(_live_taps(x_shape, w_shape, geo)) == 1:
        return "im2col"
    if low_precision and ci >= 16:
        ho = _out_size(x_shape[1], kh, geo.strides[0], geo.padding[0])
        wo = _out_size(x_shape[2], kw, geo.strides[1], geo.padding[1])
        if ho * wo <= 64:
            return "shifted"
    return "xla"


def _forward(x: jax.Array, w: jax.Array, geo: _Geometry) -> jax.Array:
    return FORWARD_PATHS[_forward_path(x.shape, w.shape, geo, x.dtype)](x, w, geo)


def _kernel_grad(x: jax.Array, g: jax.Array, w_shape: Sequence[int], geo: _Geometry) -> jax.Array:
    """``dL/dW`` (float32, or float64 for float64 inputs) as chunked shifted products."""
    kh, kw, ci, co = w_shape
    b, ho, wo, _ = g.shape
    (sh, sw), ((pt, _), (pl, _)) = geo.strides, geo.padding
    # Pad (or crop: a strided window may never reach the last rows) to exactly the rows and
    # columns the windows read, so every tap below is one in-bounds strided slice.
    need_h, need_w = (ho - 1) * sh + kh, (wo - 1) * sw + kw
    zero = jnp.zeros((), x.dtype)
    xp = lax.pad(
        x, zero,
        ((0, 0, 0), (pt, need_h - x.shape[1] - pt, 0), (pl, need_w - x.shape[2] - pl, 0),
         (0, 0, 0)),
    )
    # Accumulate in float32 even for bfloat16 inputs: the sums run over batch * pixels terms.
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)

    def chunk_grad(xc: jax.Array, gc: jax.Array) -> jax.Array:
        n = gc.shape[0] * ho * wo
        g2 = gc.reshape(n, co)
        taps = []
        for i in range(kh):
            for j in range(kw):
                xs = lax.slice(
                    xc, (0, i, j, 0),
                    (xc.shape[0], i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, ci),
                    (1, sh, sw, 1),
                )
                # 2-D (rows, Cin)^T @ (rows, Cout): XLA:CPU's fastest form of this product.
                taps.append(lax.dot_general(
                    xs.reshape(n, ci), g2, (((0,), (0,)), ((), ())),
                    precision=geo.precision, preferred_element_type=acc_dtype,
                ))
        return jnp.stack(taps)

    rows = max(_MIN_CHUNK_ROWS, _CHUNK_BYTES // ((ci + co) * jnp.dtype(x.dtype).itemsize))
    chunk = max(1, min(b, rows // (ho * wo)))
    if kh == kw == 1:
        chunk = b  # one tap, no shifted copies to keep in cache: one product is fastest
    steps, rest = divmod(b, chunk)
    acc = jnp.zeros((kh * kw, ci, co), acc_dtype)
    if steps == 1:
        acc = chunk_grad(xp[:chunk], g[:chunk])
    elif steps > 1:
        # A loop, not an unrolled sum, keeps compile time flat in the batch size.
        xs = xp[: steps * chunk].reshape(steps, chunk, *xp.shape[1:])
        gs = g[: steps * chunk].reshape(steps, chunk, ho, wo, co)
        acc, _ = lax.scan(lambda a, xg: (a + chunk_grad(*xg), None), acc, (xs, gs))
    if rest:
        acc = acc + chunk_grad(xp[steps * chunk:], g[steps * chunk:])
    return acc.reshape(kh, kw, ci, co)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x: jax.Array, w: jax.Array, geo: _Geometry) -> jax.Array:
    return _forward(x, w, geo)


def _conv_fwd(x: jax.Array, w: jax.Array, geo: _Geometry) -> tuple[jax.Array, tuple]:
    return _forward(x, w, geo), (x, w)


def _shifted_products_pay(x_shape: Sequence[int], w_shape: Sequence[int],
                          g_shape: Sequence[int], geo: _Geometry) -> bool:
    """Whether the chunked shifted products beat XLA's kernel gradient for this shape.

    Measured float32, batch 32-128 (``benchmarks/conv_grad.py``; ``benchmarks/README.md``, 7):
    1x1 kernels 1.5-5x (one product, no taps); stride 2 with >= 64 channels 1.05-1.8x
    (XLA's strided kernel gradient is slow); stride 1 only with >= 128 channels at 8x8 and
    up (1.2-3.3x) or >= 64 channels at 32x32 and up (1.5-1.8x). Below that, with few
    channels or tiny images, XLA's convolution form runs in cache and is up to 2x faster.
    """
    kh, kw, ci, co = w_shape
    pixels = g_shape[1] * g_shape[2]
    channels = min(ci, co)
    if kh == kw == 1:
        return True
    if channels < 64:
        return False
    if max(geo.strides) > 1:
        return True
    return (channels >= 128 and pixels >= 64) or pixels >= 1024


def _input_grad_by_phases(g: jax.Array, w: jax.Array, x_shape: Sequence[int],
                          geo: _Geometry) -> jax.Array:
    """``dL/dx`` of a strided convolution as ``sh * sw`` stride-1 convolutions, no zeros.

    XLA's transpose convolves a copy of ``g`` dilated with ``s - 1`` zeros between pixels,
    so 3/4 of its products at stride 2 are with zeros. Input row ``y`` only meets taps
    ``i = (y + pad) mod s + s*m``: for each phase ``r`` of ``y + pad`` the taps ``w[r::s]``
    form a small stride-1 kernel over ``g``, and the phases interleave into ``dx``.
    """
    (sh, sw), ((pt, _), (pl, _)) = geo.strides, geo.padding
    b, h, wd, ci = x_shape
    _, ho, wo, co = g.shape
    # Phase outputs cover padded rows [0, qh * sh), enough for rows pt .. pt + h - 1.
    qh, qw = -(-(h + pt) // sh), -(-(wd + pl) // sw)
    g = g[:, :qh, :qw]  # rows past qh never reach a kept input row
    rows = []
    for rh in range(sh):
        phases = []
        for rw in range(sw):
            sub = w[rh::sh, rw::sw]
            if sub.shape[0] == 0 or sub.shape[1] == 0:  # no tap lands on this phase
                phases.append(jnp.zeros((b, qh, qw, ci), g.dtype))
                continue
            kh_r, kw_r = sub.shape[:2]
            # Correlation with the flipped sub-kernel, Cin and Cout swapped (a transpose).
            sub = jnp.swapaxes(sub[::-1, ::-1], 2, 3)
            phases.append(lax.conv_general_dilated(
                g, sub, (1, 1), ((kh_r - 1, qh - g.shape[1]), (kw_r - 1, qw - g.shape[2])),
                dimension_numbers=_NHWC, precision=geo.precision,
            ))
        rows.append(jnp.stack(phases, axis=3))  # (b, qh, qw, sw, ci)
    out = jnp.stack(rows, axis=2)  # (b, qh, sh, qw, sw, ci)
    out = out.reshape(b, qh * sh, qw * sw, ci)
    return out[:, pt:pt + h, pl:pl + wd]


def _phases_pay(w_shape: Sequence[int], g_shape: Sequence[int], geo: _Geometry) -> bool:
    """Whether the stride-phase input gradient beats XLA's transpose for this shape.

    Measured (ResNet-18, batch 128, float32): 3x3/2 to 16x16 outputs 110 -> 50 ms, to 8x8
    53 -> 36 ms, but to 4x4 31 -> 45 ms; 1x1/2 is slower (a single phase, plus zeros).
    With few input channels (the 7x7/2 stem, 3 -> 64, whose phase convolutions produce
    3 channels) it is slower too: 326 -> 604 ms at 64x64, batch 32
    (``benchmarks/conv_sweep.py --quick``); a model never needs that gradient anyway.
    """
    kh, kw, ci = w_shape[:3]
    return (max(geo.strides) > 1 and kh * kw > 1 and ci >= 16
            and g_shape[1] * g_shape[2] >= 64)


def _flip_transpose(w: jax.Array) -> jax.Array:
    """The kernel of the transposed convolution: flipped in space, Cin and Cout swapped."""
    return jnp.swapaxes(w[::-1, ::-1], 2, 3)


def _stride1_input_grad_geometry(w_shape: Sequence[int], geo: _Geometry) -> _Geometry | None:
    """The geometry of ``dx = conv(g, flipped w)`` for a stride-1 convolution, or None.

    With padding ``(lo, hi)`` the transpose pads ``g`` by ``(k - 1 - lo, k - 1 - hi)``;
    padding wider than the kernel would make that negative: left to XLA's transpose.
    """
    if geo.strides != (1, 1):
        return None
    pads = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(w_shape[:2], geo.padding,
                                                                     strict=True))
    if min(min(p) for p in pads) < 0:
        return None
    return _Geometry((1, 1), pads, geo.precision)  # type: ignore[arg-type]


def _dilated_transpose_is_slow(w_shape: Sequence[int], g_shape: Sequence[int],
                               geo: _Geometry) -> bool:
    """Whether XLA's transpose of a strided convolution hits the kernel-not-smaller-than-
    the-image case: it convolves ``g`` dilated to ``(ho - 1) * s + 1`` rows. 3x3/2 from
    4x4 to 2x2, 512 channels, batch 32: 4.4 s, against 35 ms as im2col's transpose."""
    (kh, kw), (sh, sw) = w_shape[:2], geo.strides
    return max(sh, sw) > 1 and kh * kw > 1 and (
        kh >= (g_shape[1] - 1) * sh + 1 or kw >= (g_shape[2] - 1) * sw + 1)


def _conv_bwd(geo: _Geometry, res: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    if _phases_pay(w.shape, g.shape, geo):
        dx = _input_grad_by_phases(g, w, x.shape, geo)
    elif (dx_geo := _stride1_input_grad_geometry(w.shape, geo)) is not None:
        # At stride 1 the input gradient is a forward convolution of g with the flipped,
        # transposed kernel (what XLA's transpose rule emits): route it like a forward.
        dx = _forward(g, _flip_transpose(w), dx_geo)
    else:
        # The transpose of the forward's own formulation: XLA's transpose of its
        # convolution, or for im2col a product with the kernel's transpose scattered back
        # by padding (XLA's transpose rule is as slow as its forward where the forward
        # was routed away from it: 3x3/2 to 2x2 outputs, 512 channels, 4.4 s vs 0.1 s).
        path = _forward_path(x.shape, w.shape, geo, x.dtype)
        if path == "xla" and _dilated_transpose_is_slow(w.shape, g.shape, geo):
            path = "im2col"
        fwd = FORWARD_PATHS[path]
        (dx,) = jax.linear_transpose(
            lambda xx: fwd(xx, w, geo), jax.ShapeDtypeStruct(x.shape, x.dtype)
        )(g)
    if _shifted_products_pay(x.shape, w.shape, g.shape, geo):
        dw = _kernel_grad(x, g, w.shape, geo).astype(w.dtype)
    else:
        (dw,) = jax.linear_transpose(
            lambda ww: _xla_forward(x, ww, geo), jax.ShapeDtypeStruct(w.shape, w.dtype)
        )(g)
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


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
    geo = _geometry(
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
