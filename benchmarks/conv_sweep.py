"""Every distinct ResNet convolution: XLA, ``nnx_trainer.conv`` and PyTorch, one run.

The shapes are read from the models themselves (each model is traced abstractly and its
``conv_general_dilated`` calls collected): ResNet-18/34/50/101/152 with the ImageNet and
the CIFAR stem, and the CIFAR ResNet-20..110, at each ``--sizes`` input side; identical
convolutions are measured once and listed with the models that use them.

Per shape and dtype, in paired rounds (XLA, ours, PyTorch interleaved, best of each):

* ``fwd``: the forward convolution; ``bwd``: the input and kernel gradients for a fixed
  cotangent (JAX: the VJP's backward, forward pruned; PyTorch:
  ``aten.convolution_backward``), float32 and bfloat16.

Printed per shape: XLA ms, ours ms, PyTorch ms, ours/PyTorch (time: above 1 is slower),
and the path ``nnx_trainer.conv`` takes. ``--forward-paths`` instead times every forward
formulation ``nnx_trainer.conv`` can route to (its ``FORWARD_PATHS``), which is how the
forward routing rule was chosen.

    python benchmarks/conv_sweep.py --quick                     # a handful of shapes
    python benchmarks/conv_sweep.py --models resnet50 --sizes 64 --dtype float32
    python benchmarks/conv_sweep.py                             # everything (hours)
    python benchmarks/conv_sweep.py --quick --forward-paths
    python benchmarks/conv_sweep.py --list                      # the shapes, no timing
    python benchmarks/conv_sweep.py --step resnet50/imagenet/64 # a whole gradient step

``--step`` compiles one model's gradient step once per variant in one process (XLA's
convolution, ours, ours with one routing rule or tie undone, ours compiled with XLA:CPU's
legacy loop emitters) and times them in paired rounds, with each program's temporary
buffers (``memory_analysis``).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
from collections.abc import Callable
from unittest import mock

import harness

TORCHVISION_STYLE = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
CIFAR_FAMILY = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
ALL_MODELS = TORCHVISION_STYLE + CIFAR_FAMILY
# --quick: ResNet-50 at 64x64 has every kind of routed convolution: the 7x7/2 stem, 1x1
# at every stage (strides 1 and 2), 3x3 at 16x16 .. 2x2 (kernel larger than the image).
QUICK = dict(models=("resnet50",), stems=("imagenet",), sizes=(64,))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--models", default=",".join(ALL_MODELS),
                   help="comma-separated model names")
    p.add_argument("--stems", default="imagenet,cifar",
                   help="stems of the torchvision-style ResNets (CIFAR ResNets: cifar only)")
    p.add_argument("--sizes", default="32,64,112,224", help="comma-separated input sides")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="both")
    p.add_argument("--pass", dest="passes", choices=["fwd", "bwd", "both"], default="both")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="paired rounds per shape")
    p.add_argument("--min-time", type=float, default=0.1,
                   help="seconds per timed block (calls are repeated up to this)")
    p.add_argument("--forward-paths", action="store_true",
                   help="time every forward formulation instead (XLA, im2col, shifted)")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch")
    p.add_argument("--quick", action="store_true",
                   help="ResNet-50 (ImageNet stem) at 64x64 only: a handful of shapes")
    p.add_argument("--only", default="",
                   help="regular expression: only the shapes whose description matches, "
                        "e.g. '^3x3/1' or ' 2x2 '")
    p.add_argument("--max-shapes", type=int, default=0, help="stop after this many shapes")
    p.add_argument("--list", action="store_true", help="only list the distinct shapes")
    p.add_argument("--step", metavar="MODEL/STEM/SIZE",
                   help="instead: one model's gradient step (e.g. resnet50/imagenet/64 at "
                        "--batch-size), XLA's convolution vs ours vs ours with XLA's forward "
                        "(the routing off) vs ours without the rows path vs ours without the "
                        "regions path vs ours without the kernel gradient by chunks vs ours "
                        "with every kernel-gradient product as x^T g vs ours without the "
                        "input gradient waiting for the products' kernel gradient, paired "
                        "rounds in one process")
    p.add_argument("--dw-orders", action="store_true",
                   help="instead: for each shape whose kernel gradient runs as products "
                        "(per tap or kernel row), those products as x^T g and as g^T x, "
                        "paired rounds (conv_gradients.output_grad_first)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------- shapes


def _conv_calls(jaxpr) -> list:
    """Every ``conv_general_dilated`` equation in ``jaxpr`` and the jaxprs it calls."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            found.append(eqn)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found.extend(_conv_calls(inner))
    return found


