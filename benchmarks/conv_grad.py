"""Convolution gradients on XLA:CPU: ``nnx_trainer.conv`` versus XLA's autodiff.

Two measurements, each in its own child process:

* ``convs``: every convolution shape of ResNet-18 (CIFAR stem) at batch 128, forward +
  backward (input and kernel gradients for a fixed random cotangent), XLA's autodiff of
  ``jax.lax.conv_general_dilated`` versus ``nnx_trainer.conv.conv_general_dilated``,
  in paired rounds; the relative gradient error (max |ours - XLA| / max |XLA|); and the
  compiled program's temporary buffers (XLA's ``memory_analysis``).
* ``step``: a whole ResNet-18 (CIFAR stem) train step at batch 128 (the benchmarks'
  hand ``jax.jit`` loop: SGD Nesterov + weight decay, ``ResNetTask``'s loss), one model
  per implementation in one process, rounds alternating, images/s ratio per round.

Then one short child per implementation (compile + 2 steps) for its peak RSS (``wait4``).
``--explore`` adds the formulations that were measured and not chosen: the kernel
gradient over the whole batch at once (the first prototype) and as one im2col product
per chunk, other chunk sizes, and the input gradient at stride 2 by stride phases.

    python benchmarks/conv_grad.py              # ~4 min on a 2-core VM
    python benchmarks/conv_grad.py --explore
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import harness

SCRIPT = Path(__file__).resolve()

# (label, image side, Cin, Cout, kernel, stride, padding, how many in ResNet-18 CIFAR)
RESNET18_CONVS = [
    ("stem 3x3", 32, 3, 64, 3, 1, ((1, 1), (1, 1)), 1),
    ("stage1 3x3", 32, 64, 64, 3, 1, ((1, 1), (1, 1)), 4),
    ("stage2 3x3/2", 32, 64, 128, 3, 2, ((1, 1), (1, 1)), 1),
    ("stage2 1x1/2", 32, 64, 128, 1, 2, "VALID", 1),
    ("stage2 3x3", 16, 128, 128, 3, 1, ((1, 1), (1, 1)), 3),
    ("stage3 3x3/2", 16, 128, 256, 3, 2, ((1, 1), (1, 1)), 1),
    ("stage3 1x1/2", 16, 128, 256, 1, 2, "VALID", 1),
    ("stage3 3x3", 8, 256, 256, 3, 1, ((1, 1), (1, 1)), 3),
    ("stage4 3x3/2", 8, 256, 512, 3, 2, ((1, 1), (1, 1)), 1),
    ("stage4 1x1/2", 8, 256, 512, 1, 2, "VALID", 1),
    ("stage4 3x3", 4, 512, 512, 3, 1, ((1, 1), (1, 1)), 3),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype of the single-convolution table and the step")
    p.add_argument("--rounds", type=int, default=3, help="paired rounds per convolution")
    p.add_argument("--step-rounds", type=int, default=3, help="paired rounds of the train step")
    p.add_argument("--steps", type=int, default=2, help="train steps per round")
    p.add_argument("--skip-step", action="store_true", help="only the single convolutions")
    p.add_argument("--skip-rss", action="store_true", help="no peak-RSS children")
    p.add_argument("--explore", action="store_true",
                   help="also the formulations not chosen (kernel gradient: whole batch, "
                        "im2col, chunk sizes; input gradient: stride phases)")
    harness.add_common_arguments(p)
    p.add_argument("--_worker", choices=["convs", "step", "rss"], help=argparse.SUPPRESS)
    p.add_argument("--impl", default="custom", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def sizes(args: argparse.Namespace) -> dict:
    """Batch, image side and width: the real ones or tiny ones for ``--quick``."""
    if args.quick:
        return {"batch": 4, "scale": 4, "width": 4, "image": 8}
    return {"batch": args.batch_size, "scale": 1, "width": 64, "image": 32}


# ------------------------------------------------------------------ alternatives (--explore)


def _explore_fns(jnp, lax, conv_mod):
    """Formulations measured and not chosen, written against the same conventions."""

    def padded(x, w_shape, g_shape, strides, pads):
        kh, kw = w_shape[:2]
        _, ho, wo, _ = g_shape
        (pt, _), (pl, _) = pads
        nh, nw = (ho - 1) * strides[0] + kh, (wo - 1) * strides[1] + kw
        return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, nh - x.shape[1] - pt, 0),
                                                    (pl, nw - x.shape[2] - pl, 0), (0, 0, 0)))

    def taps(xc, w_shape, ho, wo, strides):
        kh, kw, ci, _ = w_shape
        sh, sw = strides
        return [lax.slice(xc, (0, i, j, 0),
                          (xc.shape[0], i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, ci),
                          (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]

    def kernel_grad_whole_batch(x, g, w_shape, strides, pads):
        """The prototype: kh*kw products, each over the whole batch."""
        kh, kw, ci, co = w_shape
        _, ho, wo, _ = g.shape
        xp = padded(x, w_shape, g.shape, strides, pads)
        g2 = g.reshape(-1, co)
        rows = [jnp.dot(t.reshape(-1, ci).T, g2, preferred_element_type=jnp.float32)
                for t in taps(xp, w_shape, ho, wo, strides)]
        return jnp.stack(rows).reshape(w_shape)

    def kernel_grad_im2col(x, g, w_shape, strides, pads, rows=1024):
        """One (rows, kh*kw*Cin)^T @ (rows, Cout) product per chunk of images."""
        kh, kw, ci, co = w_shape
        b, ho, wo, _ = g.shape
        xp = padded(x, w_shape, g.shape, strides, pads)
        chunk = max(1, min(b, rows // (ho * wo)))
        while b % chunk:
            chunk -= 1
        xs = xp.reshape(b // chunk, chunk, *xp.shape[1:])
        gs = g.reshape(b // chunk, chunk, ho, wo, co)

        def body(acc, xg):
            xc, gc = xg
            pat = jnp.concatenate(taps(xc, w_shape, ho, wo, strides), -1)
            return acc + jnp.dot(pat.reshape(-1, kh * kw * ci).T, gc.reshape(-1, co),
                                 preferred_element_type=jnp.float32), None

        acc, _ = lax.scan(body, jnp.zeros((kh * kw * ci, co), jnp.float32), (xs, gs))
        return acc.reshape(w_shape)

    def input_grad_phases(g, w, x_shape, strides, pads):
        """Stride s: s*s stride-1 convolutions of g with the kernel's phase sub-kernels.

        Input row y gets contributions from taps i = (y + pad) mod s (+ s m) only, so no
        zero-dilated copy of g is convolved; the phases are interleaved at the end.
        """
        s = strides[0]
        _, h, wdt, ci = x_shape
        b, ho, wo, _ = g.shape
        (pt, _), (pl, _) = pads
        qh, qw = -(-(h + pt) // s), -(-(wdt + pl) // s)
        rows = []
        for rh in range(s):
            row = []
            for rw in range(s):
                sub = w[rh::s, rw::s]
                if 0 in sub.shape[:2]:
                    row.append(jnp.zeros((b, qh, qw, ci), g.dtype))
                    continue
                sub = jnp.swapaxes(sub[::-1, ::-1], 2, 3)
                kh_r, kw_r = sub.shape[:2]
                row.append(lax.conv_general_dilated(
                    g, sub, (1, 1), ((kh_r - 1, qh - ho), (kw_r - 1, qw - wo)),
                    dimension_numbers=("NHWC", "HWIO", "NHWC")))
            rows.append(jnp.stack(row, axis=3))
        out = jnp.stack(rows, axis=3).transpose(0, 1, 3, 2, 4, 5).reshape(b, qh * s, qw * s, ci)
        return out[:, pt:pt + h, pl:pl + wdt]

    return kernel_grad_whole_batch, kernel_grad_im2col, input_grad_phases


# ------------------------------------------------------------------------------ workers


def _measure_conv(args, sz, label, side, ci, co, k, s, pad, count) -> dict:
    """One ResNet-18 convolution shape: times, gradient errors and temp buffers."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    from nnx_trainer import conv as conv_mod
    from nnx_trainer import conv_forward, conv_gradients

    dtype = jnp.dtype(args.dtype)
    dn = ("NHWC", "HWIO", "NHWC")
    side = max(side // sz["scale"], 2)
    ci, co = max(ci // sz["scale"], 1), max(co // sz["scale"], 1)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((sz["batch"], side, side, ci), np.float32), dtype)
    w = jnp.asarray(rng.standard_normal((k, k, ci, co), np.float32) * 0.05, dtype)
    y = lax.conv_general_dilated(x, w, (s, s), pad, dimension_numbers=dn)
    ct = jnp.asarray(rng.standard_normal(y.shape, np.float32), dtype)

    def xla_conv(a, b):
        return lax.conv_general_dilated(a, b, (s, s), pad, dimension_numbers=dn)

    def fwd_bwd(fn, x, w, ct):
        out, vjp = jax.vjp(lambda a, b: fn(a, b, (s, s), pad, dimension_numbers=dn), x, w)
        return (*vjp(ct), out)

    fns = {
        "xla": jax.jit(functools.partial(fwd_bwd, lax.conv_general_dilated)),
        "ours": jax.jit(functools.partial(fwd_bwd, conv_mod.conv_general_dilated)),
    }
    if args.explore:
        geo = conv_forward.geometry_of(x, w, (s, s), pad, None, None, dn, 1, 1, None, None, None)
        kg_whole, kg_im2col, ig_phases = _explore_fns(jnp, lax, conv_mod)
        strides, pads = geo.strides, geo.padding
        fns["kgrad xla"] = jax.jit(
            lambda x, w, ct: jax.vjp(lambda b: xla_conv(x, b), w)[1](ct))
        fns["kgrad ours"] = jax.jit(
            lambda x, w, ct: conv_gradients.kernel_grad(x, ct, w.shape, geo))
        fns["kgrad whole-batch"] = jax.jit(
            lambda x, w, ct: kg_whole(x, ct, w.shape, strides, pads))
        fns["kgrad im2col/chunk"] = jax.jit(
            lambda x, w, ct: kg_im2col(x, ct, w.shape, strides, pads))
        fns["kgrad im2col/chunk 4096 rows"] = jax.jit(
            lambda x, w, ct: kg_im2col(x, ct, w.shape, strides, pads, rows=4096))

        def chunked(x, w, ct, nbytes):
            saved, conv_gradients.CHUNK_BYTES = conv_gradients.CHUNK_BYTES, nbytes
            try:  # the chunk size is read while tracing
                return conv_gradients.kernel_grad(x, ct, w.shape, geo)
            finally:
                conv_gradients.CHUNK_BYTES = saved

        for kib in (256, 4096, 1 << 16):
            fns[f"kgrad ours chunk={kib}KiB"] = jax.jit(
                functools.partial(chunked, nbytes=kib << 10))
        fns["xgrad xla"] = jax.jit(
            lambda x, w, ct: jax.vjp(lambda a: xla_conv(a, w), x)[1](ct))
        if s > 1:
            fns["xgrad phases"] = jax.jit(
                lambda x, w, ct: ig_phases(ct, w, x.shape, strides, pads))
    outs = {name: fn(x, w, ct) for name, fn in fns.items()}  # compile + warm up

    def rel(a, b):
        a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
        return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30))

    ref, ours = outs["xla"], outs["ours"]
    errors = {"dx": rel(ref[0], ours[0]), "dw": rel(ref[1], ours[1]),
              "out": rel(ref[2], ours[2])}
    for name, got in outs.items():
        if name.startswith("kgrad") and name != "kgrad xla":
            errors[name] = rel(outs["kgrad xla"][0], got)
        if name == "xgrad phases":
            errors[name] = rel(outs["xgrad xla"][0], got)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(x, w, ct))
            times[name].append(time.perf_counter() - start)
    temp = {name: fns[name].lower(x, w, ct).compile().memory_analysis().temp_size_in_bytes
            for name in ("xla", "ours")}
    return {
        "label": label, "shape": f"{sz['batch']}x{side}x{side}x{ci}->{co} k{k} s{s}",
        "count": count, "ms": {n: 1e3 * min(t) for n, t in times.items()},
        "errors": errors, "temp_mib": {n: b / 2**20 for n, b in temp.items()},
    }


