"""The forward formulations of :mod:`nnx_trainer.conv` and the router that picks one per shape.

A supported call is described by its :class:`Geometry` (strides, explicit padding,
precision). Its forward pass is computed by one of :data:`FORWARD_PATHS`: XLA's
convolution, one matrix product over channels and the live kernel taps (im2col), one
product per live tap (shifted), one product per kernel row over chunks of images
(rows), or one product per region of the output over the taps that read real pixels
there (regions); :func:`forward_path` chooses by shape and dtype, from measurements.
Internal to :mod:`nnx_trainer.conv`; the names are public for its gradient module, its
tests and its benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nnx_trainer.conv_chunks import images_per_chunk, map_batch_chunks

__all__ = [
    "FORWARD_PATHS", "NHWC", "ROW_CHANNELS", "ROW_CHUNK_PIXELS", "Geometry", "forward",
    "forward_im2col", "forward_path", "forward_regions", "forward_rows", "forward_shifted",
    "geometry_of", "kernel_exceeds_image", "kernel_rows", "live_runs", "live_taps",
    "out_size", "regions_pay", "row_products_pay", "tap_slices", "xla_forward",
]

# What nnx.Conv passes for a 4-D input: lhs (0, 3, 1, 2) = NHWC, rhs (3, 2, 0, 1) = HWIO.
NHWC_SPEC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
NHWC = ("NHWC", "HWIO", "NHWC")

# Output pixels per chunk of images in forward_rows (at least one image). Measured with
# 3x3, 64 -> 64 channels at 32x32, batch 128 (scratch runs, benchmarks/README.md 7b):
# 1024 pixels 93 ms, 2048 71, 4096 68, 8192 71, the whole batch at once 206 (XLA 137).
# A chunk's row copies (3 x 64 channels x 4096 pixels, 3 MiB) stay in cache.
ROW_CHUNK_PIXELS = 4096
# Input channels for which a float32 forward by kernel rows beats XLA's convolution
# (row_products_pay; the kernel gradient by rows follows it, conv_gradients.gradient_paths).
ROW_CHANNELS = range(48, 65)


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


def kernel_exceeds_image(x_shape: Sequence[int], w_shape: Sequence[int]) -> bool:
    """Whether the kernel is taller or wider than the (unpadded) image: XLA:CPU's
    convolution is pathological there, and no tap reads real pixels at every output."""
    return w_shape[0] > x_shape[1] or w_shape[1] > x_shape[2]


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


def padded_to_windows(x: jax.Array, w_shape: Sequence[int], geo: Geometry) -> jax.Array:
    """``x`` padded (or cropped: a strided window may never reach the last rows) to exactly
    the rows and columns the windows read, so each tap is one in-bounds strided slice."""
    kh, kw = w_shape[:2]
    (sh, sw), ((pt, _), (pl, _)) = geo.strides, geo.padding
    ho = out_size(x.shape[1], kh, sh, geo.padding[0])
    wo = out_size(x.shape[2], kw, sw, geo.padding[1])
    need_h, need_w = (ho - 1) * sh + kh, (wo - 1) * sw + kw
    return lax.pad(
        x, jnp.zeros((), x.dtype),
        ((0, 0, 0), (pt, need_h - x.shape[1] - pt, 0), (pl, need_w - x.shape[2] - pl, 0),
         (0, 0, 0)),
    )


def tap_slices(x: jax.Array, w_shape: Sequence[int], geo: Geometry,
                taps: Sequence[tuple[int, int]]) -> list[jax.Array]:
    """For each tap, the (B, Ho, Wo, Cin) input pixels it multiplies (strided slices)."""
    kh, kw, ci, _ = w_shape
    sh, sw = geo.strides
    ho = out_size(x.shape[1], kh, sh, geo.padding[0])
    wo = out_size(x.shape[2], kw, sw, geo.padding[1])
    xp = padded_to_windows(x, w_shape, geo)
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


def kernel_rows(xp: jax.Array, w_shape: Sequence[int], geo: Geometry,
                ho: int, wo: int) -> list[jax.Array]:
    """For each kernel row ``i``, the (B, Ho, Wo, kw * Cin) pixels it multiplies: the row's
    ``kw`` horizontal taps side by side along channels (``xp`` from :func:`padded_to_windows`)."""
    kh, kw, ci = w_shape[:3]
    sh, sw = geo.strides
    b, hp = xp.shape[:2]
    cols = [lax.slice(xp, (0, 0, j, 0), (b, hp, j + (wo - 1) * sw + 1, ci), (1, 1, sw, 1))
            for j in range(kw)]
    wide = cols[0] if kw == 1 else jnp.concatenate(cols, axis=3)
    return [lax.slice(wide, (0, i, 0, 0), (b, i + (ho - 1) * sh + 1, wo, kw * ci), (1, sh, 1, 1))
            for i in range(kh)]


def forward_rows(x: jax.Array, w: jax.Array, geo: Geometry) -> jax.Array:
    """The convolution as one product per kernel row over its taps (``kw * Cin``), looped
    over chunks of about :data:`ROW_CHUNK_PIXELS` output pixels.

    Between im2col (one product, a copy ``kh * kw`` times the input) and shifted products
    (``kh * kw`` thin products): ``kh`` products of ``kw * Cin`` depth, on a chunk's copy
    that stays in cache. XLA:CPU's own convolution runs at half its product speed with 64
    channels; this takes 0.5-0.8x its time there (:func:`row_products_pay`). Accumulates
    in float32 for bfloat16 inputs.
    """
    kh, kw, ci, co = w.shape
    b = x.shape[0]
    ho = out_size(x.shape[1], kh, geo.strides[0], geo.padding[0])
    wo = out_size(x.shape[2], kw, geo.strides[1], geo.padding[1])
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    rhs = [w[i].reshape(kw * ci, co) for i in range(kh)]

    def chunk(xc: jax.Array) -> jax.Array:
        # Padded per chunk: a padded copy of the whole batch first measured 1.2-2x slower.
        xp = padded_to_windows(xc, w.shape, geo)
        out = None
        for lhs, r in zip(kernel_rows(xp, w.shape, geo, ho, wo), rhs, strict=True):
            y = lax.dot_general(lhs, r, (((3,), (0,)), ((), ())), precision=geo.precision,
                                preferred_element_type=acc_dtype)
            out = y if out is None else out + y
        return out.astype(x.dtype)

    per = images_per_chunk(b, ROW_CHUNK_PIXELS // (ho * wo))
    return map_batch_chunks(chunk, x, per)


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


Run = tuple[int, int, tuple[int, ...]]


def live_runs(k: int, stride: int, n_out: int, lo: int, size: int) -> list[Run]:
    """Along one side, the output positions ``[o0, o1)`` grouped in maximal runs whose
    windows read real (unpadded) pixels through the same kernel taps: ``(o0, o1, taps)``."""
    runs: list[Run] = []
    for o in range(n_out):
        taps = tuple(i for i in range(k) if 0 <= i + stride * o - lo < size)
        if runs and runs[-1][2] == taps:
            runs[-1] = (runs[-1][0], o + 1, taps)
        else:
            runs.append((o, o + 1, taps))
    return runs


def forward_regions(x: jax.Array, w: jax.Array, geo: Geometry) -> jax.Array:
    """The convolution as one matrix product per region of the output, each over only the
    taps its windows read real pixels through: im2col without the padding's zeros.

    With 3x3 over 4x4 and padding 1, a third of im2col's products multiply zeros; over
    2x2 more than half (each output reads 4 of the 9 taps im2col keeps). Regions are the
    runs of :func:`live_runs` crossed (3 x 3 of them for a 3x3 kernel with padding 1).
    Each region's windows are read with one gather from ``x`` (never padded): as one slice
    per tap and a concatenation, XLA:CPU copied every slice twice and compiled one kernel
    per slice (3x3 over 4x4, 512 channels, batch 128: 41 ms and 1.0 s to compile, against
    39 ms and 0.2 s). Accumulates in float32 for bfloat16 inputs.
    """
    kh, kw, ci, co = w.shape
    (sh, sw), (ph, pw) = geo.strides, geo.padding
    b, h, wd = x.shape[:3]
    row_runs = live_runs(kh, sh, out_size(h, kh, sh, ph), ph[0], h)
    col_runs = live_runs(kw, sw, out_size(wd, kw, sw, pw), pw[0], wd)
    pixels = x.reshape(b, h * wd, ci)
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)

    def region(r0: int, r1: int, rows: tuple, c0: int, c1: int, cols: tuple) -> jax.Array:
        if not rows or not cols:  # padding wider than the kernel: windows of zeros only
            return jnp.zeros((b, r1 - r0, c1 - c0, co), acc_dtype)
        # The pixel each (output row, output column, tap row, tap column) reads, in the
        # order of the kernel's taps, so the kernel's rows are one slice of ``w``.
        index = np.array([(i + sh * y - ph[0]) * wd + j + sw * xo - pw[0]
                          for y in range(r0, r1) for xo in range(c0, c1)
                          for i in rows for j in cols], np.int32)
        lhs = jnp.take(pixels, index, axis=1, mode="clip").reshape(
            b, r1 - r0, c1 - c0, len(rows) * len(cols) * ci)
        rhs = w[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].reshape(-1, co)
        return lax.dot_general(lhs, rhs, (((3,), (0,)), ((), ())), precision=geo.precision,
                               preferred_element_type=acc_dtype)

    bands = []
    for r0, r1, rows in row_runs:
        blocks = [region(r0, r1, rows, c0, c1, cols) for c0, c1, cols in col_runs]
        bands.append(blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=2))
    out = bands[0] if len(bands) == 1 else jnp.concatenate(bands, axis=1)
    return out.astype(x.dtype)


FORWARD_PATHS: dict[str, Callable[[jax.Array, jax.Array, Geometry], jax.Array]] = {
    "xla": xla_forward, "im2col": forward_im2col, "shifted": forward_shifted,
    "rows": forward_rows, "regions": forward_regions,
}


def forward_path(x_shape: Sequence[int], w_shape: Sequence[int], geo: Geometry,
                  dtype: Any = None) -> str:
    """Which formulation computes this forward convolution (a key of ``FORWARD_PATHS``).

    Measured per shape, forward alone, paired rounds in one run
    (``benchmarks/conv_sweep.py --forward-paths``, on a machine shared with other work, so
    only large or repeated ratios count; table in ``benchmarks/README.md``, 7b):

    * kernel larger than the image (3x3 over 2x2, 3x3/2 over 2x2): XLA:CPU's
      convolution is pathological, im2col + one product is 70-430x faster with 256-512
      channels (3x3 over 2x2, 512 -> 512, batch 32: 2492 -> 33 ms; 3x3/2 over 2x2:
      588 -> 1.4 ms), 3-9x with 64-128 channels; one product per region of the output
      (:func:`forward_regions`, no products with the padding) more than halves im2col's
      time again (262.2 / 5.6 / 2.3 ms XLA / im2col / regions, 3x3 over 2x2, 512
      channels, batch 32; bfloat16 1.6 against 2.4 by shifted products);
    * outputs of at most 7x7 with 256 channels or more, over at least 2048 rows a batch
      (ResNet-18 CIFAR's last stage at batch 128): by regions (:func:`regions_pay`),
      0.76-0.80x XLA's time, 0.45-0.54x the shifted products' in bfloat16;
    * one live tap (every 1x1 kernel, any stride): one product over channels, at stride 1
      0.2-1.0x XLA's time (median 0.5 over ResNet-50's 224x224 1x1s, 0.43-0.91 at 64x64
      but one 1.17), up to 3-4x faster where XLA's output is 1x1; at stride 2 (a strided
      copy first) 0.75-1.12x, kept for its input gradient (the transposed product, not
      XLA's dilated transpose: 1.8-5.8x faster);
    * 64 input channels, 8x8 to 64x64 outputs: one product per kernel row on chunks of
      images (:func:`forward_rows`, :func:`row_products_pay`), 0.50-0.80x XLA's time;
    * everything else stays XLA's: 3x3 from a 3x3 image up with other channel counts,
      the 7x7/2 and CIFAR stems. There im2col and shifted products were 1.5-4x slower at
      8x8 and up (copies of the whole batch, out of cache) and within +-30% of XLA, one
      way or the other from run to run, at 3x3-7x7 images;
    * bfloat16 differs: XLA:CPU's bfloat16 convolution is slow on small images, and one
      product per tap beats it (and im2col) consistently there: 3x3 with outputs of at
      most 8x8 pixels (stride 1 or 2, >= 16 input channels) take 0.27-0.82x XLA's time
      over ResNet-18/50 at 32x32 and 64x64, both stems, where regions do not take them
      (above). From 16x16 outputs, with 64 channels and more, by kernel rows
      (0.40-0.66x XLA's); with fewer channels XLA's.
    """
    kh, kw, ci = w_shape[:3]
    low_precision = dtype is not None and jnp.dtype(dtype) == jnp.bfloat16
    if len(live_taps(x_shape, w_shape, geo)) == 1:
        return "im2col"
    if kernel_exceeds_image(x_shape, w_shape):
        return "regions"
    ho = out_size(x_shape[1], kh, geo.strides[0], geo.padding[0])
    wo = out_size(x_shape[2], kw, geo.strides[1], geo.padding[1])
    if regions_pay(x_shape[0], ci, ho * wo):
        return "regions"
    if low_precision and ci >= 16 and ho * wo <= 64:
        return "shifted"
    if x_shape[1] * x_shape[2] <= 64 * 64 and row_products_pay(w_shape, ho * wo, dtype):
        return "rows"
    return "xla"


def regions_pay(batch: int, in_channels: int, out_pixels: int) -> bool:
    """Whether :func:`forward_regions` beats the other paths for a kernel of more than one
    live tap, no larger than the image, with ``out_pixels`` output pixels per image.

    Measured (benchmarks/README.md 7b, "Products without the padding"), forward alone
    (``benchmarks/conv_sweep.py --forward-paths``), ResNet-18 CIFAR at batch 128: 3x3 over
    4x4, 512 channels, 55.4 -> 44.2 ms (XLA's -> regions), 3x3/2 8x8 -> 4x4, 256 -> 512,
    30.4 -> 23.0; bfloat16 44.9 -> 24.1 and 31.0 -> 14.1 against the shifted products.
    Smaller batches gained less per shape (0.54-0.96x XLA's time, 7x7 to 2x2 outputs); whole
    steps with those shapes by regions did not gain in paired fits (ResNet-50 at 64x64,
    batch 32: 1.04x the time; at 224x224, batch 16: 1.03x); from 8x8 outputs the gathers
    cost more than the padding's products save (8x8, 256 channels, batch 128: 63 vs 59 ms).
    Hence at least 256 input channels, at most 7x7 outputs and 2048 rows (batch x output
    pixels), in float32 and bfloat16 alike.
    """
    return in_channels >= 256 and out_pixels <= 49 and batch * out_pixels >= 2048


def row_products_pay(w_shape: Sequence[int], out_pixels: int, dtype: Any = None) -> bool:
    """Whether :func:`forward_rows` beats XLA's convolution for a kernel of more than one
    tap over an image of at most 64x64 pixels, no smaller than the kernel, with
    ``out_pixels`` output pixels per image.

    Measured forward alone (``benchmarks/conv_sweep.py --forward-paths``, benchmarks/README.md
    7b): float32 with 64 input channels (stride 1 or 2), outputs of 8x8 to 64x64: 0.50-0.80x
    XLA's time (3x3, 64 -> 64 at 32x32, batch 128: 137 -> 68 ms); with 32 channels or 128
    and more XLA's was as fast or faster (so 48-64 channels are taken), and from 112x112
    images (one image's rows no longer fit in cache) 1.3-1.5x slower, hence the 64x64
    bound. bfloat16 from 64 channels: 0.40-0.66x XLA's (its bfloat16 convolution is slow)
    at 16x16 outputs and up.
    """
    ci = w_shape[2]
    if dtype is not None and jnp.dtype(dtype) == jnp.bfloat16:
        return ci >= 64
    return ci in ROW_CHANNELS and out_pixels >= 64


def forward(x: jax.Array, w: jax.Array, geo: Geometry) -> jax.Array:
    """The forward convolution, by the formulation :func:`forward_path` picks."""
    return FORWARD_PATHS[forward_path(x.shape, w.shape, geo, x.dtype)](x, w, geo)