def model_convs(name: str, stem: str, size: int) -> list[tuple]:
    """``(h, w, cin, cout, kh, kw, strides, padding)`` of each convolution call, in order."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from resnet_task.models import create_model

    def build():
        return create_model(name, num_classes=10, stem=stem, conv_impl="xla",
                            rngs=nnx.Rngs(0))

    graphdef, state = nnx.split(nnx.eval_shape(build))
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, images).jaxpr
    shapes = []
    for eqn in _conv_calls(jaxpr):
        x, w = (v.aval.shape for v in eqn.invars[:2])
        strides = tuple(eqn.params["window_strides"])
        padding = tuple(tuple(p) for p in eqn.params["padding"])
        shapes.append((x[1], x[2], x[3], w[3], w[0], w[1], strides, padding))
    return shapes


def distinct_shapes(args: argparse.Namespace) -> dict[tuple, list[str]]:
    """Each distinct convolution -> the ``model/stem/size`` entries that use it (ordered)."""
    models = QUICK["models"] if args.quick else tuple(args.models.split(","))
    stems = QUICK["stems"] if args.quick else tuple(args.stems.split(","))
    sizes = QUICK["sizes"] if args.quick else tuple(int(s) for s in args.sizes.split(","))
    for m in models:
        if m not in ALL_MODELS:
            raise SystemExit(f"unknown model {m!r}; choose from {', '.join(ALL_MODELS)}")
    users: dict[tuple, list[str]] = {}
    for m in models:
        for stem in (stems if m in TORCHVISION_STYLE else ("cifar",)):
            for size in sizes:
                for shape in model_convs(m, stem, size):
                    tag = f"{m}/{stem}/{size}"
                    if tag not in users.setdefault(shape, []):
                        users[shape].append(tag)
    if args.quick:
        users = {s: users[s] for s in _quick_pick(list(users))}
    if args.only:
        users = {s: u for s, u in users.items() if re.search(args.only, describe(s))}
    if args.max_shapes:
        users = dict(list(users.items())[: args.max_shapes])
    return users


def _quick_pick(shapes: list[tuple]) -> list[tuple]:
    """A handful of ResNet-50 64x64 shapes, one per routing case: every stride-1 3x3
    (16x16 .. 2x2, the last larger-than-image), the largest and smallest stride-1 1x1, a
    strided 1x1 and 3x3, and the 7x7/2 stem."""
    def pick(pred, key, n=1):
        return sorted((s for s in shapes if pred(s)), key=key)[:n]

    three = pick(lambda s: s[4] == 3 and s[6] == (1, 1), lambda s: -s[0], 4)
    ones = pick(lambda s: s[4] == 1 and s[6] == (1, 1), lambda s: (-s[0], -s[2] * s[3]))
    ones += pick(lambda s: s[4] == 1 and s[6] == (1, 1), lambda s: (s[0], -s[2] * s[3]))
    strided = pick(lambda s: s[4] == 1 and s[6] != (1, 1), lambda s: s[0])
    strided += pick(lambda s: s[4] == 3 and s[6] != (1, 1), lambda s: s[0])
    return three + ones + strided + pick(lambda s: s[4] == 7, lambda s: s[0])


def describe(shape: tuple) -> str:
    h, w, ci, co, kh, kw, (sh, _), ((pt, _), _) = shape
    return f"{kh}x{kw}/{sh} p{pt} {h}x{w} {ci}->{co}"


# ------------------------------------------------------------------------- timing


def best_ms(fns: dict[str, Callable[[], object]], rounds: int, min_time: float) -> dict:
    """Best time per call (ms) of each zero-argument function, interleaved by round."""
    reps = {}
    for name, fn in fns.items():
        fn()  # compile / warm
        t = time.perf_counter()
        fn()
        one = time.perf_counter() - t
        reps[name] = max(1, min(50, int(min_time / max(one, 1e-6))))
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t) / reps[name] * 1e3)
    return best


def jax_fns(shape: tuple, batch: int, dtype_name: str, which: str) -> dict:
    """Zero-argument callables for XLA and ours (or every forward path), blocking."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    from nnx_trainer import conv as conv_mod
    from nnx_trainer import conv_forward

    h, w, ci, co, kh, kw, strides, padding = shape
    dtype = jnp.dtype(dtype_name)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, h, w, ci), np.float32), dtype)
    k = jnp.asarray(rng.standard_normal((kh, kw, ci, co), np.float32) / (kh * kw * ci) ** 0.5,
                    dtype)
    nhwc = ("NHWC", "HWIO", "NHWC")

    def conv_with(fn):
        return lambda a, b: fn(a, b, strides, padding, dimension_numbers=nhwc)

    y = jax.eval_shape(conv_with(lax.conv_general_dilated), x, k)
    ct = jnp.asarray(rng.standard_normal(y.shape, np.float32), dtype)
    impls = {"xla": lax.conv_general_dilated, "ours": conv_mod.conv_general_dilated}
    if which == "paths":
        geo = conv_forward.Geometry(strides, padding, None)
        compiled = {name: jax.jit(lambda a, b, f=f: f(a, b, geo))
                    for name, f in conv_forward.FORWARD_PATHS.items()}
        return {name: (lambda f=f: jax.block_until_ready(f(x, k))) for name, f in
                compiled.items()}
    if which == "fwd":
        compiled = {name: jax.jit(conv_with(f)) for name, f in impls.items()}
        return {name: (lambda f=f: jax.block_until_ready(f(x, k))) for name, f in
                compiled.items()}

    def backward(f):
        def run(a, b, c):
            _, vjp = jax.vjp(conv_with(f), a, b)
            return vjp(c)
        return jax.jit(run)

    compiled = {name: backward(f) for name, f in impls.items()}
    return {name: (lambda f=f: jax.block_until_ready(f(x, k, ct))) for name, f in
            compiled.items()}


