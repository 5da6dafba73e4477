"""The backward pass of :mod:`nnx_trainer.conv`: kernel and input gradients, each in the
formulation measured fastest for its shape.

* the kernel gradient as ``kh * kw`` matrix products per chunk of images
  (:func:`kernel_grad`) where :func:`shifted_products_pay`, else XLA's transpose;
* the input gradient as stride-phase convolutions (:func:`input_grad_by_phases`) where
  :func:`phases_pay`; at stride 1 as a forward convolution of the output gradient with the
  flipped kernel, routed like any forward; otherwise as the transpose of the forward's own
  formulation (:func:`conv_bwd`).

Internal to :mod:`nnx_trainer.conv`; the names are public for its tests and benchmarks.
The forward router is looked up through its module (``conv_forward.forward_path``), so a
test that replaces it changes the backward pass's routing too.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from nnx_trainer import conv_forward
from nnx_trainer.conv_forward import NHWC, Geometry, xla_forward

__all__ = [
    "CHUNK_BYTES", "MIN_CHUNK_ROWS", "conv_bwd", "dilated_transpose_is_slow", "flip_transpose",
    "input_grad_by_phases", "kernel_grad", "phases_pay", "shifted_products_pay",
    "stride1_input_grad_geometry",
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


def kernel_grad(x: jax.Array, g: jax.Array, w_shape: Sequence[int], geo: Geometry) -> jax.Array:
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

    rows = max(MIN_CHUNK_ROWS, CHUNK_BYTES // ((ci + co) * jnp.dtype(x.dtype).itemsize))
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


def conv_bwd(geo: Geometry, res: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(dx, dw)`` of the convolution with residuals ``res = (x, w)`` for the cotangent ``g``."""
    x, w = res
    if phases_pay(w.shape, g.shape, geo):
        dx = input_grad_by_phases(g, w, x.shape, geo)
    elif (dx_geo := stride1_input_grad_geometry(w.shape, geo)) is not None:
        # At stride 1 the input gradient is a forward convolution of g with the flipped,
        # transposed kernel (what XLA's transpose rule emits): route it like a forward.
        dx = conv_forward.forward(g, flip_transpose(w), dx_geo)
    else:
        # The transpose of the forward's own formulation: XLA's transpose of its
        # convolution, or for im2col a product with the kernel's transpose scattered back
        # by padding (XLA's transpose rule is as slow as its forward where the forward
        # was routed away from it: 3x3/2 to 2x2 outputs, 512 channels, 4.4 s vs 0.1 s).
        path = conv_forward.forward_path(x.shape, w.shape, geo, x.dtype)
        if path == "xla" and dilated_transpose_is_slow(w.shape, g.shape, geo):
            path = "im2col"
        fwd = conv_forward.FORWARD_PATHS[path]
        (dx,) = jax.linear_transpose(
            lambda xx: fwd(xx, w, geo), jax.ShapeDtypeStruct(x.shape, x.dtype)
        )(g)
    if shifted_products_pay(x.shape, w.shape, g.shape, geo):
        dw = kernel_grad(x, g, w.shape, geo).astype(w.dtype)
    else:
        (dw,) = jax.linear_transpose(
            lambda ww: xla_forward(x, ww, geo), jax.ShapeDtypeStruct(w.shape, w.dtype)
        )(g)
    return dx, dw
