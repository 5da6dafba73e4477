"""nnx_trainer.conv: same forward and gradients as autodiff of jax.lax.conv_general_dilated.

Shapes are tiny (a few images of 7x8 pixels, a few channels) so the whole file runs in
seconds. At such sizes ``shifted_products_pay`` would send most kernels to XLA's
kernel-gradient rule (and ``phases_pay`` to XLA's input-gradient rule), so the shape
grid forces the custom forms on, and a smaller grid checks the other branches. No test
asserts a speed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from processes import clean_env

from nnx_trainer import conv as conv_mod
from nnx_trainer import conv_chunks, conv_forward, conv_gradients
from nnx_trainer.conv import (
    auto_conv_general_dilated,
    conv_general_dilated,
    default_conv_for_backend,
    resolve_conv_impl,
)

NHWC = ("NHWC", "HWIO", "NHWC")
TOLERANCE = {jnp.float32: 2e-6, jnp.bfloat16: 2e-2}


def _arrays(batch, h, w, ci, co, k, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((batch, h, w, ci), np.float32), dtype)
    kern = jnp.asarray(rng.standard_normal((k, k, ci, co), np.float32) / k, dtype)
    return x, kern


def _value_and_grads(fn, x, w, *args, **kwargs):
    """Forward output and (dx, dw) for a fixed pseudo-random cotangent, in one jit.

    (Jitted because eager dispatch compiles each of a 7x7 kernel's 49 tap slices apart.)
    """
    y_shape = jax.eval_shape(lambda a, b: fn(a, b, *args, **kwargs), x, w)
    ct = np.random.default_rng(1).standard_normal(y_shape.shape, np.float32)
    ct = jnp.asarray(ct, y_shape.dtype)

    @jax.jit
    def run(x, w, ct):
        y, vjp = jax.vjp(lambda a, b: fn(a, b, *args, **kwargs), x, w)
        return (y, *vjp(ct))

    return run(x, w, ct)


def _assert_close(got, want, tol):
    for g, e in zip(got, want, strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype
        g, e = np.asarray(g, np.float32), np.asarray(e, np.float32)
        scale = max(float(np.max(np.abs(e))), 1e-6)
        np.testing.assert_allclose(g / scale, e / scale, rtol=0, atol=tol)


@pytest.fixture
def custom_paths(monkeypatch):
    """Force the shifted-product kernel gradient and the stride-phase input gradient."""
    monkeypatch.setattr(conv_gradients, "shifted_products_pay", lambda *a: True)
    monkeypatch.setattr(conv_gradients, "phases_pay", lambda *a: True)


PADDINGS = ["SAME", "VALID", "sym", ((0, 2), (1, 0)), ((0, 0), (0, 0))]


def _padding(p, k):
    return ((k // 2, k // 2), (k // 2, k // 2)) if p == "sym" else p


def _compare_paddings(k, stride, paddings, dtype, shape):
    """Ours against lax for each padding; all of them in one compiled program."""
    x, w = _arrays(*shape, k, dtype)
    ct_rng = np.random.default_rng(1)
    cts = []
    for p in paddings:
        y = jax.eval_shape(lambda x, w, p=p: lax.conv_general_dilated(
            x, w, (stride, stride), _padding(p, k), dimension_numbers=NHWC), x, w)
        cts.append(jnp.asarray(ct_rng.standard_normal(y.shape, np.float32), dtype))

    @jax.jit
    def both(x, w, cts):
        out = []
        for p, ct in zip(paddings, cts, strict=True):
            for fn in (lax.conv_general_dilated, conv_general_dilated):
                y, vjp = jax.vjp(lambda a, b, fn=fn, p=p: fn(
                    a, b, (stride, stride), _padding(p, k), dimension_numbers=NHWC), x, w)
                out.append((y, *vjp(ct)))
        return out

    out = both(x, w, cts)
    for i, p in enumerate(paddings):
        want, got = out[2 * i], out[2 * i + 1]
        try:
            _assert_close(got, want, TOLERANCE[dtype])
        except AssertionError as err:
            raise AssertionError(f"k={k} stride={stride} padding={p}: {err}") from None


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_forward_and_gradients_match_autodiff_float32(k, stride, custom_paths):
    # 7 x 8 images: one odd and one even side in every case.
    _compare_paddings(k, stride, PADDINGS, jnp.float32, (3, 7, 8, 3, 4))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_forward_and_gradients_match_autodiff_bfloat16(k, stride, custom_paths):
    _compare_paddings(k, stride, ["SAME", ((0, 2), (1, 0))], jnp.bfloat16, (2, 9, 8, 4, 5))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_xla_gradient_branches_match_autodiff(dtype, monkeypatch):
    # Where the custom forms do not pay, the gradients are XLA's transposes.
    monkeypatch.setattr(conv_gradients, "shifted_products_pay", lambda *a: False)
    monkeypatch.setattr(conv_gradients, "phases_pay", lambda *a: False)
    for k, stride in ((3, 1), (3, 2)):
        _compare_paddings(k, stride, ["SAME", ((0, 2), (1, 0))], dtype, (2, 7, 8, 3, 4))


def test_the_shifted_products_pay_where_measured():
    geo = conv_forward.Geometry((1, 1), ((1, 1), (1, 1)), None)
    geo2 = conv_forward.Geometry((2, 2), ((1, 1), (1, 1)), None)
    pay = conv_gradients.shifted_products_pay
    assert pay((8, 32, 32, 16), (1, 1, 16, 32), (8, 32, 32, 32), geo)  # every 1x1
    assert not pay((128, 32, 32, 16), (3, 3, 16, 16), (128, 32, 32, 16), geo)  # few channels
    # Stride 1 by the rows each product covers (batch x pixels), from the sweep's figures.
    assert pay((128, 32, 32, 64), (3, 3, 64, 64), (128, 32, 32, 64), geo)  # 131k rows
    assert pay((32, 56, 56, 64), (3, 3, 64, 64), (32, 56, 56, 64), geo)  # 100k rows
    assert not pay((32, 32, 32, 64), (3, 3, 64, 64), (32, 32, 32, 64), geo)  # 32k rows
    assert pay((128, 16, 16, 128), (3, 3, 128, 128), (128, 16, 16, 128), geo)  # 32k rows
    assert pay((32, 28, 28, 128), (3, 3, 128, 128), (32, 28, 28, 128), geo)  # 25k rows
    assert not pay((32, 14, 14, 256), (3, 3, 256, 256), (32, 14, 14, 256), geo)
    assert not pay((128, 8, 8, 256), (3, 3, 256, 256), (128, 8, 8, 256), geo)
    assert not pay((8, 4, 4, 512), (3, 3, 512, 512), (8, 4, 4, 512), geo)
    assert pay((8, 16, 16, 64), (3, 3, 64, 128), (8, 8, 8, 128), geo2)  # stride 2
    phases = conv_gradients.phases_pay
    assert phases((3, 3, 64, 128), (8, 8, 8, 128), geo2)
    assert not phases((3, 3, 256, 512), (8, 4, 4, 512), geo2)  # tiny outputs
    assert not phases((1, 1, 64, 128), (8, 16, 16, 128), geo2)  # 1x1: a single phase
    assert not phases((3, 3, 64, 64), (8, 16, 16, 64), geo)  # stride 1


def test_xla_kernel_gradient_goes_by_chunks_where_measured():
    geo = conv_forward.Geometry((1, 1), ((1, 1), (1, 1)), None)
    geo2 = conv_forward.Geometry((2, 2), ((1, 1), (1, 1)), None)

    def chunk(b, side, ci, co, g=geo, dtype=jnp.float32, k=3):
        out = side // g.strides[0]
        return conv_gradients.xla_kernel_grad_chunk(
            (b, side, side, ci), (k, k, ci, co), (b, out, out, co), g, dtype)

    # ResNet-18 CIFAR at batch 128: chunks of about 1024 output pixels, at most 16 of them.
    assert chunk(128, 16, 128, 128) == 8  # 4 images would be 32 chunks
    assert chunk(128, 8, 256, 256) == 16
    assert chunk(128, 4, 512, 512) == 64
    assert chunk(128, 32, 64, 128, geo2) == 8  # stride 2 from 64 channels
    assert chunk(16, 28, 128, 128) == 2  # never one image per chunk
    assert chunk(128, 32, 64, 64) is None  # 64 channels at stride 1: by rows
    assert chunk(32, 7, 512, 512) is None  # a single chunk: XLA's over the batch
    assert chunk(128, 8, 256, 256, dtype=jnp.bfloat16) is None  # not measured
    assert chunk(128, 16, 128, 128, k=1) is None  # 1x1: one product
    # Chunks whose input is 8 MiB or more go by taps: two images of 224x224 (25-51 MiB),
    # 3x3/2 128 -> 128 over 112x112 (12.8 MiB); at 6.4 MiB the chunks won.
    assert chunk(32, 224, 128, 128, geo2) is None and chunk(32, 224, 64, 128, geo2) is None
    assert chunk(32, 112, 128, 128, geo2) is None
    assert chunk(32, 112, 64, 128, geo2) == 2 and chunk(32, 56, 256, 256) == 2
    assert conv_gradients.gradient_paths(
        (32, 224, 224, 128), (3, 3, 128, 128), (32, 112, 112, 128), geo2, jnp.float32) == (
        "phases", "taps")
    assert conv_gradients.gradient_paths(
        (128, 8, 8, 256), (3, 3, 256, 256), (128, 8, 8, 256), geo, jnp.float32)[1] == "chunks"


def test_a_stems_kernel_gradient_goes_by_rows_where_measured():
    def dw_path(b, side, k, s, ci=3, co=64, dtype=jnp.float32):
        p = (k - 1) // 2
        geo = conv_forward.Geometry((s, s), ((p, p), (p, p)), None)
        out = (side + 2 * p - k) // s + 1
        return conv_gradients.gradient_paths(
            (b, side, side, ci), (k, k, ci, co), (b, out, out, co), geo, dtype)[1]

    assert dw_path(16, 224, 7, 2) == "rows"  # ResNet-50's stem: 36 ms against XLA's 115
    assert dw_path(16, 112, 7, 2) == "rows"  # 50k output pixels
    assert dw_path(128, 32, 3, 1) == "rows"  # the CIFAR stem of ResNet-18 at batch 128
    assert dw_path(32, 64, 7, 2) == "xla"  # 32k pixels: XLA's was faster
    assert dw_path(128, 32, 3, 1, co=16) == "xla"  # the CIFAR ResNets' 3 -> 16 stem
    assert dw_path(16, 224, 7, 2, dtype=jnp.bfloat16) == "xla"  # not measured
    assert dw_path(16, 224, 7, 2, ci=16) != "rows"  # not a stem


def test_a_stems_kernel_gradient_by_rows_equals_autodiff(monkeypatch):
    # 7x7/2 and 3x3/1 over 3 input channels, by kernel rows in chunks of images.
    monkeypatch.setattr(conv_gradients, "STEM_ROWS", 1)
    monkeypatch.setattr(conv_gradients, "CHUNK_BYTES", 1)
    by_rows = []
    real = conv_gradients.kernel_grad
    monkeypatch.setattr(conv_gradients, "kernel_grad", lambda *a, **k: by_rows.append(
        k.get("by_rows")) or real(*a, **k))
    for k, s in ((7, 2), (3, 1)):
        x, w = _arrays(4, 15, 15, 3, 64, k, jnp.float32)
        args = ((s, s), "SAME")
        want = _value_and_grads(lax.conv_general_dilated, x, w, *args, dimension_numbers=NHWC)
        got = _value_and_grads(conv_general_dilated, x, w, *args, dimension_numbers=NHWC)
        _assert_close(got, want, TOLERANCE[jnp.float32])
    assert by_rows == [True, True]


@pytest.mark.parametrize("g_first", [True, False], ids=["g_first", "x_first"])
def test_kernel_gradient_products_in_either_order_match_autodiff(g_first, custom_paths,
                                                                 monkeypatch):
    # Per tap (1x1 and 3x3, stride 1 and 2) and per kernel row, both orders of the product.
    monkeypatch.setattr(conv_gradients, "output_grad_first", lambda *a: g_first)
    for k, stride in ((1, 1), (3, 1), (3, 2)):
        _compare_paddings(k, stride, ["SAME", ((0, 2), (1, 0))], jnp.float32, (3, 7, 8, 6, 4))
    monkeypatch.setattr(conv_forward, "forward_path", lambda *a: "rows")
    _compare_paddings(3, 1, ["SAME", ((0, 2), (1, 0))], jnp.float32, (3, 7, 8, 6, 4))


def test_the_kernel_gradients_product_order_follows_the_measurements():
    first = conv_gradients.output_grad_first
    assert first(3 * 64, 64, 2048)  # 3x3 64 -> 64 by kernel rows: 0.72-0.80x the time
    assert first(256, 64, 8192)  # 1x1 256 -> 64
    assert not first(64, 256, 8192)  # 1x1 64 -> 256: the other order was 1.3-1.4x slower
    assert not first(7 * 3, 64, 8192)  # the stem by kernel rows: 1.6-2.0x slower
    assert not first(512, 512, 8192)  # square: no gain
    assert not first(2048, 512, 128)  # a few rows (2x2 images at batch 32): slower


def test_the_input_gradient_waits_for_the_kernel_gradient_bit_for_bit():
    # conv_bwd ties dx to a product-form dW (XLA:CPU would leave those products to the end
    # of the backward pass, holding their inputs): dx must come out unchanged whatever dW
    # holds, and must really depend on it.
    value = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3, 5, 6)), jnp.float32)
    tie = jax.jit(conv_gradients.computed_after)
    for dep in (np.nan, np.inf, -np.inf, -1.0, 0.0, 5.0):
        out = tie(value, jnp.full((3, 3, 6, 2), dep, jnp.float32))
        np.testing.assert_array_equal(np.asarray(out).view(np.uint32),
                                      np.asarray(value).view(np.uint32))
    vector = jnp.arange(5.0)
    np.testing.assert_array_equal(tie(vector, jnp.ones(2)), vector)
    jaxpr = jax.make_jaxpr(conv_gradients.computed_after)(value, jnp.ones((3, 3, 6, 2)))
    dependency = jaxpr.jaxpr.invars[1]
    assert any(dependency in eqn.invars for eqn in jaxpr.jaxpr.eqns)


def test_a_64_channel_kernel_gradient_goes_by_rows_at_stride_1():
    def dw_path(b, side, s=1, c=64, k=3):
        p = k // 2
        geo = conv_forward.Geometry((s, s), ((p, p), (p, p)), None)
        out = (side - 1) // s + 1
        return conv_gradients.gradient_paths(
            (b, side, side, c), (k, k, c, c), (b, out, out, c), geo, jnp.float32)[1]

    assert dw_path(128, 32) == "rows"  # the forward goes by rows too
    assert dw_path(16, 112) == "rows"  # its forward stays XLA's; per tap it was 1.3x slower
    assert dw_path(128, 32, s=2) != "rows"
    assert dw_path(16, 112, c=128) != "rows"
    assert dw_path(32, 56, k=1) == "taps"  # one tap: nothing to put side by side


@pytest.mark.parametrize("stride, padding, channels", [
    (1, "SAME", 128), (2, "SAME", 64), (1, ((0, 2), (1, 0)), 128)], ids=["s1", "s2", "asymmetric"])
def test_xla_kernel_gradient_sums_over_chunks(stride, padding, channels, monkeypatch):
    # Chunks of 2 images over a batch of 6: three kernel gradients summed.
    monkeypatch.setattr(conv_gradients, "XLA_CHUNK_ROWS", 1)
    chunked = []
    real = conv_gradients.kernel_grad_by_chunks
    monkeypatch.setattr(conv_gradients, "kernel_grad_by_chunks", lambda *a: chunked.append(
        a[-1]) or real(*a))
    x, w = _arrays(6, 8, 8, channels, channels, 3, jnp.float32)
    args = ((stride, stride), padding)
    want = _value_and_grads(lax.conv_general_dilated, x, w, *args, dimension_numbers=NHWC)
    got = _value_and_grads(conv_general_dilated, x, w, *args, dimension_numbers=NHWC)
    _assert_close(got, want, TOLERANCE[jnp.float32])
    assert chunked == [2]


def test_kernel_gradient_loops_over_chunks(custom_paths, monkeypatch):
    # Chunks of 2 images over a batch of 6: three loop steps.
    monkeypatch.setattr(conv_gradients, "CHUNK_BYTES", 1)
    monkeypatch.setattr(conv_gradients, "MIN_CHUNK_ROWS", 2 * 4 * 4)
    x, w = _arrays(6, 8, 8, 3, 4, 3, jnp.float32)
    args = ((2, 2), ((1, 1), (1, 1)))
    want = _value_and_grads(lax.conv_general_dilated, x, w, *args, dimension_numbers=NHWC)
    got = _value_and_grads(conv_general_dilated, x, w, *args, dimension_numbers=NHWC)
    _assert_close(got, want, TOLERANCE[jnp.float32])


@pytest.mark.parametrize("stride, padding", [(1, "SAME"), (2, "SAME"), (1, ((0, 2), (1, 0)))],
                         ids=["s1", "s2", "asymmetric"])
def test_row_products_loop_over_chunks(stride, padding, custom_paths, monkeypatch):
    # The forward and the kernel gradient by kernel rows, chunks of 2 images over a batch of
    # 6: three loop steps in both.
    monkeypatch.setattr(conv_forward, "forward_path", lambda *a: "rows")
    monkeypatch.setattr(conv_forward, "ROW_CHUNK_PIXELS", 2 * 8 * 8 // stride**2)
    monkeypatch.setattr(conv_gradients, "CHUNK_BYTES", 1)
    monkeypatch.setattr(conv_gradients, "MIN_CHUNK_ROWS", 2 * 8 * 8 // stride**2)
    rows_grads = []
    real_kernel_grad = conv_gradients.kernel_grad
    monkeypatch.setattr(conv_gradients, "kernel_grad", lambda *a, **k: rows_grads.append(
        k.get("by_rows")) or real_kernel_grad(*a, **k))
    x, w = _arrays(6, 8, 8, 3, 4, 3, jnp.float32)
    args = ((stride, stride), padding)
    want = _value_and_grads(lax.conv_general_dilated, x, w, *args, dimension_numbers=NHWC)
    got = _value_and_grads(conv_general_dilated, x, w, *args, dimension_numbers=NHWC)
    _assert_close(got, want, TOLERANCE[jnp.float32])
    assert rows_grads == [stride == 1]  # by rows at stride 1 only


def test_chunks_divide_the_batch_and_split_evenly_over_devices(monkeypatch):
    per = conv_chunks.images_per_chunk
    assert per(128, 4) == 4
    assert per(6, 4) == 6 and per(5, 2) == 5  # a divisor of the batch: no remainder step
    assert per(128, 0) == 1 and per(3, 10) == 3
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    assert per(128, 4) == 8  # a multiple of the device count where the batch is one
    assert per(128, 20) == 32
    assert per(12, 4) == 4  # 12 images do not split over 8 devices


def test_chunk_loops_map_and_sum_over_every_image_once():
    x = jnp.arange(6 * 2, dtype=jnp.float32).reshape(6, 2)
    y = jnp.arange(6, dtype=jnp.float32)[:, None] * 10
    for per in (1, 2, 3, 6):
        mapped = conv_chunks.map_batch_chunks(lambda c: c * 2, x, per)
        np.testing.assert_array_equal(mapped, x * 2)  # in the images' order
        summed = conv_chunks.sum_batch_chunks(lambda a, b: (a * b).sum(0), (x, y), per)
        np.testing.assert_allclose(summed, (x * y).sum(0))


BATCH_SHARDED_CHUNKS = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax import lax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from nnx_trainer import conv_forward, conv_gradients
    from nnx_trainer.conv import conv_general_dilated
    # 3x3 over 8x8, chunks of 8 images (one per device) over 32: with 64 channels (the rows
    # path) four loop steps in the forward, the input gradient and the kernel gradient;
    # with 128, four kernel gradients of XLA's summed. 3x3 over 2x2: the forward and input
    # gradient by regions (a gather per region, along the pixels).
    conv_forward.ROW_CHUNK_PIXELS = 1
    conv_gradients.shifted_products_pay = lambda *a: True
    conv_gradients.CHUNK_BYTES, conv_gradients.MIN_CHUNK_ROWS = 1, 1
    conv_gradients.XLA_CHUNK_ROWS = 1
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rng = np.random.default_rng(0)
    def grads(fn):
        loss = lambda x, w: jnp.sum(fn(x, w, (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    for channels, size in ((64, 8), (128, 8), (16, 2)):
        x = jax.device_put(rng.standard_normal((32, size, size, channels), np.float32),
                           NamedSharding(mesh, P("data")))
        w = jax.device_put(rng.standard_normal((3, 3, channels, channels), np.float32) / 24,
                           NamedSharding(mesh, P()))
        ours = grads(conv_general_dilated)
        hlo = ours.lower(x, w).compile().as_text()
        (v, (dx, dw)), (v0, (dx0, dw0)) = ours(x, w), grads(lax.conv_general_dilated)(x, w)
        err = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
                  for a, b in ((v, v0), (dx, dx0), (dw, dw0)))
        geo = conv_forward.Geometry((1, 1), ((1, 1), (1, 1)), None)
        paths = conv_gradients.gradient_paths(x.shape, w.shape, x.shape, geo, x.dtype)
        path = paths[1] if size == 8 else conv_forward.forward_path(x.shape, w.shape, geo)
        print("RESULT", path, jax.device_count(), hlo.count("all-gather"),
              dx.sharding.spec, err)
""")


