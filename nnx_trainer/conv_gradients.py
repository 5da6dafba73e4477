"""The backward pass of :mod:`nnx_trainer.conv`: kernel and input gradients, each in the
formulation measured fastest for its shape.

* the kernel gradient as XLA's transpose summed over a few chunks of images where
  :func:`xla_kernel_grad_chunk` finds it pays (:func:`kernel_grad_by_chunks`); else as
  ``kh * kw`` matrix products per chunk of images, or ``kh`` per kernel row with 64 input
  channels at stride 1 or for a stem (:func:`kernel_grad`, :func:`stem_rows_pay`), where
  :func:`shifted_products_pay`, each product in the order :func:`output_grad_first`
  picks; else XLA's transpose over the whole batch;
* the input gradient as stride-phase convolutions (:func:`input_grad_by_phases`) where
  :func:`phases_pay`; at stride 1 as a forward convolution of the output gradient with the
  flipped kernel, routed like any forward; otherwise as the transpose of the forward's own
  formulation, XLA's where that is regions or shifted products (:func:`gradient_paths`).
  Where the kernel gradient is products, the input gradient is handed on only once it is
  computed (:func:`computed_after`), or XLA:CPU would leave those products to the end of
  the backward pass.

Internal to :mod:`nnx_trainer.conv`; the names are public for its tests and benchmarks.
The forward router is looked up through its module (``conv_forward.forward_path``), so a
test that replaces it changes the backward pass's routing too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from nnx_trainer import conv_chunks, conv_forward
from nnx_trainer.conv_forward import NHWC, Geometry, xla_forward

__all__ = [
    "CHUNK_BYTES", "MAX_XLA_CHUNKS", "MIN_CHUNK_ROWS", "STEM_CHANNELS", "STEM_ROWS",
    "XLA_CHUNK_MAX_BYTES", "XLA_CHUNK_ROWS", "computed_after", "conv_bwd",
    "dilated_transpose_is_slow", "flip_transpose", "gradient_paths", "input_grad_by_phases",
    "kernel_grad", "kernel_grad_by_chunks", "output_grad_first", "phases_pay",
    "shifted_products_pay",
    "stem_rows_pay", "stride1_input_grad_geometry", "xla_kernel_grad_chunk",
]

# Bytes of one tap's input rows plus the output-gradient rows per chunk of the
# kernel-gradient loop. Measured with benchmarks/conv_grad.py --explore (benchmarks/README.md, 7):
# about 1 MiB keeps a chunk's tap copies and gradient rows in L2 and gives 1.2-2.5x
# over one product across the whole batch (whose tap copies are each the size of the
# input); much smaller chunks pay the loop's overhead, larger ones drift back towards
# the whole-batch speed.
CHUNK_BYTES = 1 << 20
# ...but at least this many rows, so that the per-chunk update of a large kernel
# gradient (512x512x3x3 float32 is 9 MiB) stays small next to the chunk's products.
MIN_CHUNK_ROWS = 512

# XLA's kernel gradient over chunks of about this many output pixels (batch x pixels),
# summed: XLA:CPU's transpose over a whole batch of 128 falls out of cache (3x3 256 -> 256
# at 8x8: 78-93 ms, eight chunks of 16 images 50 ms). Chunks of 1024 pixels measured best
# or tied from 4x4 to 32x32 outputs (benchmarks/README.md, 7b, "XLA's kernel gradient by
# chunks of images").
XLA_CHUNK_ROWS = 1024
# ...unrolled, at most this many: inside a loop body XLA:CPU runs this convolution another,
# far slower way (3x3 128 -> 128 at 16x16, batch 128: 3.4 s against 55 ms unrolled). Each
# chunk is one more convolution to compile: ResNet-18 (CIFAR, batch 128) 5.0 s against 3.1.
MAX_XLA_CHUNKS = 16
# ...and only while a chunk's input stays under this many bytes; above, the per-tap products
# won: 3x3/2 128 -> 128 over 224x224 at batch 32 (two images, 51 MiB) chunks 2.1 s, taps
# 1.1 s; over 112x112 (12.8 MiB) 281 against 236 ms. At 6.4 MiB the chunks still won:
# 3x3/2 64 -> 128 over 112x112, 159 against 246 ms; 3x3 256 -> 256 at 56x56, 1.53 s
# against 1.70 (README 7b).
XLA_CHUNK_MAX_BYTES = 8 << 20
# The kernel gradient of a stem (at most this many input channels: an image's) runs by
# kernel rows from this many output pixels (batch x pixels) on; XLA's transpose of the
# 7x7/2 3 -> 64 stem over 224x224 at batch 16 takes 115 ms, by rows 36 (README 7b).
STEM_CHANNELS = 4
STEM_ROWS = 48 * 1024


def kernel_grad(x: jax.Array, g: jax.Array, w_shape: Sequence[int], geo: Geometry,
                by_rows: bool = False) -> jax.Array:
    """``dL/dW`` (float32, or float64 for float64 inputs) as chunked matrix products.

    Per chunk of images, one product per kernel tap (``kh * kw`` products of ``Cin`` rows)
    or, ``by_rows``, one per kernel row over its taps side by side (``kh`` products of
    ``kw * Cin`` rows, :func:`conv_forward.kernel_rows`; faster with <= 64 channels).
    """
    kh, kw, ci, co = w_shape
    b, ho, wo, _ = g.shape
    # Accumulate in float32 even for bfloat16 inputs: the sums run over batch * pixels terms.
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)

    rows = max(MIN_CHUNK_ROWS, CHUNK_BYTES // ((ci + co) * jnp.dtype(x.dtype).itemsize))
    # One tap, no shifted copies to keep in cache: one product over the batch is fastest.
    per = b if kh == kw == 1 else conv_chunks.images_per_chunk(b, rows // (ho * wo))
    depth = kw * ci if by_rows else ci  # the K of each product
    g_first = output_grad_first(depth, co, per * ho * wo)

    def product(lhs: jax.Array, g2: jax.Array) -> jax.Array:
        # 2-D, contracting the rows: g^T @ x, (Cout, K), where g_first, else x^T @ g.
        lhs = lhs.reshape(g2.shape[0], -1)
        operands = (g2, lhs) if g_first else (lhs, g2)
        return lax.dot_general(*operands, (((0,), (0,)), ((), ())), precision=geo.precision,
                               preferred_element_type=acc_dtype)

    def chunk_grad(xc: jax.Array, gc: jax.Array) -> jax.Array:
        # Padded per chunk, in cache: a padded copy of the whole batch first was slower.
        g2 = gc.reshape(gc.shape[0] * ho * wo, co)
        if by_rows:
            xp = conv_forward.padded_to_windows(xc, w_shape, geo)
            row_slices = conv_forward.kernel_rows(xp, w_shape, geo, ho, wo)
            return jnp.stack([product(r, g2) for r in row_slices])  # kh products
        taps = [(i, j) for i in range(kh) for j in range(kw)]
        slices = conv_forward.tap_slices(xc, w_shape, geo, taps)
        return jnp.stack([product(xs, g2) for xs in slices])  # kh * kw products

    # Chunk i holds images i, i + steps, ... (conv_chunks.batch_chunks).
    acc = conv_chunks.sum_batch_chunks(chunk_grad, (x, g), per)
    if g_first:
        acc = jnp.swapaxes(acc, 1, 2)  # once, after the sum: (kh or taps, K, Cout)
    return acc.reshape(kh, kw, ci, co)


def output_grad_first(depth: int, cout: int, rows: int) -> bool:
    """Whether :func:`kernel_grad`'s products run as ``g^T @ x`` (a ``(Cout, K)`` result)
    rather than ``x^T @ g`` (``(K, Cout)``): the same product, faster on XLA:CPU when the
    result's rows are the fewer.

    Measured float32 (and bfloat16 on two models), each product's both orders in paired
    rounds (``benchmarks/README.md``, 7b, "The kernel gradient's product order"): with
    ``K > Cout`` 0.70-0.95x the time
    (3x3 64 -> 64 by kernel rows, K = 192: 0.72-0.80x at 32x32-112x112; 1x1 256 -> 64,
    512 -> 128, 1024 -> 256); with ``K <= Cout`` 1.0-2.0x (the stems' few input channels,
    1x1 64 -> 256, 3x3/2 512 -> 512), and below 512 rows per product (2x2 images at batch
    32) slower either way.
    """
    return depth > cout and rows >= MIN_CHUNK_ROWS


def xla_kernel_grad_chunk(x_shape: Sequence[int], w_shape: Sequence[int],
                          g_shape: Sequence[int], geo: Geometry, dtype: object) -> int | None:
    """Images per chunk where XLA's kernel gradient summed over chunks of the batch
    (:func:`kernel_grad_by_chunks`) beats both XLA's over the whole batch and the shifted
    products, else ``None``.

    Measured float32 (``benchmarks/README.md``, 7b): 3x3 with >= 128 channels, or >= 64 at
    stride 2, at batch 128: 0.3-0.9x XLA's whole-batch time and 0.7-0.95x the shifted
    products'; at batch 16-32 mostly ties, up to 0.78x (3x3 128 -> 128 at 32x32). One image
    per chunk lost (1.6-1.7x), so chunks hold at least two; chunks whose input exceeds
    :data:`XLA_CHUNK_MAX_BYTES` lost to the shifted products. bfloat16 was not measured
    and keeps its earlier paths.
    """
    kh, kw, ci, co = w_shape
    b, ho, wo, _ = g_shape
    if jnp.dtype(dtype) != jnp.float32 or kh * kw == 1:
        return None
    if min(ci, co) < (64 if max(geo.strides) > 1 else 128):
        return None
    wanted = max(2, -(-XLA_CHUNK_ROWS // (ho * wo)), -(-b // MAX_XLA_CHUNKS))
    per = conv_chunks.images_per_chunk(b, wanted)
    chunk_bytes = per * math.prod(x_shape[1:]) * jnp.dtype(dtype).itemsize
    return per if b // per >= 2 and chunk_bytes < XLA_CHUNK_MAX_BYTES else None


def stem_rows_pay(w_shape: Sequence[int], g_shape: Sequence[int], dtype: object) -> bool:
    """Whether a stem's kernel gradient (few input channels, >= 64 outputs) runs fastest
    by kernel rows (:func:`kernel_grad` ``by_rows``) rather than as XLA's transpose.

    Measured float32, fresh process (``benchmarks/README.md``, 7b, "The stem's kernel
    gradient"): 7x7/2 3 -> 64 from 50k output pixels 0.28-0.83x XLA's time (224x224 at
    batch 16: 36 against 115 ms), 3x3 3 -> 64 at 131k 0.41-0.44x; at 32k pixels 1.1-1.6x
    slower, and 3 -> 16 (the CIFAR ResNets) slower too. bfloat16 was not measured.
    """
    kh, kw, ci, co = w_shape
    rows = g_shape[0] * g_shape[1] * g_shape[2]
    return (jnp.dtype(dtype) == jnp.float32 and kh * kw > 1 and ci <= STEM_CHANNELS
            and co >= 64 and rows >= STEM_ROWS)


def kernel_grad_by_chunks(x: jax.Array, g: jax.Array, w_shape: Sequence[int], geo: Geometry,
                          per: int) -> jax.Array:
    """``dL/dW`` as XLA's transpose per chunk of ``per`` images (from
    :func:`xla_kernel_grad_chunk`), summed; chunks as :func:`conv_chunks.batch_chunks`
    groups them, so a batch sharded over devices stays so."""
    xs, gs = conv_chunks.batch_chunks(x, per), conv_chunks.batch_chunks(g, per)
    parts = [jax.linear_transpose(
        lambda ww, i=i: xla_forward(xs[:, i], ww, geo), jax.ShapeDtypeStruct(w_shape, x.dtype)
    )(gs[:, i])[0] for i in range(xs.shape[1])]  # unrolled: see MAX_XLA_CHUNKS
    return sum(parts[1:], parts[0])


def shifted_products_pay(x_shape: Sequence[int], w_shape: Sequence[int],
                          g_shape: Sequence[int], geo: Geometry) -> bool:
    """Whether the chunked shifted products beat XLA's kernel gradient for this shape.

    Measured float32 (``benchmarks/conv_grad.py`` at batch 32-128 and the whole sweep,
    ``benchmarks/conv_sweep.py`` at batch 32; ``benchmarks/README.md``, 7 and 7b): 1x1
    kernels 1.5-5x (one product, no taps); stride 2 with >= 64 channels 1.05-1.8x (XLA's
    strided kernel gradient is slow). At stride 1 what counts is the rows each product
    runs over (batch x output pixels): with >= 128 channels the products won from about
    25k rows (28x28 and 32x32 at batch 32, 16x16 at batch 128: 0.72-0.98x XLA's time, up
    to 0.4x at 56x56) but lost below (8x8-16x16 at batch 32, 8x8 at batch 128: 1.03-1.27x);
    with 64 channels they won from about 100k rows (56x56 and up at batch 32, 32x32 at
    batch 128: 0.66-0.98x) and lost at 32x32, batch 32 (1.24x). With fewer channels XLA's
    convolution form runs in cache and is up to 2x faster.
    """
    kh, kw, ci, co = w_shape
    rows = g_shape[0] * g_shape[1] * g_shape[2]
    channels = min(ci, co)
    if kh == kw == 1:
        return True
    if channels < 64:
        return False
    if max(geo.strides) > 1:
        return True
    return (channels >= 128 and rows >= 24 * 1024) or rows >= 96 * 1024


def input_grad_by_phases(g: jax.Array, w: jax.Array, x_shape: Sequence[int],
                          geo: Geometry) -> jax.Array:
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
                dimension_numbers=NHWC, precision=geo.precision,
            ))
        rows.append(jnp.stack(phases, axis=3))  # (b, qh, qw, sw, ci)
    out = jnp.stack(rows, axis=2)  # (b, qh, sh, qw, sw, ci)
    out = out.reshape(b, qh * sh, qw * sw, ci)
    return out[:, pt:pt + h, pl:pl + wd]


def phases_pay(w_shape: Sequence[int], g_shape: Sequence[int], geo: Geometry) -> bool:
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


def flip_transpose(w: jax.Array) -> jax.Array:
    """The kernel of the transposed convolution: flipped in space, Cin and Cout swapped."""
    return jnp.swapaxes(w[::-1, ::-1], 2, 3)


def stride1_input_grad_geometry(w_shape: Sequence[int], geo: Geometry) -> Geometry | None:
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
    return Geometry((1, 1), pads, geo.precision)  # type: ignore[arg-type]


def dilated_transpose_is_slow(w_shape: Sequence[int], g_shape: Sequence[int],
                               geo: Geometry) -> bool:
    """Whether XLA's transpose of a strided convolution hits the kernel-not-smaller-than-
    the-image case: it convolves ``g`` dilated to ``(ho - 1) * s + 1`` rows. 3x3/2 from
    4x4 to 2x2, 512 channels, batch 32: 4.4 s, against 35 ms as im2col's transpose."""
    (kh, kw), (sh, sw) = w_shape[:2], geo.strides
    return max(sh, sw) > 1 and kh * kw > 1 and (
        kh >= (g_shape[1] - 1) * sh + 1 or kw >= (g_shape[2] - 1) * sw + 1)