def worker_convs(args: argparse.Namespace) -> None:
    sz = sizes(args)
    rows = []
    for spec in RESNET18_CONVS:
        rows.append(_measure_conv(args, sz, *spec))
        print(f"  {spec[0]}: xla {rows[-1]['ms']['xla']:.0f} ms, ours "
              f"{rows[-1]['ms']['ours']:.0f} ms", file=sys.stderr, flush=True)
    harness.emit_result({"convs": rows})


def _hand_loop(impl: str, args: argparse.Namespace):
    import jax.numpy as jnp
    import workloads

    sz = sizes(args)
    images, labels = workloads.synthetic_arrays(2 * sz["batch"], sz["image"])
    spec = workloads.ModelSpec("resnet18", "cifar", (("width", sz["width"]), ("conv_impl", impl)))

    class Task(workloads.InMemoryResNetTask):
        # What Trainer(precision="bf16") would ask for: bfloat16 compute, float32 params.
        compute_dtype = property(lambda self: jnp.dtype(args.dtype))

    task = Task(images, labels, spec)
    batches = workloads.device_batches(images, labels, sz["batch"])
    start = time.perf_counter()
    loop = workloads.HandLoop(task, batches, total_steps=1000)
    return loop, time.perf_counter() - start


def worker_step(args: argparse.Namespace) -> None:
    import jax

    sz = sizes(args)
    loops, compile_s, first_loss = {}, {}, {}
    for impl in ("xla", "custom"):
        loops[impl], compile_s[impl] = _hand_loop(impl, args)
        # The loss after one update (the compiling step), same weights and batches for both:
        # equal losses mean the two implementations' gradients moved the weights alike.
        first_loss[impl] = float(jax.device_get(loops[impl]._step(loops[impl].batches[1])))
        loops[impl]._index = 0
    rates: dict[str, list[float]] = {impl: [] for impl in loops}
    cpu: dict[str, list[float]] = {impl: [] for impl in loops}
    for _ in range(args.step_rounds):
        for impl, loop in loops.items():
            seconds = loop.run(args.steps)
            rates[impl].append(args.steps * sz["batch"] / seconds)
            cpu[impl].append(loop.cpu_seconds_per_step)
    ratios = [c / x for c, x in zip(rates["custom"], rates["xla"], strict=True)]
    harness.emit_result({
        "rates": rates, "ratio": statistics.median(ratios), "ratios": ratios,
        "cpu_s_per_step": {k: statistics.median(v) for k, v in cpu.items()},
        "compile_s": compile_s, "second_step_loss": first_loss,
        "loss_rel_diff": abs(first_loss["custom"] - first_loss["xla"])
        / max(abs(first_loss["xla"]), 1e-30),
    })


