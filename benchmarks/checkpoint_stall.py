"""How long the training loop stalls when it saves a checkpoint (async vs blocking).

Trains the example's default model (ResNet-8: ``simple``, one block per stage, 16
initial features) on the bundled digits at batch 32, three times for ``--steps``
steps each: without checkpoints, with ``--saves`` asynchronous saves and with as
many blocking saves (``OrbaxCheckpoint(every_n_steps=steps // (saves + 1))``).

Each step's loss is waited for in ``on_train_batch_end``, so the time between two
step ends is the wall time of one whole loop iteration (host data, dispatch,
compute, and any save made at that boundary). The save for step ``k`` is made at
the start of the next iteration, so its stall is that iteration's time minus the
mean of that run's other iterations (the no-checkpoint run's mean is printed as a
check that saving does not slow the other steps). The blocking time of the save
call itself (``OrbaxCheckpoint.save``: finite check, device-to-host copy, dispatch;
plus the write and commit when blocking) is measured separately. Validation is off;
iterations at an epoch start (new data pipeline) and the first few (compilation,
warm-up) are left out.

    python benchmarks/checkpoint_stall.py [--steps 150] [--saves 5] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import harness

WARMUP = 5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150, help="training steps per configuration")
    p.add_argument("--saves", type=int, default=5, help="checkpoints per saving configuration")
    harness.add_common_arguments(p)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.saves = 40, 2
    if args.saves < 1 or args.steps // (args.saves + 1) <= WARMUP:
        p.error(f"--steps {args.steps} is too few for --saves {args.saves}: need steps >= "
                f"{(WARMUP + 1) * (args.saves + 1)} and saves >= 1")
    return args


def plugins():
    """The step clock and the timed checkpoint plugin (JAX is imported by now)."""
    import jax

    import nnx_trainer
    from nnx_trainer_plugins.orbax_checkpoint import OrbaxCheckpoint

    class StepClock:
        """Wall-clock time at the end of every step (after the step's result is ready)."""

        name = "step_clock"

        def __init__(self) -> None:
            self.ends: dict[int, float] = {}
            self.epoch_starts: set[int] = set()

        @nnx_trainer.hookimpl
        def on_train_batch_end(self, trainer, step, loss) -> None:
            jax.block_until_ready(loss)
            self.ends[step] = time.perf_counter()
            if trainer.batch_in_epoch == 1:
                self.epoch_starts.add(step)

        def intervals(self) -> dict[int, float]:
            """Seconds of iteration ``s`` (end of step s-1 to end of step s), warm-up excluded."""
            return {
                s: self.ends[s] - self.ends[s - 1]
                for s in sorted(self.ends)
                if s >= WARMUP and s - 1 in self.ends and s not in self.epoch_starts
            }

    class TimedCheckpoint(OrbaxCheckpoint):
        """The checkpoint plugin, timing each blocking ``save`` call."""

        def __init__(self, **kwargs) -> None:
            super().__init__(min_seconds_between_saves=0, **kwargs)  # time every save
            self.save_seconds: dict[int, float] = {}

        def save(self, trainer) -> bool:
            start = time.perf_counter()
            wrote = super().save(trainer)
            if wrote:
                self.save_seconds[trainer.global_step] = time.perf_counter() - start
            return wrote

    return StepClock, TimedCheckpoint


def make_task():
    from resnet_task.task import ResNetConfig, ResNetTask

    return ResNetTask(ResNetConfig(
        dataset="digits", model="simple",
        model_kwargs=(("num_blocks", 1), ("initial_features", 16)),
        optimizer="sgd", learning_rate=0.05, weight_decay=5e-4, warmup_fraction=0.05,
    ))


def run(task, steps: int, run_dir: Path, clock, checkpoint=None):
    import nnx_trainer

    trainer = nnx_trainer.Trainer(
        max_steps=steps, batch_size=32, check_val_every_n_epoch=0, log_every_n_steps=10**9,
        run_dir=run_dir, plugin_autoload=False,
        plugins=[clock] + ([checkpoint] if checkpoint is not None else []),
    )
    trainer.fit(task)
    return trainer


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.prepare_runtime(quick=args.quick)
    harness.print_header(
        "checkpoint stall: asynchronous vs blocking Orbax saves in the loop", args,
        extra_packages=["orbax-checkpoint"],
    )
    import jax
    import numpy as np

    StepClock, TimedCheckpoint = plugins()
    every = args.steps // (args.saves + 1)
    task = make_task()
    with tempfile.TemporaryDirectory(prefix="nnx-bench-ckpt-") as tmp:
        base_clock = StepClock()
        base = run(task, args.steps, Path(tmp) / "none", base_clock)
        normal = list(base_clock.intervals().values())
        step_time = statistics.mean(normal)
        content = base.checkpoint_state()
        leaves = jax.tree.leaves(content.arrays())
        state_mib = sum(x.size * x.dtype.itemsize for x in leaves) / 2**20
        model_values = sum(x.size for x in jax.tree.leaves(content.model))

        results = {}
        for label, async_save in (("async", True), ("blocking", False)):
            clock = StepClock()
            ckpt = TimedCheckpoint(
                every_n_steps=every, every_n_epochs=None, save_on_end=False,
                keep_last=2, async_save=async_save,
            )
            run(task, args.steps, Path(tmp) / label, clock, ckpt)
            iters = clock.intervals()
            saved = sorted(s for s in ckpt.save_seconds if s in iters)
            others = [t for s, t in iters.items() if s not in ckpt.save_seconds]
            # Against this run's own other steps: load on a shared machine drifts between runs.
            own = statistics.mean(others)
            stalls = [iters[s] - own for s in saved]
            results[label] = (saved, stalls, [ckpt.save_seconds[s] for s in saved], own)

    info = task.dataset_info
    print(f"model: ResNet-8 (simple, num_blocks=1, initial_features=16) on {info.name} "
          f"{info.image_shape}, batch 32; model state {model_values / 1e3:.1f} k values "
          f"(params + batch stats); checkpointed state {state_mib:.2f} MiB in {len(leaves)} "
          f"arrays (model, optimizer, train metrics); {args.steps} steps per run, a save "
          f"every {every} steps; device {jax.devices()[0].device_kind} "
          f"x{jax.device_count()}")
    print(f"normal step time: mean {step_time * 1e3:.2f} ms, median "
          f"{statistics.median(normal) * 1e3:.2f} ms, sd {np.std(normal) * 1e3:.2f} ms "
          f"(n={len(normal)}, no checkpoints)")
    ratios = []
    for label, (saved, stalls, calls, own) in results.items():
        if not stalls:
            print(f"{label} save: no save landed on a measured iteration")
            continue
        stall, call = statistics.mean(stalls), statistics.mean(calls)
        ratios.append(f"{label} stall/step {stall / own:.2f}")
        print(f"{label} save: stall {stall * 1e3:.2f} ms per save, median "
              f"{statistics.median(stalls) * 1e3:.2f} ms (iteration with the save minus the "
              f"run's other iterations, mean {own * 1e3:.2f} ms; per save "
              f"{', '.join(f'{x * 1e3:.1f}' for x in stalls)}; saves at steps {saved}); "
              f"save call {call * 1e3:.2f} ms; stall/step = {stall / own:.2f}, "
              f"save call/step = {call / own:.2f}")
    print("ratio " + ", ".join(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
