"""ResNet-18 training throughput: plain PyTorch versus ours (``Trainer.fit``), on this CPU.

The same network on both sides: ResNet-18 with the CIFAR stem (3x3 conv, no max-pool),
BasicBlocks [2, 2, 2, 2] with 1x1-conv + BatchNorm projection shortcuts, 10 classes,
synthetic 32x32x3 float32 images already in memory, batch 128, SGD with Nesterov
momentum 0.9 and weight decay 5e-4 (``ResNetTask``'s optimizer; PyTorch decays the
BatchNorm parameters too, which costs nothing measurable).

Each side runs in its own child process (so thread pools never compete and each peak
RSS is its own, read with ``wait4``):

* ``torch``: a plain PyTorch loop (``zero_grad / forward / backward / step``);
* ``jax-hand``: a hand ``jax.jit`` loop over device batches, the same math as ours,
  which separates the runtime's share of the gap from the Trainer's;
* ``jax-fit``: ours, ``Trainer.fit`` (default plugins) on an in-memory Grain dataset,
  timed within epochs after a warm-up epoch.

``--explore`` then measures what the runtimes allow without changing the model's
math: XLA flags, NCHW vs NHWC convolutions, matmul precision, one core vs two, thread
variables, batch sizes, and PyTorch's channels_last: ~25 more minutes here.
Besides wall time each child reports process CPU time per step (all threads), which
other work on the machine disturbs much less than wall time.

``--suite`` measures the three rows the README reports (ResNet-18 CIFAR 32² batch 128,
ResNet-50 64² batch 32, ResNet-50 224² batch 16) in one run and prints them as one
table; ``--precision bf16`` (or ``--suite --with-bf16``, an extra column) runs ours with
``Trainer(precision="bf16")``. ``--rounds N`` measures each side N times, interleaved, in
fresh processes, and reports medians; ``--warm-cache`` adds ours once more with its train
step read from JAX's persistent compilation cache (how a rerun starts by default), whose
peak RSS leaves out XLA's compile. ``vs_pytorch_paired.py`` measures the same sides in turns
instead, all three processes alive at once, which cancels the machine's own drift.

    python benchmarks/vs_pytorch.py                 # ~10 min on a 2-core CPU
    python benchmarks/vs_pytorch.py --suite --with-bf16
    python benchmarks/vs_pytorch.py --suite --rounds 2 --warm-cache
    python benchmarks/vs_pytorch.py --explore
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness

SCRIPT = Path(__file__).resolve()

# The README's rows: (model, image side, batch, timed steps). The steps give each side a
# timed window of 12-20 s on a 2-core CPU: ResNet-50 at 64² steps in ~0.6 s, where 6 steps
# (3.5 s) left the ratio to one process's luck (0.83-1.04 for the same code).
SUITE: list[tuple[str, int, int, int]] = [("resnet18", 32, 128, 6), ("resnet50", 64, 32, 24),
                                          ("resnet50", 224, 16, 6)]
DEFAULT_STEPS = 6  # for a configuration that is not a suite row

# (label, worker, XLA_FLAGS, extra environment, extra worker arguments)
EXPLORE_VARIANTS: list[tuple[str, str, str, dict, list[str]]] = [
    ("jax baseline", "jax-hand", "", {}, []),
    ("jax --xla_cpu_use_thunk_runtime=false", "jax-hand",
     "--xla_cpu_use_thunk_runtime=false", {}, []),
    ("jax --xla_cpu_multi_thread_eigen=false", "jax-hand",
     "--xla_cpu_multi_thread_eigen=false", {}, []),
    ("jax --xla_cpu_use_onednn=true", "jax-hand", "--xla_cpu_use_onednn=true", {}, []),
    ("jax --xla_cpu_experimental_onednn_custom_call=true", "jax-hand",
     "--xla_cpu_experimental_onednn_custom_call=true", {}, []),
    ("jax onednn fusion: individual_convolution", "jax-hand",
     "--xla_cpu_experimental_onednn_fusion_type=individual_convolution", {}, []),
    ("jax --xla_cpu_use_xnnpack=true", "jax-hand", "--xla_cpu_use_xnnpack=true", {}, []),
    ("jax xnn fusion: individual_convolution", "jax-hand",
     "--xla_cpu_experimental_xnn_fusion_type=individual_convolution", {}, []),
    ("jax ynn fusion: individual_convolution", "jax-hand",
     "--xla_cpu_experimental_ynn_fusion_type=individual_convolution", {}, []),
    ("jax ynn fusion + --xla_cpu_multi_thread_eigen=false", "jax-hand",
     "--xla_cpu_experimental_ynn_fusion_type=individual_convolution "
     "--xla_cpu_multi_thread_eigen=false", {}, []),
    ("jax-fit ynn fusion: individual_convolution", "jax-fit",
     "--xla_cpu_experimental_ynn_fusion_type=individual_convolution", {}, []),
    ("jax --xla_cpu_enable_fast_math=true", "jax-hand", "--xla_cpu_enable_fast_math=true", {}, []),
    ("jax --xla_cpu_prefer_vector_width=512", "jax-hand",
     "--xla_cpu_prefer_vector_width=512", {}, []),
    ("jax --xla_cpu_enable_concurrency_optimized_scheduler=true", "jax-hand",
     "--xla_cpu_enable_concurrency_optimized_scheduler=true", {}, []),
    ("jax JAX_DEFAULT_MATMUL_PRECISION=float32", "jax-hand", "",
     {"JAX_DEFAULT_MATMUL_PRECISION": "float32"}, []),
    ("jax TF_NUM_INTRAOP_THREADS=2 TF_NUM_INTEROP_THREADS=1 OMP_NUM_THREADS=2", "jax-hand", "",
     {"TF_NUM_INTRAOP_THREADS": "2", "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": "2"}, []),
    ("jax input NCHW, transposed in the step", "jax-hand", "", {}, ["--layout", "nchw"]),
    ("jax on 1 core (sched_setaffinity)", "jax-hand", "", {}, ["--cpus", "1"]),
    ("torch on 1 core (sched_setaffinity)", "torch", "", {}, ["--cpus", "1"]),
    ("torch channels_last", "torch", "", {}, ["--layout", "channels_last"]),
    ("jax batch 32", "jax-hand", "", {}, ["--batch-size", "32", "--steps", "12"]),
    ("torch batch 32", "torch", "", {}, ["--batch-size", "32", "--steps", "12"]),
    ("jax batch 256", "jax-hand", "", {}, ["--batch-size", "256", "--steps", "3"]),
    ("torch batch 256", "torch", "", {}, ["--batch-size", "256", "--steps", "3"]),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", choices=["resnet18", "resnet50"], default="resnet18",
                   help="resnet18: CIFAR stem at 32x32; resnet50: ImageNet stem (7x7 conv, "
                        "max-pool, bottlenecks) at --image-size")
    p.add_argument("--image-size", type=int, default=None,
                   help="input side (default 32 for resnet18, 64 for resnet50)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default 128 for resnet18, 32 for resnet50")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per measurement (the fit times its second epoch of "
                        "steps+1 batches); default: the suite row's count for that model, "
                        f"size and batch (SUITE), else {DEFAULT_STEPS}")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="ours (Trainer.fit) in this compute precision; PyTorch stays float32")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure each side this many times, interleaved (PyTorch, hand, ours, "
                        "PyTorch, ...), each in a fresh process, and report the medians: a "
                        "process's rate varies by up to ~10%% on a small VM")
    p.add_argument("--warm-cache", action="store_true",
                   help="also run ours once more with its train step read from JAX's "
                        "persistent compilation cache (what a rerun of a configuration does "
                        "by default), for its peak RSS without XLA's compile")
    p.add_argument("--suite", action="store_true",
                   help="the three README rows (ResNet-18 CIFAR 32/128, ResNet-50 64/32 and "
                        "224/16) in one run, as one table")
    p.add_argument("--with-bf16", action="store_true",
                   help="with --suite: also ours in bf16, as an extra column")
    p.add_argument("--explore", action="store_true",
                   help="also measure XLA flags, layouts, threads and batch sizes (~25 min here)")
    p.add_argument("--explore-steps", type=int, default=3,
                   help="timed steps per --explore measurement")
    p.add_argument("--conv-only", action="store_true",
                   help="with --explore: only the single-convolution measurements")
    p.add_argument("--variants", nargs="+", default=None, metavar="TEXT",
                   help="with --explore: only the whole-step variants whose label contains "
                        "one of these texts (default: all)")
    harness.add_common_arguments(p)
    # Internal: the child-process side.
    p.add_argument("--_worker", choices=["torch", "jax-hand", "jax-fit", "conv"],
                   help=argparse.SUPPRESS)
    p.add_argument("--layout", default="nhwc", help=argparse.SUPPRESS)
    p.add_argument("--cpus", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def sizes(args: argparse.Namespace) -> dict:
    """Image side and network width: the real ones, or tiny ones for ``--quick``."""
    resnet50 = args.model == "resnet50"
    batch = args.batch_size or (32 if resnet50 else 128)
    side = args.image_size or (64 if resnet50 else 32)
    steps = args.steps or next((row_steps for model, row_side, row_batch, row_steps in SUITE
                                if (model, row_side, row_batch) == (args.model, side, batch)),
                               DEFAULT_STEPS)
    if args.quick:
        return {"image_size": 32 if resnet50 else 8, "width": 4, "batch_size": min(batch, 8),
                "steps": min(steps, 2)}
    return {"image_size": side, "width": 64, "batch_size": batch, "steps": steps}


# ---------------------------------------------------------------------------- PyTorch side


def torch_resnet18(width: int, num_classes: int = 10):
    """ResNet-18, CIFAR stem, projection shortcuts: the same network as resnet_task's."""
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = nn.Sequential()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + self.shortcut(x))

    class ResNet18(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            blocks, cin = [], width
            for i, stride in enumerate((1, 2, 2, 2)):
                cout = width * 2**i
                blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
                cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(cin, num_classes)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = self.blocks(x)
            return self.fc(torch.flatten(torch.mean(x, dim=(2, 3)), 1))

    return ResNet18()


def torch_resnet50(width: int, num_classes: int = 10):
    """ResNet-50, ImageNet stem, v1.5 bottlenecks (stride on the 3x3): resnet_task's resnet50."""
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, mid: int, stride: int) -> None:
            super().__init__()
            cout = mid * 4
            self.body = nn.Sequential(
                nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.shortcut = nn.Sequential()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return (self.body(x) + self.shortcut(x)).relu()

    layers = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
              nn.MaxPool2d(3, 2, 1)]
    cin = width
    for i, (count, stride) in enumerate(zip((3, 4, 6, 3), (1, 2, 2, 2), strict=True)):
        mid = width * 2**i
        for j in range(count):
            layers.append(Bottleneck(cin, mid, stride if j == 0 else 1))
            cin = mid * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def torch_stepper(args: argparse.Namespace) -> tuple[Callable[[int], Any], int]:
    """PyTorch's side, built and warmed up: ``(run, threads)``, ``run(n)`` trains ``n``
    steps and returns the last loss, a number (so the steps have finished)."""
    import torch
    import torch.nn.functional as F

    s = sizes(args)
    torch.manual_seed(0)
    build = torch_resnet50 if args.model == "resnet50" else torch_resnet18
    model = build(s["width"])
    fmt = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    b, h = s["batch_size"], s["image_size"]
    batches = [(torch.randn(b, 3, h, h, generator=g).contiguous(memory_format=fmt),
                torch.randint(0, 10, (b,), generator=g)) for _ in range(4)]
    done = 0

    def run(steps: int) -> float:
        nonlocal done
        loss = None
        for _ in range(steps):
            x, y = batches[done % len(batches)]
            done += 1
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        return float(loss)

    run(2)  # warm-up: allocator, oneDNN primitive caches
    return run, torch.get_num_threads()