def test_chunk_loops_keep_a_batch_sharded_over_devices():
    # A loop over contiguous chunks of a batch sharded over 8 devices made GSPMD gather
    # the whole batch on every device at every step; chunks that take the same share of
    # each device's images keep the work (and the input gradient) on its device.
    proc = subprocess.run([sys.executable, "-c", BATCH_SHARDED_CHUNKS], env=clean_env(8),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [line.split(" ", 5)[1:] for line in proc.stdout.splitlines()
               if line.startswith("RESULT")]
    assert [r[:4] for r in results] == [["rows", "8", "0", "P('data',)"],
                                        ["chunks", "8", "0", "P('data',)"],
                                        ["regions", "8", "0", "P('data',)"]]
    assert all(float(r[4]) < 1e-5 for r in results)


def test_eager_and_with_precision_and_a_list_padding(custom_paths):
    x, w = _arrays(2, 6, 6, 3, 4, 3, jnp.float32)
    kwargs = dict(dimension_numbers=NHWC, precision=lax.Precision.HIGHEST)
    want = _value_and_grads(lax.conv_general_dilated, x, w, (1, 1), [(1, 1), (1, 1)], **kwargs)
    y, vjp = jax.vjp(lambda a, b: conv_general_dilated(
        a, b, (1, 1), [(1, 1), (1, 1)], **kwargs), x, w)
    _assert_close([y, *vjp(jnp.asarray(np.random.default_rng(1).standard_normal(
        y.shape, np.float32)))], want, TOLERANCE[jnp.float32])

# --- the routed forward pass ----------------------------------------------------------------
S1, S3, S7 = ((0, 0), (0, 0)), ((1, 1), (1, 1)), ((3, 3), (3, 3))
# (batch, h, w, cin, cout, kernel, stride, padding): every case the forward router tells
# apart, at a few channels (64 where the rule needs them).
ROUTED_SHAPES = {
    "3x3 over 2x2 (kernel larger than the image)": (2, 2, 2, 8, 6, 3, 1, S3),
    "3x3 over 1x1 (one live tap)": (2, 1, 1, 8, 6, 3, 1, S3),
    "3x3/2 over 2x2": (2, 2, 2, 8, 6, 3, 2, S3),
    "3x3/2 over 4x4": (2, 4, 4, 6, 8, 3, 2, S3),
    "3x3/2 over 7x7 (odd)": (2, 7, 7, 4, 6, 3, 2, S3),
    "3x3/2 over 9x8, asymmetric padding": (2, 9, 8, 4, 6, 3, 2, ((0, 1), (1, 0))),
    "3x3 over 6x5": (2, 6, 5, 4, 6, 3, 1, S3),
    "1x1 over 6x6": (2, 6, 6, 8, 12, 1, 1, S1),
    "1x1/2 over 7x7 (odd)": (2, 7, 7, 8, 12, 1, 2, S1),
    "1x1/2 over 2x2": (2, 2, 2, 8, 12, 1, 2, S1),
    "1x1 over 1x1": (2, 1, 1, 12, 8, 1, 1, S1),
    "7x7/2 stem over 8x8": (2, 8, 8, 3, 8, 7, 2, S7),
    "7x7/2 stem over 5x5": (2, 5, 5, 3, 8, 7, 2, S7),
    "7x7/2 stem over 3x3": (2, 3, 3, 3, 8, 7, 2, S7),
    "3x3 over 12x12, 64 channels (rows)": (2, 12, 12, 64, 64, 3, 1, S3),
    "3x3/2 over 15x16, 64 channels (rows)": (2, 15, 16, 64, 128, 3, 2, S3),
    "3x3 over 5x7, 256 channels (regions)": (2, 5, 7, 256, 8, 3, 1, S3),
    "3x3 over 2x2, padding 3 (outputs that read only padding)":
        (2, 2, 2, 8, 6, 3, 1, ((3, 3), (3, 3))),
    "3x3/2 over 9x8, asymmetric padding, 256 channels (regions)":
        (2, 9, 8, 256, 8, 3, 2, ((0, 1), (1, 0))),
}


def _compare_shapes(shapes, dtype):
    """Ours (as routed) against lax's autodiff for each shape; one compiled program."""
    inputs, cts = [], []
    for i, (b, h, w, ci, co, k, s, pad) in enumerate(shapes.values()):
        rng = np.random.default_rng(i)
        x = jnp.asarray(rng.standard_normal((b, h, w, ci), np.float32), dtype)
        kern = jnp.asarray(rng.standard_normal((k, k, ci, co), np.float32) / k, dtype)
        y = jax.eval_shape(lambda x, kern, s=s, pad=pad: lax.conv_general_dilated(
            x, kern, (s, s), pad, dimension_numbers=NHWC), x, kern)
        inputs.append((x, kern))
        cts.append(jnp.asarray(rng.standard_normal(y.shape, np.float32), dtype))
    geometry = [(s, pad) for *_, s, pad in shapes.values()]

    @jax.jit
    def both(inputs, cts):
        out = []
        for (x, kern), ct, (s, pad) in zip(inputs, cts, geometry, strict=True):
            for fn in (lax.conv_general_dilated, conv_general_dilated):
                y, vjp = jax.vjp(lambda a, b, fn=fn, s=s, pad=pad: fn(
                    a, b, (s, s), pad, dimension_numbers=NHWC), x, kern)
                out.append((y, *vjp(ct)))
        return out

    out = both(inputs, cts)
    for i, name in enumerate(shapes):
        try:
            _assert_close(out[2 * i + 1], out[2 * i], TOLERANCE[dtype])
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from None


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_routed_shapes_match_autodiff(dtype):
    # As routed by the measured rules (forward, input and kernel gradients).
    _compare_shapes(ROUTED_SHAPES, dtype)


def test_resnet50_shapes_at_64px_match_autodiff_as_routed():
    # The real channel counts of ResNet-50 at 64x64 (benchmarks/conv_sweep.py --quick), two
    # images: 3x3 over 2x2 at 512 channels, 3x3/2 to 2x2 (the dilated-transpose case), 1x1
    # at 16x16 and 2x2 and with stride 2, and the 7x7/2 stem.
    _compare_shapes({
        "3x3 2x2 512": (2, 2, 2, 512, 512, 3, 1, S3),
        "3x3 4x4 256": (2, 4, 4, 256, 256, 3, 1, S3),
        "3x3/2 4x4 512": (2, 4, 4, 512, 512, 3, 2, S3),
        "3x3/2 16x16 128": (2, 16, 16, 128, 128, 3, 2, S3),
        "1x1 16x16 256->128": (2, 16, 16, 256, 128, 1, 1, S1),
        "1x1 2x2 512->2048": (2, 2, 2, 512, 2048, 1, 1, S1),
        "1x1/2 4x4 1024->2048": (2, 4, 4, 1024, 2048, 1, 2, S1),
        "7x7/2 64x64 3->64": (2, 64, 64, 3, 64, 7, 2, S7),
    }, jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("path", sorted(conv_forward.FORWARD_PATHS))
def test_every_forward_path_matches_autodiff_on_every_routed_shape(
        path, dtype, custom_paths, monkeypatch):
    # Each formulation forced on every shape (the stride-1 input gradient, a forward
    # convolution of the output gradient, takes it too), with the custom gradient forms.
    monkeypatch.setattr(conv_forward, "forward_path", lambda *a: path)
    _compare_shapes(ROUTED_SHAPES, dtype)


def test_taps_that_only_read_padding_are_dropped():
    live = conv_forward.live_taps
    assert live((1, 1, 1, 4), (3, 3, 4, 4), conv_forward.Geometry((1, 1), S3, None)) == [(1, 1)]
    # 7x7/2 with padding 3 over a 3x3 image: rows/columns 0 and 6 never reach a pixel.
    taps = live((1, 3, 3, 4), (7, 7, 4, 4), conv_forward.Geometry((2, 2), S7, None))
    assert taps == [(i, j) for i in range(1, 6) for j in range(1, 6)]
    assert len(live((1, 8, 8, 4), (3, 3, 4, 4), conv_forward.Geometry((1, 1), S3, None))) == 9


def test_a_kernel_exceeds_the_image_when_taller_or_wider():
    exceeds = conv_forward.kernel_exceeds_image
    assert exceeds((1, 2, 2, 8), (3, 3, 8, 8)) and exceeds((1, 4, 2, 8), (3, 3, 8, 8))
    assert not exceeds((1, 3, 3, 8), (3, 3, 8, 8)) and not exceeds((1, 1, 1, 8), (1, 1, 8, 8))


def test_regions_group_outputs_by_the_taps_that_read_real_pixels():
    runs = conv_forward.live_runs
    # 3x3, padding 1 over 4: the first output reads taps 1-2, the last 0-1, the rest all.
    assert runs(3, 1, 4, 1, 4) == [(0, 1, (1, 2)), (1, 3, (0, 1, 2)), (3, 4, (0, 1))]
    assert runs(3, 1, 2, 1, 2) == [(0, 1, (1, 2)), (1, 2, (0, 1))]  # over 2: none whole
    assert runs(3, 2, 2, 1, 4) == [(0, 1, (1, 2)), (1, 2, (0, 1, 2))]  # stride 2
    assert runs(1, 1, 3, 0, 3) == [(0, 3, (0,))]


def test_the_forward_router_picks_the_measured_paths():
    # ResNet-50 (ImageNet stem) shapes at 64x64 and 224x224, batch 32: see
    # benchmarks/README.md, "Forward routing".
    def path(h, ci, co, k, s, pad):
        geo = conv_forward.Geometry((s, s), pad, None)
        return conv_forward.forward_path((32, h, h, ci), (k, k, ci, co), geo)

    # Kernel larger than the image: one product per region, over the taps it reads.
    assert path(2, 512, 512, 3, 1, S3) == "regions"
    assert path(2, 64, 64, 3, 1, S3) == "regions"
    assert path(2, 256, 512, 3, 2, S3) == "regions"
    assert path(1, 512, 512, 3, 1, S3) == "im2col"  # one live tap: one product
    assert path(8, 128, 128, 3, 2, S3) == "xla"  # strided, 4x4 outputs: a tie
    assert path(4, 512, 512, 3, 2, S3) == "xla"  # small outputs over few rows: ties
    assert path(4, 256, 256, 3, 1, S3) == "xla"
    assert path(3, 512, 512, 3, 1, S3) == "xla"  # kernel as large as the image: a tie

    def at_128(h, ci, co, k, s, pad):
        geo = conv_forward.Geometry((s, s), pad, None)
        return conv_forward.forward_path((128, h, h, ci), (k, k, ci, co), geo)

    # At most 7x7 outputs with 256 channels or more over >= 2048 rows: regions.
    assert at_128(4, 512, 512, 3, 1, S3) == "regions"  # ResNet-18 CIFAR, last stage
    assert at_128(8, 256, 512, 3, 2, S3) == "regions"
    assert at_128(14, 256, 512, 3, 2, S3) == "regions"  # 7x7 outputs
    assert at_128(8, 256, 256, 3, 1, S3) == "xla"  # 8x8 outputs: its copies cost more
    assert at_128(4, 128, 128, 3, 1, S3) == "xla"
    # 64 channels: one product per kernel row, from 8x8 to 64x64 outputs, stride 1 or 2.
    assert path(16, 64, 64, 3, 1, S3) == "rows"
    assert path(56, 64, 64, 3, 1, S3) == "rows"
    assert path(64, 64, 128, 3, 2, S3) == "rows"
    assert path(8, 64, 64, 3, 1, S3) == "rows"
    assert path(4, 64, 64, 3, 1, S3) == "xla"  # 4x4 outputs: not measured faster
    assert path(224, 64, 64, 3, 1, S3) == "xla"  # an image's rows outgrow the cache
    assert path(112, 64, 128, 3, 2, S3) == "xla"  # 56x56 outputs, but from 112x112
    assert path(32, 32, 32, 3, 1, S3) == "xla"  # 32 and 128 channels: XLA's is as fast
    assert path(16, 128, 128, 3, 1, S3) == "xla"
    assert path(64, 3, 64, 7, 2, S7) == "xla"
    assert path(224, 3, 64, 7, 2, S7) == "xla"
    assert path(16, 64, 256, 1, 1, S1) == "im2col"  # 1x1: one product over channels
    assert path(2, 2048, 512, 1, 1, S1) == "im2col"
    assert path(2, 1024, 2048, 1, 2, S1) == "im2col"  # 1x1 output
    assert path(56, 256, 512, 1, 2, S1) == "im2col"

    def bf16(h, ci, co, k, s, pad):
        geo = conv_forward.Geometry((s, s), pad, None)
        return conv_forward.forward_path((32, h, h, ci), (k, k, ci, co), geo, jnp.bfloat16)

    # bfloat16: one product per tap for 3x3 to outputs of at most 8x8 (XLA's bfloat16
    # convolution is slow on small images), XLA's from 16x16 outputs and for the stems.
    assert bf16(2, 512, 512, 3, 1, S3) == "regions"  # kernel larger than the image
    assert bf16(4, 512, 512, 3, 1, S3) == "shifted"  # 512 output pixels a batch
    assert conv_forward.forward_path((128, 4, 4, 512), (3, 3, 512, 512),
                                     conv_forward.Geometry((1, 1), S3, None),
                                     jnp.bfloat16) == "regions"  # 2048 of them
    assert bf16(8, 128, 128, 3, 1, S3) == "shifted"
    assert bf16(16, 128, 128, 3, 2, S3) == "shifted"
    # From 16x16 outputs, with 64 channels and more: one product per kernel row.
    assert bf16(16, 64, 64, 3, 1, S3) == "rows"
    assert bf16(32, 64, 128, 3, 2, S3) == "rows"
    assert bf16(28, 128, 128, 3, 1, S3) == "rows"
    assert bf16(32, 32, 32, 3, 1, S3) == "xla"
    assert bf16(112, 64, 64, 3, 1, S3) == "xla"
    assert bf16(32, 3, 64, 7, 2, S7) == "xla"
    assert bf16(8, 3, 64, 3, 1, S3) == "xla"  # a stem over a small image: few channels
    assert bf16(16, 256, 128, 1, 1, S1) == "im2col"


def test_a_bfloat16_strided_input_gradient_is_xlas_transpose_where_the_forward_is_shifted():
    # The transpose of the shifted products took 1.25-2.3x XLA's autodiff in bfloat16 (3x3/2
    # over 7x7 to 14x14 inputs), XLA's own transpose 0.76-1.17x; the kernel gradient stays taps.
    def paths(b, h, ci, co):
        geo = conv_forward.Geometry((2, 2), S3, None)
        x_shape, w_shape, ho = (b, h, h, ci), (3, 3, ci, co), (h + 1) // 2
        assert conv_forward.forward_path(x_shape, w_shape, geo, jnp.bfloat16) == "shifted"
        return conv_gradients.gradient_paths(x_shape, w_shape, (b, ho, ho, co), geo,
                                             jnp.bfloat16)

    assert paths(32, 8, 64, 128) == ("T(xla)", "taps")
    assert paths(32, 14, 256, 512) == ("T(xla)", "taps")
    assert paths(32, 16, 128, 256)[0] == "phases"  # 8x8 outputs: the phases, as before
    assert paths(32, 4, 256, 512)[0] == "T(shifted)"  # to 2x2: XLA's dilated transpose
    assert paths(2, 8, 16, 16)[0] == "T(xla)"
    # ...and its values are autodiff's (the small shape above, both paddings).
    _compare_paddings(3, 2, ["SAME", ((0, 2), (1, 0))], jnp.bfloat16, (2, 8, 8, 16, 16))


def test_the_input_gradient_avoids_xla_dilated_transpose_where_it_is_slow():
    slow = conv_gradients.dilated_transpose_is_slow
    geo2 = conv_forward.Geometry((2, 2), S3, None)
    # 3x3/2 from 4x4 to 2x2: g dilated to 3x3, no larger than the kernel.
    assert slow((3, 3, 512, 512), (32, 2, 2, 512), geo2)
    assert slow((3, 3, 512, 512), (32, 1, 1, 512), geo2)
    assert not slow((3, 3, 256, 512), (32, 4, 4, 512), geo2)
    assert not slow((1, 1, 256, 512), (32, 2, 2, 512), conv_forward.Geometry((2, 2), S1, None))
    assert not slow((3, 3, 512, 512), (32, 2, 2, 512), conv_forward.Geometry((1, 1), S3, None))


# --- what nnx.Conv passes ---------------------------------------------------------------


@pytest.mark.parametrize("padding", ["SAME", "VALID", 1, ((0, 1), (2, 0)), "CIRCULAR"], ids=str)
def test_nnx_conv_takes_the_custom_path_and_matches(padding, custom_paths, monkeypatch):
    taken = []
    real_conv = conv_mod._conv
    monkeypatch.setattr(conv_mod, "_conv", lambda *a: taken.append(1) or real_conv(*a))
    layers = {
        impl: nnx.Conv(3, 4, (3, 3), strides=2, padding=padding, rngs=nnx.Rngs(0),
                       conv_general_dilated=impl)
        for impl in (lax.conv_general_dilated, conv_general_dilated)
    }
    x = _arrays(2, 7, 8, 3, 1, 1, jnp.float32)[0]

    def grads(layer):
        def loss(layer, x):
            return jnp.sum(jnp.sin(layer(x)))
        return nnx.grad(loss, argnums=(0, 1))(layer, x)

    (want_m, want_x), (got_m, got_x) = (grads(layers[f]) for f in layers)
    assert taken, "nnx.Conv's call did not take the custom path"
    _assert_close([got_m["kernel"][...], got_m["bias"][...], got_x],
                  [want_m["kernel"][...], want_m["bias"][...], want_x], 2e-6)


# --- everything else goes to XLA ----------------------------------------------------------

FALLBACKS = {
    "kernel dilation": (dict(rhs_dilation=(2, 2)), (1, 8, 8, 4), (3, 3, 4, 6)),
    "input dilation": (dict(lhs_dilation=(2, 1)), (1, 5, 5, 4), (3, 3, 4, 6)),
    "feature groups": (dict(feature_group_count=2), (1, 6, 6, 4), (3, 3, 2, 6)),
    "batch groups": (dict(batch_group_count=2), (2, 6, 6, 4), (3, 3, 4, 6)),
    "NCHW": (dict(dimension_numbers=("NCHW", "OIHW", "NCHW")), (1, 4, 6, 6), (6, 4, 3, 3)),
    "lax default layout": (dict(dimension_numbers=None), (1, 4, 6, 6), (6, 4, 3, 3)),
    "NHWC out NCHW": (dict(dimension_numbers=("NHWC", "HWIO", "NCHW")), (1, 6, 6, 4),
                      (3, 3, 4, 6)),
    "3-D": (dict(dimension_numbers=("NDHWC", "DHWIO", "NDHWC")), (1, 4, 4, 4, 2),
            (3, 3, 3, 2, 3)),
    "1-D": (dict(dimension_numbers=("NWC", "WIO", "NWC")), (1, 6, 2), (3, 2, 3)),
    "negative padding": (dict(padding=((-1, 0), (0, 0))), (1, 6, 6, 4), (3, 3, 4, 6)),
    "preferred float32": (dict(preferred_element_type=jnp.float32, dtype=jnp.bfloat16),
                          (1, 6, 6, 4), (3, 3, 4, 6)),
}


@pytest.mark.parametrize("case", sorted(FALLBACKS))
def test_other_convolutions_fall_back_to_xla(case, monkeypatch):
    kwargs, x_shape, w_shape = FALLBACKS[case]
    kwargs = dict(kwargs)
    dtype = kwargs.pop("dtype", jnp.float32)
    kwargs.setdefault("dimension_numbers", NHWC if len(x_shape) == 4 else None)
    padding = kwargs.pop("padding", "SAME" if "lhs_dilation" not in kwargs else ((1, 1),) * 2)
    strides = (1,) * (len(x_shape) - 2)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape, np.float32), dtype)
    w = jnp.asarray(rng.standard_normal(w_shape, np.float32), dtype)

    def forbidden(*args):
        raise AssertionError("took the custom path")

    monkeypatch.setattr(conv_mod, "_conv", forbidden)
    want = _value_and_grads(lax.conv_general_dilated, x, w, strides, padding, **kwargs)
    got = _value_and_grads(conv_general_dilated, x, w, strides, padding, **kwargs)
    for g, e in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(e, np.float32))


