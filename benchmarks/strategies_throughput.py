"""Strategies on 8 simulated CPU devices: images/s and state memory per device.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (set here before JAX starts)
splits this machine's CPU into 8 XLA devices, so ``single_device``, ``data_parallel``
and ``fsdp`` (the ``strategies`` plugin) run their real sharded programs, collectives
included. The devices share the same few cores, so images/s compares the strategies'
overheads, not the speed-up 8 real accelerators would give.

Memory per device: ``device.memory_stats()`` where the backend reports it (accelerators;
it is None on CPU); otherwise the bytes of the training state's addressable shards on
each device, for the parameters (with BatchNorm statistics) and the optimizer state,
which is what FSDP divides. Each strategy runs in its own child process, whose peak RSS
is reported too. The model is ResNet-18 (CIFAR stem) at a quarter of its width, on
32x32x3 in-memory data, batch 32 (4 per device), ``plugin_autoload=False`` (the
``strategies`` plugin is essential and always loads).

    python benchmarks/strategies_throughput.py      # ~1 min here
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import harness

SCRIPT = Path(__file__).resolve()
STRATEGIES = ("single_device", "data_parallel", "fsdp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument("--batch-size", type=int, default=32, help="global batch size")
    p.add_argument("--width", type=int, default=16, help="ResNet-18 stem width (64 = full)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=5,
                   help="timed steps (an epoch of steps+1 batches after a warm-up epoch)")
    harness.add_common_arguments(p)
    p.add_argument("--_strategy", choices=STRATEGIES, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def sizes(args: argparse.Namespace) -> dict:
    if args.quick:
        return {"batch_size": args.devices, "width": 4, "image_size": 8, "steps": 2}
    return {"batch_size": args.batch_size, "width": args.width, "image_size": args.image_size,
            "steps": args.steps}


def run_strategy(args: argparse.Namespace) -> dict:
    """Child side: one timed fit under ``args._strategy``; images/s and bytes per device."""
    import jax
    import workloads

    s = sizes(args)
    per_epoch = s["steps"] + 1
    images, labels = workloads.synthetic_arrays(per_epoch * s["batch_size"], s["image_size"])
    if args.quick:  # the smallest ResNet: the strategies' code paths do not depend on it
        spec = workloads.ModelSpec("simple", kwargs=(("num_blocks", 1), ("initial_features", 4)))
    else:
        spec = workloads.ModelSpec(
            "resnet18", kwargs=() if s["width"] == 64 else (("width", s["width"]),))
    task = workloads.InMemoryResNetTask(images, labels, spec)
    fit = workloads.timed_fit(task, batch_size=s["batch_size"], epochs=2, default_plugins=False,
                              strategy=args._strategy)
    trainer = fit.trainer
    params = workloads.state_bytes_per_device(trainer.state[0])
    opt = workloads.state_bytes_per_device(trainer.state[1])
    devices = [str(d) for d in jax.devices()]
    stats = jax.devices()[0].memory_stats()
    return {
        "images_per_second": fit.images_per_second,
        "devices_used": trainer.strategy.num_devices,
        "params_max": max(params.values()), "params_min": min(params.values()),
        "opt_max": max(opt.values()), "opt_min": min(opt.values()),
        "devices_holding_state": len(set(params) | set(opt)),
        "device_count": len(devices),
        "memory_stats": {k: stats[k] for k in ("peak_bytes_in_use", "bytes_in_use")
                         if k in stats} if stats else None,
        "compile_seconds": fit.compile_seconds,
    }


def mib(n: float) -> str:
    return f"{n / 2**20:7.2f} MiB"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.prepare_runtime(
        quick=args.quick, xla_flags=[f"--xla_force_host_platform_device_count={args.devices}"])
    if args._strategy:
        harness.emit_result(run_strategy(args))
        return 0
    harness.print_header(f"strategies on {args.devices} simulated CPU devices", args)
    s = sizes(args)
    print(f"model resnet18 (cifar stem, width {s['width']}), {s['image_size']}x{s['image_size']}x3"
          f" in memory, global batch {s['batch_size']}, {s['steps']} timed steps", flush=True)
    results = {}
    for name in args.strategies:
        argv_child = [sys.executable, str(SCRIPT), "--_strategy", name,
                      "--devices", str(args.devices), "--batch-size", str(args.batch_size),
                      "--width", str(args.width), "--image-size", str(args.image_size),
                      "--steps", str(args.steps), *(["--quick"] if args.quick else [])]
        if args.quick:  # the smoke run saves three process start-ups: no per-strategy RSS
            args._strategy = name
            r = {**run_strategy(args), "peak_rss_mib": float("nan")}
        else:
            # The child sets the device count itself; do not pass this process's copy twice.
            r = harness.child_result(argv_child, env=_env_without_device_count())
        results[name] = r
        mem = (f"device memory_stats {r['memory_stats']}" if r["memory_stats"] else
               "memory_stats: None on this backend")
        print(f"  {name:<14} {r['images_per_second']:8.1f} images/s on {r['devices_used']} "
              f"device(s); state per device: params {mib(r['params_max'])}, optimizer "
              f"{mib(r['opt_max'])} (max over {r['devices_holding_state']} devices holding "
              f"state); peak RSS {r['peak_rss_mib']:.0f} MiB; {mem}", flush=True)
    if "single_device" in results:
        base = results["single_device"]
        for name in ("data_parallel", "fsdp"):
            if name in results:
                r = results[name]
                print(f"  ratio {name}/single_device: images/s "
                      f"{r['images_per_second'] / base['images_per_second']:.3f}, per-device "
                      f"params+optimizer bytes {(r['params_max'] + r['opt_max']) / (base['params_max'] + base['opt_max']):.3f}")  # noqa: E501
    return 0


def _env_without_device_count() -> dict:
    import os

    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")
             and f not in harness.QUICK_XLA_FLAGS]
    env["XLA_FLAGS"] = " ".join(flags)
    return env


if __name__ == "__main__":
    sys.exit(main())