def torch_worker(args: argparse.Namespace) -> dict:
    import torch

    run, threads = torch_stepper(args)
    s = sizes(args)
    start, cpu = time.perf_counter(), time.process_time()
    run(s["steps"])
    wall = time.perf_counter() - start
    return {"images_per_second": s["steps"] * s["batch_size"] / wall,
            "cpu_ms_per_step": (time.process_time() - cpu) / s["steps"] * 1e3,
            "threads": threads, "torch": torch.__version__}


# -------------------------------------------------------------------------------- JAX side


def jax_task(args: argparse.Namespace, batches_per_epoch: int):
    import workloads

    s = sizes(args)
    images, labels = workloads.synthetic_arrays(
        batches_per_epoch * s["batch_size"], s["image_size"])
    kwargs = () if s["width"] == 64 else (("width", s["width"]),)
    stem = "imagenet" if args.model == "resnet50" else "cifar"
    return workloads.InMemoryResNetTask(images, labels, workloads.ModelSpec(
        args.model, stem=stem, kwargs=kwargs))


def hand_loop(args: argparse.Namespace) -> Any:
    """The hand JAX side: a ``workloads.HandLoop`` over four device batches, its first
    step (the compile) run."""
    import jax.numpy as jnp
    import workloads

    task = jax_task(args, 4)
    batches = workloads.device_batches(task.images, task.labels, sizes(args)["batch_size"])
    if args.layout == "nchw":
        # Stored NCHW, transposed to the model's NHWC inside the step: the same math.
        batches = [{**bt, "image": jnp.transpose(bt["image"], (0, 3, 1, 2))} for bt in batches]
        inner = task.training_step

        def training_step(model, batch):
            return inner(model, {**batch, "image": jnp.transpose(batch["image"], (0, 2, 3, 1))})

        task.training_step = training_step
    loop = workloads.HandLoop(task, batches, 1000)
    loop.run(1)
    return loop