def test_mixed_dtypes_fall_back():
    x = jnp.ones((1, 5, 5, 2), jnp.bfloat16)
    w = jnp.ones((3, 3, 2, 2), jnp.float32)
    assert conv_forward.geometry_of(x, w, (1, 1), "SAME", None, None, NHWC, 1, 1,
                              None, None, None) is None


# --- choosing the implementation ----------------------------------------------------------


def test_default_follows_the_backend(monkeypatch):
    monkeypatch.delenv("NNX_TRAINER_CONV_IMPL", raising=False)
    assert default_conv_for_backend("cpu") is conv_general_dilated
    assert default_conv_for_backend("gpu") is lax.conv_general_dilated
    assert default_conv_for_backend("tpu") is lax.conv_general_dilated
    assert default_conv_for_backend() is default_conv_for_backend(jax.default_backend())


def _traced_primitives(conv) -> list[str]:
    """The primitives ``conv`` traces to (a fresh function each time: no trace cache hit)."""
    x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
    jaxpr = jax.make_jaxpr(lambda a, b: conv(a, b, (1, 1), "SAME", dimension_numbers=NHWC))(x, w)
    return [eqn.primitive.name for eqn in jaxpr.eqns]


def test_the_environment_overrides_what_auto_picks(monkeypatch):
    monkeypatch.setenv("NNX_TRAINER_CONV_IMPL", "xla")
    assert default_conv_for_backend("cpu") is lax.conv_general_dilated
    # "auto" decides when traced, so the variable counts at trace time.
    assert _traced_primitives(resolve_conv_impl("auto")) == ["conv_general_dilated"]
    assert resolve_conv_impl("custom") is conv_general_dilated  # an explicit choice wins
    monkeypatch.setenv("NNX_TRAINER_CONV_IMPL", "custom")
    assert _traced_primitives(resolve_conv_impl("auto")) == ["custom_vjp_call"]
    monkeypatch.setenv("NNX_TRAINER_CONV_IMPL", "Custom")
    assert default_conv_for_backend("gpu") is conv_general_dilated
    monkeypatch.setenv("NNX_TRAINER_CONV_IMPL", "cudnn")
    with pytest.raises(ValueError, match="NNX_TRAINER_CONV_IMPL='cudnn': choose xla or custom"):
        default_conv_for_backend("cpu")