def gradient_paths(x_shape: Sequence[int], w_shape: Sequence[int], g_shape: Sequence[int],
                   geo: Geometry, dtype: object) -> tuple[str, str]:
    """How :func:`conv_bwd` computes this shape's gradients: ``(dx, dw)``.

    ``dx``: ``"phases"`` (:func:`input_grad_by_phases`), a forward path's name (stride 1: a
    forward convolution of ``g``, routed like any forward) or ``"T(<path>)"`` (the
    transpose of that forward formulation). ``dw``: ``"chunks"`` (XLA's transpose per
    chunk of images, :func:`kernel_grad_by_chunks`), ``"taps"`` or ``"rows"``
    (:func:`kernel_grad` per tap or per kernel row) or ``"xla"`` (XLA's transpose).
    """
    if phases_pay(w_shape, g_shape, geo):
        dx = "phases"
    elif (dx_geo := stride1_input_grad_geometry(w_shape, geo)) is not None:
        dx = conv_forward.forward_path(g_shape, (*w_shape[:2], w_shape[3], w_shape[2]), dx_geo,
                                       dtype)
    else:
        # XLA's transpose rule is as slow as its forward where the forward was routed away
        # from it (3x3/2 to 2x2 outputs, 512 channels: 4.4 s vs 0.1 s as im2col's).
        path = conv_forward.forward_path(x_shape, w_shape, geo, dtype)
        if path == "regions":
            # Its transpose (each region's slices padded back and summed) was slower than
            # XLA's: 3x3/2 8x8 -> 4x4, 256 -> 512, batch 128: 34.9 vs 31.3 ms; 14x14 -> 7x7,
            # batch 16: 17.3 vs 13.6. The kernel larger than the image keeps im2col's.
            path = "im2col" if conv_forward.kernel_exceeds_image(x_shape, w_shape) else "xla"
        elif path == "shifted" and not dilated_transpose_is_slow(w_shape, g_shape, geo):
            # bfloat16 (the only dtype the forward sends there): the transpose of the shifted
            # products took 1.25-2.3x XLA's autodiff, XLA's own transpose 0.76-1.17x, median
            # 0.95 (3x3/2 over 7x7 to 14x14 inputs, 64-512 channels, batch 32; README 7b).
            # To 2x2 outputs it stays: 0.04-0.26x XLA's, tied with im2col's.
            path = "xla"
        if path == "xla" and dilated_transpose_is_slow(w_shape, g_shape, geo):
            path = "im2col"
        dx = f"T({path})"
    if xla_kernel_grad_chunk(x_shape, w_shape, g_shape, geo, dtype) is not None:
        dw = "chunks"
    elif stem_rows_pay(w_shape, g_shape, dtype):
        dw = "rows"
    elif not shifted_products_pay(x_shape, w_shape, g_shape, geo):
        dw = "xla"
    elif geo.strides == (1, 1) and w_shape[0] * w_shape[1] > 1 and (
            (jnp.dtype(dtype) == jnp.float32 and w_shape[2] in conv_forward.ROW_CHANNELS)
            or conv_forward.forward_path(x_shape, w_shape, geo, dtype) == "rows"):
        # Per kernel row at stride 1 with 64 input channels (where the forward runs by rows,
        # and on larger images): 3x3 64 -> 64 at 32x32, batch 128: 114 ms per tap, 103 per
        # row, 70-77 per row with the output gradient first (output_grad_first), XLA's 212;
        # at 112x112, batch 16: 173 per tap, 134 per row (float32; bfloat16 not measured).
        dw = "rows"
    else:
        dw = "taps"
    return dx, dw


