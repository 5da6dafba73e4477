"""A drop-in ``conv_general_dilated`` whose backward pass runs well on XLA:CPU.

``jax.lax.conv_general_dilated``'s autodiff computes the kernel gradient as one more
convolution, with the batch as the contraction axis and the output gradient as a huge
"kernel". XLA:CPU runs that form at a fraction of its matrix-product speed, and on a CPU
the kernel gradient is the slowest third of a convolution's training cost.

:func:`conv_general_dilated` has the same signature and forward result, and a
``jax.custom_vjp`` whose backward pass computes

* the kernel gradient, where that measured faster (1x1 kernels, and 3x3 with many
  channels or large images: see ``_shifted_products_pay``), as ``kh * kw`` matrix
  products per chunk of images,
  ``dW[i, j] = sum_{b,h,w} x_pad[b, h*s + i, w*s + j, :]^T  g[b, h, w, :]``, looped over
  chunks of images of about ``_CHUNK_BYTES`` per tap, so each chunk's shifted copies of
  the input stay in cache (1.2-2.5x faster than one product over the whole batch,
  whose copies are each the size of the input);
* the input gradient with XLA's own transpose rule (at stride 1 a plain convolution,
  which XLA:CPU runs at forward speed), except at stride 2 on larger images, where XLA's
  rule convolves a zero-dilated copy of the output gradient: there, ``s * s`` stride-1
  convolutions with the kernel's stride phases (sub-pixel form) do only the useful
  products (``_input_grad_by_phases``; 1.5-2.2x on ResNet-18's 3x3/2 layers).

Only what ResNet-style models use takes this path: 2-D NHWC inputs, HWIO kernels, NHWC
outputs (what ``flax.nnx.Conv`` passes), any strides, any non-negative padding, no
dilation, no grouping, floating inputs of one dtype. Everything else goes to
``jax.lax.conv_general_dilated`` unchanged, so the result is never wrong, only
sometimes not faster. A ``custom_vjp`` function cannot be differentiated in forward
mode (``jax.jvp``, ``jax.jacfwd``); use XLA's convolution for that.

``default_conv_for_backend()`` picks this convolution on the CPU backend and XLA's on
GPU and TPU, where XLA's own kernels are already fast; ``resolve_conv_impl`` maps the
names ``"auto"``, ``"xla"`` and ``"custom"`` (what models accept) to a function.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["CONV_IMPLS", "conv_general_dilated", "default_conv_for_backend", "resolve_conv_impl"]

ConvFn = Callable[..., jax.Array]

# Bytes of one tap's input rows plus the output-gradient rows per chunk of the
# kernel-gradient loop. Measured on a 2-core EPYC (benchmarks/conv_grad.py --explore):
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
    return _xla_forward(x, w, geo)


def _conv_fwd(x: jax.Array, w: jax.Array, geo: _Geometry) -> tuple[jax.Array, tuple]:
    return _xla_forward(x, w, geo), (x, w)


def _shifted_products_pay(x_shape: Sequence[int], w_shape: Sequence[int],
                          g_shape: Sequence[int], geo: _Geometry) -> bool:
    """Whether the chunked shifted products beat XLA's kernel gradient for this shape.

    Measured on a 2-core EPYC, float32, batch 32-128 (``benchmarks/conv_grad.py``):
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
    """
    kh, kw = w_shape[:2]
    return max(geo.strides) > 1 and kh * kw > 1 and g_shape[1] * g_shape[2] >= 64


def _conv_bwd(geo: _Geometry, res: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w = res
    if _phases_pay(w.shape, g.shape, geo):
        dx = _input_grad_by_phases(g, w, x.shape, geo)
    else:
        # XLA's transpose of its own convolution (no forward recomputation); at stride 1
        # it is a plain convolution that XLA:CPU runs at forward speed.
        (dx,) = jax.linear_transpose(
            lambda xx: _xla_forward(xx, w, geo), jax.ShapeDtypeStruct(x.shape, x.dtype)
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


def resolve_conv_impl(name: str) -> ConvFn:
    """The convolution for ``conv_impl=name``: "auto" (by backend), "xla" or "custom"."""
    if name == "auto":
        return default_conv_for_backend()
    if name == "xla":
        return lax.conv_general_dilated
    if name == "custom":
        return conv_general_dilated
    raise ValueError(f"unknown conv_impl {name!r}; choose one of: {', '.join(CONV_IMPLS)}")