def test_resolve_conv_impl(monkeypatch):
    monkeypatch.delenv("NNX_TRAINER_CONV_IMPL", raising=False)
    assert resolve_conv_impl("xla") is lax.conv_general_dilated
    assert resolve_conv_impl("custom") is conv_general_dilated
    assert resolve_conv_impl("auto") is auto_conv_general_dilated
    # Traced on this (CPU) backend: the engine's convolution, with its custom VJP.
    expected = "custom_vjp_call" if jax.default_backend() == "cpu" else "conv_general_dilated"
    assert _traced_primitives(resolve_conv_impl("auto")) == [expected]
    with pytest.raises(ValueError, match="unknown conv_impl 'fast'.*auto, xla, custom"):
        resolve_conv_impl("fast")


# --- a whole train step ---------------------------------------------------------------------


def _tiny_resnet_grads(conv_impl: str, dtype) -> tuple:
    from resnet_task.models import BottleneckBlock, ResNet

    # Every kind of convolution ResNets have: the ImageNet stem's 7x7/2 (then max-pool), and
    # bottlenecks' 1x1, 3x3 at strides 1 and 2, and 1x1 projections at strides 1 and 2;
    # 16x16 images leave 4x4, 2x2 and 1x1 for the stages, as ResNet-50 at 64x64 leaves
    # 16x16 .. 2x2: 3x3/2 from 4x4 to 2x2 and from 2x2 to 1x1, 3x3 over 2x2 and over 1x1
    # (kernel larger than the image: the forward router's regions path).
    model = ResNet((1, 2, 2), BottleneckBlock, num_classes=3, stem="imagenet", width=4,
                   conv_impl=conv_impl, dtype=dtype, param_dtype=dtype,
                   rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
    model.train()  # batch statistics, as in a train step
    images = jnp.asarray(np.random.default_rng(0).standard_normal((4, 16, 16, 3)), dtype)
    labels = jnp.asarray([0, 1, 2, 1])

    @nnx.jit
    def step(model):
        def loss_fn(model):
            logits = model(images).astype(dtype)
            return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(4), labels])
        return nnx.value_and_grad(loss_fn)(model)

    loss, grads = step(model)
    return float(loss), jax.tree.leaves(grads)