def jax_hand_worker(args: argparse.Namespace) -> dict:
    import jax

    s = sizes(args)
    loop = hand_loop(args)
    wall = loop.run(s["steps"])
    return {"images_per_second": s["steps"] * s["batch_size"] / wall,
            "cpu_ms_per_step": loop.cpu_seconds_per_step * 1e3,
            "compile_seconds": loop.compile_seconds, "devices": str(jax.devices())}


def jax_fit_worker(args: argparse.Namespace) -> dict:
    import workloads

    s = sizes(args)
    per_epoch = s["steps"] + 1
    task = jax_task(args, per_epoch)
    fit = workloads.timed_fit(task, batch_size=s["batch_size"], epochs=2,
                              precision=args.precision)
    return {"images_per_second": fit.images_per_second,
            "images_per_second_with_boundaries": fit.steps_per_second * s["batch_size"],
            "cpu_ms_per_step": fit.cpu_seconds_per_step * 1e3,
            "compile_seconds": fit.compile_seconds, "plugins": fit.plugins}


def conv_worker(args: argparse.Namespace) -> dict:
    """One 3x3 convolution's forward+backward at 32x32x64 (the note's hot spot), both layouts."""
    import jax
    import jax.numpy as jnp

    b = sizes(args)["batch_size"]
    out = {}
    for layout, dn in (("NHWC", ("NHWC", "HWIO", "NHWC")), ("NCHW", ("NCHW", "OIHW", "NCHW"))):
        x = jnp.ones((b, 32, 32, 64) if layout == "NHWC" else (b, 64, 32, 32))
        w = jnp.ones((3, 3, 64, 64) if layout == "NHWC" else (64, 64, 3, 3)) * 0.01

        def f(x, w, dn=dn):
            return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                dimension_numbers=dn).sum()

        grad = jax.jit(jax.grad(f, argnums=(0, 1)))
        jax.block_until_ready(grad(x, w))
        times = []
        for _ in range(3):
            start = time.perf_counter()
            jax.block_until_ready(grad(x, w))
            times.append(time.perf_counter() - start)
        out[layout] = min(times)
    return {"nhwc_ms": out["NHWC"] * 1e3, "nchw_ms": out["NCHW"] * 1e3}