def torch_fn(shape: tuple, batch: int, dtype_name: str, which: str) -> Callable[[], object]:
    """PyTorch's own convolution (NCHW, as its models run by default) for the same shape."""
    import torch

    h, w, ci, co, kh, kw, strides, padding = shape
    if any(lo != hi for lo, hi in padding):
        raise ValueError(f"asymmetric padding {padding}: not a PyTorch Conv2d")
    pads = [lo for lo, _ in padding]
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, ci, h, w, generator=gen).to(dtype)
    k = (torch.randn(co, ci, kh, kw, generator=gen) / (kh * kw * ci) ** 0.5).to(dtype)
    if which == "fwd":
        def fwd():
            with torch.no_grad():
                return torch.nn.functional.conv2d(x, k, None, strides, pads)
        return fwd
    ct = torch.randn(fwd_shape := torch.nn.functional.conv2d(x, k, None, strides, pads).shape,
                     generator=gen).to(dtype)
    del fwd_shape

    def bwd():
        with torch.no_grad():
            return torch.ops.aten.convolution_backward(
                ct, x, k, None, list(strides), pads, [1, 1], False, [0, 0], 1,
                [True, True, False])
    return bwd


def gradient_geometry(shape: tuple, batch: int) -> tuple:
    """``(geometry, x_shape, w_shape, g_shape)`` of a sweep shape at ``batch``."""
    from nnx_trainer import conv_forward as fwd_mod

    h, w, ci, co, kh, kw, strides, padding = shape
    ho = fwd_mod.out_size(h, kh, strides[0], padding[0])
    wo = fwd_mod.out_size(w, kw, strides[1], padding[1])
    return (fwd_mod.Geometry(strides, padding, None), (batch, h, w, ci), (kh, kw, ci, co),
            (batch, ho, wo, co))