# nnx.BatchNorm keeps float32 running statistics, which float64 updates warn about.
@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types")
@pytest.mark.filterwarnings("ignore:Explicitly requested dtype float64")
@pytest.mark.parametrize(("dtype", "forced"), [
    ("float64", True), ("float32", True), ("float32", False)],
    ids=["float64-custom-forms", "float32-custom-forms", "float32-as-routed"])
def test_resnet_train_step_gradients_match_autodiff(dtype, forced, monkeypatch):
    # float64 shows the formulations are exact (any difference is rounding); float32 is the
    # real step, where batch norm over 4 images of 2x2 and 1x1 pixels amplifies rounding
    # ~100x (1.4e-4 seen on the head's 4 gradients).
    # "custom forms": the shifted-product kernel gradient and stride-phase input gradient
    # forced on every layer; "as routed": every choice as the measured rules make it.
    if forced:
        monkeypatch.setattr(conv_gradients, "shifted_products_pay", lambda *a: True)
        monkeypatch.setattr(conv_gradients, "phases_pay", lambda *a: True)
    tol = {"float64": 1e-12, "float32": 5e-4}[dtype]
    with jax.enable_x64(dtype == "float64"):
        (loss_x, grads_x), (loss_c, grads_c) = (
            _tiny_resnet_grads(impl, jnp.dtype(dtype)) for impl in ("xla", "custom"))
    np.testing.assert_allclose(loss_c, loss_x, rtol=tol)
    assert len(grads_x) == len(grads_c) > 10
    for gx, gc in zip(grads_x, grads_c, strict=True):
        assert gc.dtype == gx.dtype == jnp.dtype(dtype)
        scale = max(float(jnp.max(jnp.abs(gx))), 1e-30)
        np.testing.assert_allclose(np.asarray(gc) / scale, np.asarray(gx) / scale, atol=tol)