WORKERS = {"torch": torch_worker, "jax-hand": jax_hand_worker, "jax-fit": jax_fit_worker,
           "conv": conv_worker}


def run_worker(args: argparse.Namespace) -> int:
    if args.cpus:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[: args.cpus]))
    if args._worker != "torch":
        harness.prepare_runtime(quick=args.quick)
    result = WORKERS[args._worker](args)
    if args._worker != "torch":  # as XLA read them (importing nnx_trainer adds one)
        result["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    harness.emit_result(result)
    return 0


# ------------------------------------------------------------------------------- parent


def child(args: argparse.Namespace, worker: str, *extra: str, xla_flags: str = "",
          env: dict | None = None, steps: int | None = None) -> dict:
    s = sizes(args)
    argv = [sys.executable, str(SCRIPT), "--_worker", worker, "--model", args.model,
            "--batch-size", str(s["batch_size"]), "--steps", str(steps or s["steps"]),
            "--precision", args.precision,
            *(["--image-size", str(args.image_size)] if args.image_size else []),
            *(["--quick"] if args.quick else []), *extra]
    child_env = {**os.environ, **(env or {})}
    if xla_flags:
        child_env["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), xla_flags]).strip()
    return harness.child_result(argv, env=child_env)


def torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def line(label: str, r: dict) -> str:
    return (f"  {label:<66} {r['images_per_second']:8.1f} images/s  "
            f"CPU {r['cpu_ms_per_step']:8.0f} ms/step  peak RSS {r['peak_rss_mib']:6.0f} MiB")


SIDES = {"torch": "plain PyTorch step", "jax-hand": "JAX hand loop (jax.jit split/merge, donated)",
         "jax-fit": "ours: Trainer.fit, default plugins, in-epoch steady state"}


def one_round(args: argparse.Namespace, cache_dir: str | None = None) -> dict:
    """PyTorch, the hand JAX loop and ours, each once, each in its own process; ours with
    JAX's persistent compilation cache in ``cache_dir`` (empty: compiled cold) if given."""
    results = {}
    if torch_available():
        results["torch"] = child(args, "torch")
    if not args.quick:  # the smoke run checks the two sides of the ratio only
        results["jax-hand"] = child(args, "jax-hand")
    if args.quick:  # the smoke run saves a process start-up; no RSS figure for ours
        results["jax-fit"] = {**jax_fit_worker(args), "peak_rss_mib": float("nan")}
    else:
        cache_env = {"NNX_TRAINER_COMPILATION_CACHE": cache_dir} if cache_dir else None
        results["jax-fit"] = child(args, "jax-fit", env=cache_env)
    for side, r in results.items():
        label = SIDES[side] + (f" ({r['threads']} threads)" if side == "torch" else "")
        print(line(label, r), flush=True)
    return results


def median_of(runs: list[dict]) -> dict:
    """One side's rounds as one result: the median of each figure, the rounds' rates kept."""
    combined = dict(runs[-1])
    for key in ("images_per_second", "images_per_second_with_boundaries", "cpu_ms_per_step",
                "peak_rss_mib"):
        if key in combined:
            combined[key] = harness.median([r[key] for r in runs])
    combined["round_rates"] = [r["images_per_second"] for r in runs]
    return combined


def measure(args: argparse.Namespace) -> dict:
    """One configuration: ``--rounds`` rounds of the three sides, then their medians."""
    s = sizes(args)
    stem = "imagenet" if args.model == "resnet50" else "cifar"
    print(f"model {args.model} ({stem} stem, width {s['width']}), {s['image_size']}x"
          f"{s['image_size']}x3 float32 in memory, batch {s['batch_size']}, "
          f"{s['steps']} timed steps each; ours in {args.precision}", flush=True)
    if not torch_available():
        print("  PyTorch is not installed: pip install -e '.[bench]' (torch==2.13.0, CPU build)")
    rounds = []
    with tempfile.TemporaryDirectory(prefix="nnx-bench-cache-") as cache_dir:
        for index in range(args.rounds):
            if args.rounds > 1:
                print(f" round {index + 1} of {args.rounds}:", flush=True)
            # The last round's fit compiles into an empty cache, which the warm fit reads.
            last = index == args.rounds - 1
            rounds.append(one_round(args, cache_dir if args.warm_cache and last else None))
        results = {side: median_of([r[side] for r in rounds]) for side in rounds[0]}
        if args.warm_cache and not args.quick:
            results["jax-fit-warm"] = warm = child(
                args, "jax-fit", env={"NNX_TRAINER_COMPILATION_CACHE": cache_dir})
            print(line("ours again, its compiled step read from the cache", warm) +
                  f"  (compile {warm['compile_seconds']:.1f} s)", flush=True)
    fit = results["jax-fit"]
    if args.rounds > 1:
        print(f" median of {args.rounds} rounds (images/s, CPU, peak RSS each):")
        for side in rounds[0]:
            r = results[side]
            print(line(SIDES[side], r) + "  rounds: "
                  + ", ".join(f"{rate:.1f}" for rate in r["round_rates"]))
    if "xla_flags" in fit:
        print(f"    (XLA_FLAGS in the JAX processes: {fit['xla_flags'] or '(none)'})")
    print(f"    (with its epoch boundary every {s['steps'] + 1} steps: "
          f"{fit['images_per_second_with_boundaries']:.1f} images/s)")
    if "torch" in results:
        torch_rate = results["torch"]["images_per_second"]
        print(f"  ratio ours/pytorch (images/s): {fit['images_per_second'] / torch_rate:.3f}")
        if "jax-hand" in results:
            print(f"  ratio jax-hand/pytorch (the runtime's share): "
                  f"{results['jax-hand']['images_per_second'] / torch_rate:.3f}")
        print(f"  ratio peak RSS ours/pytorch: "
              f"{fit['peak_rss_mib'] / results['torch']['peak_rss_mib']:.2f}")
        if "jax-fit-warm" in results:
            warm_rss = results["jax-fit-warm"]["peak_rss_mib"]
            print(f"  ratio peak RSS ours (compilation cache warm)/pytorch: "
                  f"{warm_rss / results['torch']['peak_rss_mib']:.2f}")
    if "jax-hand" in results:
        print(f"  ratio ours/jax-hand (the Trainer's share): "
              f"{fit['images_per_second'] / results['jax-hand']['images_per_second']:.3f}")
    return results


def suite(args: argparse.Namespace) -> None:
    """The README's three rows in one run, then one Markdown table of them."""
    rows = []
    measured: dict[tuple, dict] = {}  # --quick shrinks the two ResNet-50 rows alike
    for model, side, batch, _ in SUITE:
        row_args = argparse.Namespace(**{**vars(args), "model": model, "image_size": side,
                                         "batch_size": batch, "precision": "fp32"})
        key = (model, *sizes(row_args).values())
        if key not in measured:
            print(flush=True)
            measured[key] = results = measure(row_args)
            if args.with_bf16:
                bf16_args = argparse.Namespace(**{**vars(row_args), "precision": "bf16"})
                results["jax-fit-bf16"] = child(bf16_args, "jax-fit")
                print(line("ours in bf16: Trainer(precision='bf16')",
                           results["jax-fit-bf16"]), flush=True)
        rows.append((model, side, batch, measured[key]))
    if args.rounds > 1:
        print(f"\n(each figure the median of {args.rounds} rounds, each side a fresh process "
              "per round)", end="")
    print("\n| model, input, batch | PyTorch images/s | hand JAX | ours `Trainer.fit` "
          "| ours / PyTorch | peak RSS ours / PyTorch |"
          + (" the same, compilation cache warm |" if args.warm_cache else "")
          + (" ours bf16 | bf16 / fp32 |" if args.with_bf16 else ""))
    print("|---|---|---|---|---|---|" + ("---|" if args.warm_cache else "")
          + ("---|---|" if args.with_bf16 else ""))
    nan = {"images_per_second": float("nan"), "peak_rss_mib": float("nan")}
    for model, side, batch, r in rows:
        torch_r, hand, fit = r.get("torch", nan), r.get("jax-hand", nan), r["jax-fit"]
        stem = "ImageNet" if model == "resnet50" else "CIFAR"
        shown = sizes(argparse.Namespace(**{**vars(args), "model": model, "image_size": side,
                                            "batch_size": batch}))  # --quick shrinks them
        cells = [f"{model} {stem} stem, {shown['image_size']}², {shown['batch_size']}",
                 f"{torch_r['images_per_second']:.1f}",
                 f"{hand['images_per_second']:.1f}", f"{fit['images_per_second']:.1f}",
                 f"**{fit['images_per_second'] / torch_r['images_per_second']:.2f}**",
                 f"{fit['peak_rss_mib'] / torch_r['peak_rss_mib']:.2f}"]
        if args.warm_cache:
            warm = r.get("jax-fit-warm", nan)
            cells.append(f"{warm['peak_rss_mib'] / torch_r['peak_rss_mib']:.2f}")
        if args.with_bf16:
            bf16 = r["jax-fit-bf16"]["images_per_second"]
            cells += [f"{bf16:.1f}", f"{bf16 / fit['images_per_second']:.2f}"]
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        return run_worker(args)
    harness.prepare_runtime(quick=args.quick)
    title = ("ResNet training suite" if args.suite
             else f"{args.model} ({'imagenet' if args.model == 'resnet50' else 'cifar'} stem) "
                  "training")
    harness.print_header(f"{title}: PyTorch vs nnx-trainer", args, extra_packages=["torch"])
    if args.suite:
        suite(args)
    else:
        measure(args)
    if args.explore:
        explore(args)
    return 0


def explore(args: argparse.Namespace) -> None:
    print("\n[explore] one 3x3 convolution fwd+bwd, batch "
          f"{sizes(args)['batch_size']}, 32x32x64->64 (ms, best of 3):", flush=True)
    for label, flags in (("default flags", ""), ("--xla_cpu_use_onednn=true",
                                                 "--xla_cpu_use_onednn=true"),
                         ("onednn fusion individual_convolution",
                          "--xla_cpu_experimental_onednn_fusion_type=individual_convolution"),
                         ("xnn fusion individual_convolution",
                          "--xla_cpu_experimental_xnn_fusion_type=individual_convolution"),
                         ("ynn fusion individual_convolution",
                          "--xla_cpu_experimental_ynn_fusion_type=individual_convolution")):
        try:
            r = child(args, "conv", xla_flags=flags)
            print(f"  {label:<40} NHWC {r['nhwc_ms']:7.1f}   NCHW {r['nchw_ms']:7.1f}",
                  flush=True)
        except harness.ChildFailed as exc:
            print(f"  {label:<40} failed: {str(exc).splitlines()[-1]}", flush=True)
    if args.conv_only:
        return
    print("\n[explore] whole training step, one child process each:", flush=True)
    have_torch = torch_available()
    for label, worker, flags, env, extra in EXPLORE_VARIANTS:
        if worker == "torch" and not have_torch:
            continue
        if args.variants and not any(text in label for text in args.variants):
            continue
        try:
            r = child(args, worker, *extra, xla_flags=flags, env=env, steps=args.explore_steps)
            print(line(label, r), flush=True)
        except harness.ChildFailed as exc:
            print(f"  {label:<66} failed: {str(exc).splitlines()[-1]}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