def paths_taken(shape: tuple, batch: int, dtype: str) -> tuple[str, str]:
    """The forward path and the backward's (input gradient, kernel gradient) forms."""
    from nnx_trainer import conv_forward as fwd_mod
    from nnx_trainer import conv_gradients as grad_mod

    geo, x_shape, w_shape, g_shape = gradient_geometry(shape, batch)
    fwd = fwd_mod.forward_path(x_shape, w_shape, geo, dtype)
    dx, dw = grad_mod.gradient_paths(x_shape, w_shape, g_shape, geo, dtype)
    return fwd, f"dx {dx}, dW {dw}"


# ------------------------------------------------------------------------- step


def _dw_order_times(shape: tuple, args: argparse.Namespace) -> tuple | None:
    """``(dw path, {order: ms}, chosen g_first)`` for a product-form kernel gradient, else
    None."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from nnx_trainer import conv_gradients

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    geo, x_shape, w_shape, g_shape = gradient_geometry(shape, args.batch_size)
    dw = conv_gradients.gradient_paths(x_shape, w_shape, g_shape, geo, dtype)[1]
    if dw not in ("taps", "rows"):
        return None
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape, np.float32), dtype)
    g = jnp.asarray(rng.standard_normal(g_shape, np.float32), dtype)
    real = conv_gradients.output_grad_first
    chosen = []

    def grad_fn(g_first: bool):
        def order(*a):
            chosen.append(real(*a))
            return g_first
        with mock.patch.object(conv_gradients, "output_grad_first", order):
            f = jax.jit(lambda a, b: conv_gradients.kernel_grad(
                a, b, w_shape, geo, by_rows=dw == "rows")).lower(x, g).compile()
        return lambda: jax.block_until_ready(f(x, g))

    fns = {"x^T g": grad_fn(False), "g^T x": grad_fn(True)}
    return dw, best_ms(fns, args.rounds, args.min_time), chosen[0]


def dw_orders(shapes: dict[tuple, list[str]], args: argparse.Namespace) -> list[dict]:
    """Each product-form kernel gradient timed with its products in both orders."""
    rows = []
    print(f"{'conv':28s} {'dW':5s} {'x^T g':>9s} {'g^T x':>9s} {'ratio':>6s}  chosen")
    for shape in shapes:
        timed = _dw_order_times(shape, args)
        if timed is None:
            continue
        dw, ms, chosen = timed
        print(f"{describe(shape):28s} {dw:5s} {ms['x^T g']:9.3f} {ms['g^T x']:9.3f} "
              f"{ms['g^T x'] / ms['x^T g']:6.2f}  {'g^T x' if chosen else 'x^T g'}",
              flush=True)
        rows.append(dict(shape=describe(shape), dw=dw, xtg=ms["x^T g"], gtx=ms["g^T x"],
                         chosen_g_first=bool(chosen)))
    if rows:
        picked = [min(r["xtg"], r["gtx"]) / (r["gtx"] if r["chosen_g_first"] else r["xtg"])
                  for r in rows]
        print(f"{len(rows)} shapes; the faster order's time over the chosen one's: "
              f"worst {min(picked):.2f}, median {harness.median(picked):.2f}")
    return rows


def without_regions(route: Callable[..., str]) -> Callable[..., str]:
    """``route`` (``conv_forward.forward_path``) as it chose before the regions path: im2col
    where the kernel is larger than the image, else XLA's; bfloat16 shifted products."""
    import jax.numpy as jnp

    from nnx_trainer.conv_forward import kernel_exceeds_image

    def old_route(x_shape, w_shape, geo, dtype=None) -> str:
        path = route(x_shape, w_shape, geo, dtype)
        if path != "regions":
            return path
        if dtype is not None and jnp.dtype(dtype) == jnp.bfloat16:
            return "shifted"
        return "im2col" if kernel_exceeds_image(x_shape, w_shape) else "xla"
    return old_route