def conv_bwd(geo: Geometry, res: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(dx, dw)`` of the convolution with residuals ``res = (x, w)`` for the cotangent ``g``,
    in the forms :func:`gradient_paths` picks."""
    x, w = res
    dx_path, dw_path = gradient_paths(x.shape, w.shape, g.shape, geo, x.dtype)
    if dx_path == "phases":
        dx = input_grad_by_phases(g, w, x.shape, geo)
    elif not dx_path.startswith("T("):
        dx_geo = stride1_input_grad_geometry(w.shape, geo)
        dx = conv_forward.FORWARD_PATHS[dx_path](g, flip_transpose(w), dx_geo)
    else:
        fwd = conv_forward.FORWARD_PATHS[dx_path[2:-1]]
        (dx,) = jax.linear_transpose(
            lambda xx: fwd(xx, w, geo), jax.ShapeDtypeStruct(x.shape, x.dtype)
        )(g)
    if dw_path == "chunks":
        per = xla_kernel_grad_chunk(x.shape, w.shape, g.shape, geo, x.dtype)
        dw = kernel_grad_by_chunks(x, g, w.shape, geo, per)
    elif dw_path == "xla":
        (dw,) = jax.linear_transpose(
            lambda ww: xla_forward(x, ww, geo), jax.ShapeDtypeStruct(w.shape, w.dtype)
        )(g)
    else:
        dw = kernel_grad(x, g, w.shape, geo, by_rows=dw_path == "rows").astype(w.dtype)
    if dw_path in ("taps", "rows"):
        dx = computed_after(dx, dw)
    return dx, dw


def computed_after(value: jax.Array, dependency: jax.Array) -> jax.Array:
    """``value`` unchanged, bit for bit, but computed only once ``dependency`` is.

    XLA:CPU's scheduler leaves a kernel gradient computed as products (plain dots whose
    result is only a parameter's gradient) to the end of the backward pass, holding each
    one's input and output gradient alive until then: ResNet-50 at 224x224, batch 16,
    1721 MiB of temporary buffers against 1159 with this tie, and its step 0.80-0.85x the
    time (``benchmarks/README.md``, 7b, "The kernel gradient's product order"). Passing
    the input gradient through this makes the rest of the backward pass wait for the
    kernel gradient. ``lax.optimization_barrier`` would say the same, but XLA:CPU drops it
    before scheduling (jax 0.10.2). The tie copies one element per image over itself, at
    a row index read from ``dependency``: whatever the index, it is clamped alike on both
    sides, so the copy is an exact no-op. The batch axis is taken whole and the channels
    at a fixed index, so a batch sharded over devices (or channels sharded by a model's
    partition rules) stays where it is; only the image's rows (axis 1), which no shipped
    strategy shards, are indexed by a traced value.
    """
    if value.ndim == 0 or value.size == 0 or dependency.size == 0:
        return value
    index = (dependency.reshape(-1)[0] > 0).astype(jnp.int32)
    zero = jnp.zeros((), jnp.int32)  # every index of one type, also under x64
    start = (index,) if value.ndim == 1 else (zero, index, *(zero,) * (value.ndim - 2))
    sizes = (1,) if value.ndim == 1 else (value.shape[0], *(1,) * (value.ndim - 1))
    return lax.dynamic_update_slice(value, lax.dynamic_slice(value, start, sizes), start)
