"""Loop overhead: ``Trainer.fit`` steps/s versus the fastest honest hand-written loop.

Both train the same ``resnet_task`` model with ``ResNetTask``'s loss, optimizer and
train metrics at the same batch size. The hand loop steps over batches already on
the device (Flax's performance-guide pattern: ``jax.jit`` over split state, donated);
the Trainer reads the same data from an in-memory Grain ``MapDataset`` (no
augmentation) as it does for users: each epoch in the order of
``nnx_trainer.data.epoch_order`` (a NumPy permutation), each batch with one batched
read (``_getitems``, one fancy index here), then prefetched to the device.

Only the steady state is timed: the Trainer's first epoch (compilation, Grain
start-up) and the hand loops' first epoch are excluded; the Trainer's timed window
includes its later epoch boundaries. Each round times every loop once; the ratio
is the median over rounds of the per-round ratio, so slow drift in machine load
cancels. Two configurations:

* ``small``: ResNet-8 (one block per stage, 8/16/32 features) on 16x16x3, a step of
  a few milliseconds, where any per-step cost of the loop shows;
* ``resnet18``: ResNet-18 (CIFAR stem) on 32x32x3, the loop's cost against a real step.

``--breakdown`` adds default-plugin fits each without one plugin (``nonfinite_guard``,
``checkpoint``, ``tensorboard``, ``progress``): what each costs the loop.

    python benchmarks/loop_overhead.py              # both: minutes (load-dependent)
    python benchmarks/loop_overhead.py --configs small --breakdown --profile 25
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass

import harness

TARGETS = {"small": 0.98, "resnet18": 0.99}


@dataclass(frozen=True)
class Config:
    """One model and data size to compare loops on."""

    name: str
    model: str
    model_kwargs: tuple
    image_size: int
    batch_size: int
    batches_per_epoch: int
    timed_epochs: int


def configs(args: argparse.Namespace) -> list[Config]:
    """The configurations asked for, at full or ``--quick`` size."""
    b = args.batch_size
    if args.quick:
        table = {
            "small": Config("small", "simple", (("num_blocks", 1), ("initial_features", 4)),
                            8, 8, 6, 1),
            "resnet18": Config("resnet18", "resnet18", (("width", 4),), 8, 4, 3, 1),
        }
    else:
        table = {
            "small": Config("small", "simple", (("num_blocks", 1), ("initial_features", 8)),
                            16, b, args.small_batches_per_epoch, args.small_timed_epochs),
            "resnet18": Config("resnet18", "resnet18", (), 32, b,
                               args.resnet18_batches_per_epoch, args.resnet18_timed_epochs),
        }
    return [table[name] for name in args.configs]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--configs", nargs="+", choices=["small", "resnet18"], default=None,
                   help="which configurations to run (default: both; with --quick: small)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of both configurations")
    p.add_argument("--rounds", type=int, default=3,
                   help="times each loop is measured (resnet18: at most 2)")
    p.add_argument("--small-batches-per-epoch", type=int, default=64)
    p.add_argument("--small-timed-epochs", type=int, default=4,
                   help="epochs timed per round after one warm-up epoch")
    p.add_argument("--resnet18-batches-per-epoch", type=int, default=6)
    p.add_argument("--resnet18-timed-epochs", type=int, default=2)
    p.add_argument("--breakdown", action="store_true",
                   help="also time default-plugin fits without one plugin each "
                        "(nonfinite_guard, checkpoint, tensorboard, progress)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile one default-plugin fit of the first configuration "
                        "with cProfile and print the N functions with the most own time")
    harness.add_common_arguments(p)
    args = p.parse_args(argv)
    if args.configs is None:
        args.configs = ["small"] if args.quick else ["small", "resnet18"]
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


HAND_JIT = "hand loop, jax.jit split/merge + donate"
HAND_NNX = "hand loop, @nnx.jit (reference)"
FIT_DEFAULT = "Trainer.fit, default plugins"
FIT_BARE = "Trainer.fit, plugin_autoload=False"
# name -> (default plugins?, plugins disabled)
FITS = {FIT_DEFAULT: (True, ()), FIT_BARE: (False, ())}
BREAKDOWN_FITS = {
    f"  default minus {plugin}": (True, (plugin,))
    for plugin in ("nonfinite_guard", "checkpoint", "tensorboard", "progress")
}


def build_task(config: Config):
    import workloads

    n = config.batches_per_epoch * config.batch_size
    images, labels = workloads.synthetic_arrays(n, config.image_size)
    spec = workloads.ModelSpec(config.model, kwargs=config.model_kwargs)
    return workloads.InMemoryResNetTask(images, labels, spec), spec


def measure(
    config: Config, rounds: int, breakdown: bool = False, with_reference: bool = True
) -> dict[str, list]:
    """Per round: steps/s and CPU s/step of each loop; the fits' boundary cost too."""
    import workloads

    task, spec = build_task(config)
    epochs = 1 + config.timed_epochs
    per_epoch = config.batches_per_epoch
    timed = per_epoch * config.timed_epochs
    print(f"\n[{config.name}] {spec.describe()}, {config.image_size}x{config.image_size}x3 "
          f"float32, batch {config.batch_size}, {per_epoch} batches/epoch, {timed} timed "
          f"steps per loop per round (after one warm-up epoch), {rounds} round(s)", flush=True)

    batches = workloads.device_batches(task.images, task.labels, config.batch_size)
    loops = {HAND_JIT: workloads.HandLoop(task, batches, epochs * per_epoch, style="jit")}
    if with_reference:
        loops[HAND_NNX] = workloads.HandLoop(task, batches, epochs * per_epoch, style="nnx.jit")
    for loop in loops.values():
        loop.run(per_epoch)
    fits = {**FITS, **(BREAKDOWN_FITS if breakdown else {})}
    results: dict[str, list] = {name: [] for name in (*loops, *fits)}
    plugins_seen: list[str] = []
    for _ in range(rounds):
        for name, loop in loops.items():
            rate = timed / loop.run(timed)
            results[name].append({"rate": rate, "in_epoch": rate, "boundary": 0.0,
                                  "cpu": loop.cpu_seconds_per_step,
                                  "python_cpu": loop.python_cpu_seconds_per_step})
        for name, (default, disabled) in fits.items():
            fit = workloads.timed_fit(task, batch_size=config.batch_size, epochs=epochs,
                                      default_plugins=default, disable_plugins=disabled)
            results[name].append({"rate": fit.steps_per_second,
                                  "in_epoch": fit.in_epoch_steps_per_second,
                                  "boundary": fit.boundary_seconds,
                                  "cpu": fit.cpu_seconds_per_step,
                                  "python_cpu": fit.python_cpu_seconds_per_step})
            if name == FIT_DEFAULT:
                plugins_seen = fit.plugins
    print(f"  default plugins active: {', '.join(plugins_seen)}")
    return results