def worker_rss(args: argparse.Namespace) -> None:
    loop, compile_s = _hand_loop(args.impl, args)
    seconds = loop.run(args.steps)
    harness.emit_result({"impl": args.impl, "compile_s": compile_s,
                         "images_per_s": args.steps * sizes(args)["batch"] / seconds})


# --------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    harness.prepare_runtime(quick=args.quick)
    if args._worker == "convs":
        return worker_convs(args)
    if args._worker == "step":
        return worker_step(args)
    if args._worker == "rss":
        return worker_rss(args)

    harness.print_header("conv gradients: nnx_trainer.conv vs XLA autodiff", args)
    common = [f"--batch-size={args.batch_size}", f"--dtype={args.dtype}",
              f"--rounds={args.rounds}", f"--step-rounds={args.step_rounds}",
              f"--steps={args.steps}"] + (["--quick"] if args.quick else []) \
        + (["--explore"] if args.explore else [])
    argv0 = harness.this_script_argv(SCRIPT, *common)

    convs = harness.child_result([*argv0, "--_worker", "convs"])["convs"]
    print(f"\nSingle convolutions, {args.dtype}, forward + backward (dx, dW), ms "
          f"(best of {args.rounds} paired rounds); error = max|ours - XLA| / max|XLA|; "
          "temp = the compiled program's temporary buffers")
    print(f"{'conv':14s} {'shape':26s} {'n':>2s} {'XLA':>7s} {'ours':>7s} {'speed-up':>8s} "
          f"{'err dx':>8s} {'err dW':>8s} {'temp XLA':>9s} {'temp ours':>9s}")
    total = {"xla": 0.0, "ours": 0.0}
    for r in convs:
        ms, e, t = r["ms"], r["errors"], r["temp_mib"]
        for k in total:
            total[k] += r["count"] * ms[k]
        print(f"{r['label']:14s} {r['shape']:26s} {r['count']:2d} {ms['xla']:7.0f} "
              f"{ms['ours']:7.0f} {ms['xla'] / ms['ours']:7.2f}x {e['dx']:8.1e} {e['dw']:8.1e} "
              f"{t['xla']:8.1f}M {t['ours']:8.1f}M")
    print(f"{'sum over ResNet-18 (x n)':44s} {total['xla']:7.0f} {total['ours']:7.0f} "
          f"{total['xla'] / total['ours']:7.2f}x")
    if args.explore:
        print("\nFormulations not chosen (ms, best of the rounds; error vs XLA's gradient):")
        for r in convs:
            extra = {n: v for n, v in r["ms"].items() if n not in ("xla", "ours")}
            print(f"{r['label']:14s} " + "  ".join(
                f"{n} {v:.0f}" + (f" ({r['errors'][n]:.0e})" if n in r["errors"] else "")
                for n, v in extra.items()))

    if not args.skip_step:
        step = harness.child_result([*argv0, "--_worker", "step"])
        print(f"\nResNet-18 CIFAR-stem train step, batch {sizes(args)['batch']}, {args.dtype}, "
              f"hand jax.jit loop, {args.step_rounds} paired rounds of {args.steps} steps "
              "in one process:")
        for impl in ("xla", "custom"):
            rates = ", ".join(f"{v:.2f}" for v in step["rates"][impl])
            print(f"  {impl:6s}: images/s {rates}  (CPU {step['cpu_s_per_step'][impl]:.1f} "
                  f"s/step, compile+first step {step['compile_s'][impl]:.1f} s, "
                  f"loss after one update {step['second_step_loss'][impl]:.6f})")
        print(f"  ratio custom/xla: {step['ratio']:.2f} (per round: "
              + ", ".join(f"{v:.2f}" for v in step["ratios"])
              + f"); loss relative difference {step['loss_rel_diff']:.1e}")
        result_line = f"ratio custom/xla (train step images/s) {step['ratio']:.2f}; "
        if not args.skip_rss:
            print("  peak RSS, one child per implementation (compile + "
                  f"{args.steps} steps):")
            for impl in ("xla", "custom"):
                done = harness.child_result([*argv0, "--_worker", "rss", "--impl", impl])
                print(f"    {impl:6s}: {done['peak_rss_mib']:.0f} MiB "
                      f"(images/s {done['images_per_s']:.2f})")
    else:
        result_line = ""
    print(f"\nresult: {result_line}single convolutions summed over ResNet-18: "
          f"{total['xla'] / total['ours']:.2f}x")


if __name__ == "__main__":
    main()
