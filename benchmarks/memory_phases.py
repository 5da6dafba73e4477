"""Where a ResNet training process's peak memory goes: peak RSS phase by phase.

One child process per variant trains ResNet-50 (ImageNet stem) or ResNet-18 (CIFAR
stem) on synthetic in-memory batches with a hand ``jax.jit`` loop (the Trainer adds
nothing measurable to the step: ``vs_pytorch.py``'s ours/jax-hand). The kernel's peak
RSS (``VmHWM``) is reset between phases (``/proc/self/clear_refs``), so each phase shows
its own peak: imports, data, building the model and optimizer eagerly, tracing,
XLA's compilation (with ``memory_analysis()``'s temporary buffers) and three steps.
Variants:

* ``none``: nothing returned to the OS;
* ``trim``: ``nnx_trainer.host_memory.release_free_host_memory()`` after building and
  after compiling (what the Trainer does);
* ``trim+clear``: also ``jax.clear_caches()`` after building (drops the small programs
  the eager build compiled; the Trainer does it after a build that compiled at least
  ``nnx_trainer.host_memory.MANY_PROGRAMS``, as ResNet-50's does).

The steps phase also reports the minor page faults and the system CPU time per step:
XLA:CPU maps each step's temporary buffer afresh, so the kernel faults in and zeroes it
every step. Environment settings pass to the children, which makes the two process-wide
choices that move these figures comparable from the command line:

    python benchmarks/memory_phases.py                          # ResNet-50 64², batch 32
    python benchmarks/memory_phases.py --model resnet18 --image-size 32 --batch-size 128
    XLA_FLAGS=--xla_cpu_use_fusion_emitters=false python benchmarks/memory_phases.py
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python benchmarks/memory_phases.py
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from pathlib import Path

import harness

SCRIPT = Path(__file__).resolve()
VARIANTS = ("none", "trim", "trim+clear")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=["resnet18", "resnet50"], default="resnet50")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    harness.add_common_arguments(p)
    p.add_argument("--_variant", choices=VARIANTS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset VmHWM to the current RSS


def worker(args: argparse.Namespace) -> dict:
    phases: list[tuple[str, float, float]] = []

    def phase(name: str) -> None:
        phases.append((name, _status_mib("VmHWM"), _status_mib("VmRSS")))
        _reset_peak()

    _reset_peak()
    import jax
    import workloads
    from flax import nnx

    from nnx_trainer.host_memory import release_free_host_memory

    phase("imports")
    side, batch = (32, 8) if args.quick else (args.image_size, args.batch_size)
    kwargs = (("width", 4),) if args.quick else ()
    images, labels = workloads.synthetic_arrays(4 * batch, side)
    stem = "imagenet" if args.model == "resnet50" else "cifar"
    spec = workloads.ModelSpec(args.model, stem=stem, kwargs=kwargs)
    task = workloads.InMemoryResNetTask(images, labels, spec)
    batches = workloads.device_batches(task.images, task.labels, batch)
    phase("data")
    with jax.threefry_partitionable(False):  # as the Trainer builds
        model = task.configure_model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, task.configure_optimizer(1000), wrt=nnx.Param)
    metrics = task.configure_train_metrics()
    graphdef, state = nnx.split((model, optimizer, metrics))
    state_mib = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
    if args._variant == "trim+clear":
        jax.clear_caches()
        gc.collect()
    if args._variant != "none":
        release_free_host_memory()
    phase("model + optimizer (eager)")

    def train_step(state, batch):
        model, optimizer, metrics = nnx.merge(graphdef, state)

        def loss_fn(model):
            return task.training_step(model, batch)

        (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        metrics.update(loss=loss, **aux)
        return nnx.state((model, optimizer, metrics)), loss

    lowered = jax.jit(train_step, donate_argnums=0).lower(state, batches[0])
    phase("trace + lower")
    compiled = lowered.compile()
    temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
    if args._variant != "none":
        release_free_host_memory()
    phase("compile")
    start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    for i in range(3):
        state, loss = compiled(state, batches[i % len(batches)])
    jax.block_until_ready(loss)
    phase("three steps")
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"phases": phases, "state_mib": state_mib, "temp_mib": temp_mib,
            "step_seconds": (time.perf_counter() - start) / 3,
            # Pages touched afresh per step, and the kernel's CPU time for them.
            "minor_faults_per_step": (after.ru_minflt - usage.ru_minflt) / 3,
            "system_ms_per_step": (after.ru_stime - usage.ru_stime) / 3 * 1e3}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._variant:
        harness.prepare_runtime(quick=args.quick)
        harness.emit_result(worker(args))
        return 0
    harness.prepare_runtime(quick=args.quick)
    harness.print_header(f"peak RSS by phase: {args.model}", args)
    side, batch = (32, 8) if args.quick else (args.image_size, args.batch_size)
    print(f"{args.model}, {side}², batch {batch}, float32, hand jax.jit loop; MiB: each "
          "phase's own peak (its RSS at the end)", flush=True)
    peaks = {}
    for variant in args.variants:
        argv_child = harness.this_script_argv(
            SCRIPT, "--_variant", variant, "--model", args.model, "--image-size",
            str(args.image_size), "--batch-size", str(args.batch_size),
            *(["--quick"] if args.quick else []))
        r = harness.child_result(argv_child)
        # The highest phase peak: wait4's ru_maxrss forgets what clear_refs reset.
        peak = max(phase_peak for _, phase_peak, _ in r["phases"])
        print(f"\n  variant {variant}: training state {r['state_mib']:.0f} MiB, XLA temporary "
              f"buffers {r['temp_mib']:.0f} MiB, process peak {peak:.0f} MiB")
        for name, phase_peak, rss in r["phases"]:
            print(f"    {name:<28} peak {phase_peak:7.0f}   (end {rss:7.0f})")
        print(f"    per step: {r['step_seconds'] * 1e3:.0f} ms, "
              f"{r['minor_faults_per_step']:.0f} minor page faults, "
              f"{r['system_ms_per_step']:.0f} ms of system CPU")
        peaks[variant] = peak
    for variant in args.variants[1:]:
        print(f"  ratio peak RSS {variant}/{args.variants[0]}: "
              f"{peaks[variant] / peaks[args.variants[0]]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