def report(config: Config, results: dict[str, list]) -> None:
    """Rates per loop, then the ratios (median over rounds of per-round ratios)."""
    print(f"  {'loop':<38} {'steps/s':>8} {'images/s':>9} {'CPU ms/step':>11} "
          f"{'Python CPU':>10} {'epoch boundary':>14}   rounds (steps/s)")
    for name, rows in results.items():
        rate = harness.median([r["in_epoch"] for r in rows])
        cpu = harness.median([r["cpu"] for r in rows]) * 1e3
        python_cpu = harness.median([r["python_cpu"] for r in rows]) * 1e3
        boundary = harness.median([r["boundary"] for r in rows]) * 1e3
        each = ", ".join(f"{r['in_epoch']:.1f}" for r in rows)
        bound = f"{boundary:11.1f} ms" if name in FITS or name in BREAKDOWN_FITS else f"{'--':>14}"
        print(f"  {name:<38} {rate:8.1f} {rate * config.batch_size:9.0f} {cpu:11.2f} "
              f"{python_cpu:10.2f} {bound}   {each}")
    base = results[HAND_JIT]
    target = TARGETS[config.name]

    def paired(name: str, key: str) -> float:
        return harness.median(
            [a[key] / b["rate"] for a, b in zip(results[name], base, strict=True)])

    for name in (FIT_DEFAULT, FIT_BARE, HAND_NNX, *BREAKDOWN_FITS):
        if name not in results:
            continue
        ratio = paired(name, "in_epoch")
        label = name.strip().replace(", ", " ").replace("Trainer.fit", "trainer")
        line = f"  ratio {config.name} [{label}] / [hand jax.jit]: {ratio:.3f}"
        if name in FITS:
            met = "met" if ratio >= target else "NOT met"
            line += (f" (target >= {target}: {met}); with an epoch boundary every "
                     f"{config.batches_per_epoch} steps: {paired(name, 'rate'):.3f}")
        print(line)
    extra_cpu = harness.median([a["cpu"] - b["cpu"] for a, b in
                                zip(results[FIT_BARE], base, strict=True)]) * 1e3
    print(f"  extra CPU per step, trainer (autoload off) minus hand jax.jit: {extra_cpu:.2f} ms")
    # The process figure above includes XLA's compute threads, whose spinning and
    # waiting vary by a millisecond between runs of the same loop; the loop's own
    # cost (dispatch, data, hooks) is all in the Python threads, measured per thread.
    for name in (FIT_BARE, FIT_DEFAULT):
        extra = harness.median([a["python_cpu"] - b["python_cpu"] for a, b in
                                zip(results[name], base, strict=True)]) * 1e3
        label = name.replace("Trainer.fit, ", "")
        print(f"  extra Python-thread CPU per step, trainer ({label}) minus hand jax.jit: "
              f"{extra:.2f} ms")


def profile_fit(config: Config, top: int) -> None:
    """cProfile the timed window of one default-plugin fit: where the host's time goes."""
    import cProfile
    import pstats

    import workloads

    task, _ = build_task(config)
    workloads.timed_fit(task, batch_size=config.batch_size, epochs=2)  # compile first
    profiler = cProfile.Profile()
    clock = workloads.StepClock()
    clock.on_window_start, clock.on_window_end = profiler.enable, profiler.disable
    workloads.timed_fit(task, batch_size=config.batch_size, epochs=1 + config.timed_epochs,
                        clock=clock)
    print(f"\n[profile] timed window of one default-plugin fit of {config.name}, "
          f"top {top} by own time:")
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.prepare_runtime(quick=args.quick)
    harness.print_header("loop overhead: Trainer.fit vs hand-written loop", args)
    import workloads

    with tempfile.TemporaryDirectory(prefix="nnx-bench-cache-") as cache:
        # Both Trainer fits compile the same program: the second loads it from here.
        workloads.enable_compilation_cache(cache)
        chosen = configs(args)
        for config in chosen:
            rounds = args.rounds if config.name == "small" else min(args.rounds, 2)
            # The @nnx.jit reference is for small steps, where its per-call cost shows.
            report(config, measure(config, 1 if args.quick else rounds, args.breakdown,
                                   with_reference=config.name == "small" and not args.quick))
        if args.profile:
            profile_fit(chosen[0], args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