def step_comparison(args: argparse.Namespace) -> dict:
    """A whole gradient step (train-mode batch norm) per convolution variant."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from nnx_trainer import conv_forward, conv_gradients
    from resnet_task.models import create_model

    name, stem, size = args.step.split("/")
    batch = args.batch_size
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, int(size), int(size), 3)),
                    jnp.float32)
    y = jnp.asarray(np.arange(batch) % 10, jnp.int32)
    # Compute dtype (parameters stay float32): --dtype bfloat16, else float32.
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    # Each variant's replacements for routing rules, in place while its step is traced.
    variants = {
        "xla": {}, "ours": {},
        "ours, XLA forward": {(conv_forward, "forward_path"): lambda *a: "xla"},
        "ours, no rows": {(conv_forward, "row_products_pay"): lambda *a: False},
        "ours, no regions": {(conv_forward, "forward_path"):
                             without_regions(conv_forward.forward_path)},
        "ours, no dW chunks": {(conv_gradients, "xla_kernel_grad_chunk"): lambda *a: None},
        "ours, dW x^T g": {(conv_gradients, "output_grad_first"): lambda *a: False},
        "ours, dW untied": {(conv_gradients, "computed_after"): lambda value, _: value},
        "ours, legacy emitters": {},
    }
    # Each variant's XLA compile options: XLA:CPU's older loop emitters instead of its
    # fusion emitters, which hold every fusion's LLVM module until the end of the compile
    # (benchmarks/README.md, "XLA's fusion emitters and the compile's peak").
    compiler_options = {"ours, legacy emitters": {"xla_cpu_use_fusion_emitters": False}}
    calls = {}
    for variant, replaced in variants.items():
        model = create_model(name, num_classes=10, stem=stem, rngs=nnx.Rngs(0), dtype=dtype,
                             conv_impl="xla" if variant == "xla" else "custom")
        model.train()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def grads(p, r, x, y, graphdef=graphdef):
            def loss(m):
                logp = jax.nn.log_softmax(m(x))
                return -jnp.mean(jnp.take_along_axis(logp, y[:, None], 1))
            return nnx.grad(loss)(nnx.merge(graphdef, p, r))

        # The route is read when the step is traced, i.e. while it is compiled here.
        with contextlib.ExitStack() as stack:
            for (module, attribute), replacement in replaced.items():
                stack.enter_context(mock.patch.object(module, attribute, replacement))
            t = time.perf_counter()
            compiled = jax.jit(grads).lower(params, rest, x, y).compile(
                compiler_options=compiler_options.get(variant))
        temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
        jax.block_until_ready(compiled(params, rest, x, y))
        print(f"  {variant:18s} compile + first step {time.perf_counter() - t:5.1f} s, "
              f"temp buffers {temp:7.1f} MiB", flush=True)
        calls[variant] = lambda c=compiled, p=params, r=rest: jax.block_until_ready(
            c(p, r, x, y))
    ms = best_ms(calls, args.rounds, 0.0)
    line = ", ".join(f"{v} {t:.0f} ms" for v, t in ms.items())
    print(f"  best of {args.rounds} paired rounds: {line}")
    print("  " + ", ".join(f"ratio ours/{v} (time) {ms['ours'] / ms[v]:.3f}"
                           for v in variants if v != "ours"))
    return ms


# ------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.prepare_runtime()
    extra = () if args.no_torch else ("torch",)
    harness.print_header("ResNet convolutions: XLA vs nnx_trainer.conv vs PyTorch", args, extra)
    import jax  # noqa: F401  (after prepare_runtime)

    use_torch = not args.no_torch and not args.forward_paths
    if use_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("PyTorch not installed: its column is skipped (pip install '.[bench]')")
            use_torch = False
    if args.step:
        print(f"{args.step} gradient step, batch {args.batch_size}, "
              f"{'bfloat16' if args.dtype == 'bfloat16' else 'float32'} compute")
        harness.emit_result({"step_ms": step_comparison(args)})
        return 0
    shapes = distinct_shapes(args)
    if args.dw_orders:
        print(f"kernel gradients as products, batch {args.batch_size}, {args.dtype}, best of "
              f"{args.rounds} paired rounds, ms per call", flush=True)
        harness.emit_result({"dw_orders": dw_orders(shapes, args)})
        return 0
    if args.list:
        for shape, users in shapes.items():
            print(f"{describe(shape):28s} {' '.join(users)}")
        print(f"{len(shapes)} distinct convolutions")
        harness.emit_result({"shapes": len(shapes)})
        return 0
    dtypes = ("float32", "bfloat16") if args.dtype == "both" else (args.dtype,)
    passes = ("fwd",) if args.forward_paths else (
        ("fwd", "bwd") if args.passes == "both" else (args.passes,))
    print(f"{len(shapes)} distinct convolutions, batch {args.batch_size}, "
          f"best of {args.rounds} paired rounds, ms per call", flush=True)
    rows = []
    for dtype in dtypes:
        for which in passes:
            if args.forward_paths:
                from nnx_trainer.conv import FORWARD_PATHS
                cols = [*FORWARD_PATHS, "best/xla"]
            else:
                cols = ["xla", "ours", "torch", "ours/torch", "ours/xla"]
            print(f"\n-- {which} {dtype} --")
            print(f"{'conv':28s} {'path':24s} " + " ".join(f"{c:>10s}" for c in cols)
                  + "  used by")
            for shape, users in shapes.items():
                fwd_path, bwd_path = paths_taken(shape, args.batch_size, dtype)
                fns = jax_fns(shape, args.batch_size, dtype,
                              "paths" if args.forward_paths else which)
                if use_torch:
                    fns["torch"] = torch_fn(shape, args.batch_size, dtype, which)
                ms = best_ms(fns, args.rounds, args.min_time)
                if args.forward_paths:
                    ms["best/xla"] = min(ms.values()) / ms["xla"]
                elif use_torch:
                    ms["ours/torch"] = ms["ours"] / ms["torch"]
                if not args.forward_paths:
                    ms["ours/xla"] = ms["ours"] / ms["xla"]
                cells = " ".join(
                    f"{ms[c]:10.3f}" if c in ms else f"{'-':>10s}" for c in cols)
                flag = "  >2x PyTorch" if ms.get("ours/torch", 0) > 2 else ""
                shown = users if len(users) <= 3 else [*users[:3], f"+{len(users) - 3}"]
                path = fwd_path if which == "fwd" else bwd_path
                print(f"{describe(shape):28s} {path:24s} {cells}  {' '.join(shown)}{flag}",
                      flush=True)
                rows.append(dict(shape=describe(shape), dtype=dtype, which=which, path=path,
                                 **{k.replace("/", "_"): v for k, v in ms.items()}))
    slow = [r for r in rows if r.get("ours_torch", 0) > 2]
    print(f"\n{len(rows)} rows; more than 2x slower than PyTorch: {len(slow)}")
    for r in slow:
        print(f"  {r['which']} {r['dtype']} {r['shape']} ({r['path']}): "
              f"ours/torch {r['ours_torch']:.2f}")
    if rows and "ours_torch" in rows[0]:
        ratios = [r["ours_torch"] for r in rows]
        print(f"ratio ours/torch (time) median {harness.median(ratios):.2f}, "
              f"max {max(ratios):.2f}")
    harness.emit_result({"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
