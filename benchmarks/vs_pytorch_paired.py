"""PyTorch versus ours in paired turns: the three sides alive at once, taking turns.

``vs_pytorch.py`` times each side in its own process, one after the other; on a small VM
the machine's own speed drifts by more than the gaps it measures (the same compiled
ResNet-18 step took 2.97-3.79 s within one process, its CPU time moving with it, so
the host, not the program, changed). Here the three sides (PyTorch, the hand JAX loop,
ours ``Trainer.fit``) each start in their own process, compile and warm up one after the
other, and then wait; the parent lets them run ``--turn-steps`` steps each in turn (the
order rotates every round), so the sides of one round ran within seconds of each other.
Per round it takes the ratios of the rates; it reports their median and range, and each
process's peak RSS (``wait4``).

Ours is a real ``Trainer.fit`` (default plugins, one long epoch): a plugin that runs
last after each step holds the loop between turns, waiting for the device at the end of
each turn as the other sides do. Between turns each process is idle, so no two sides
ever share the cores.

    python benchmarks/vs_pytorch_paired.py                   # ResNet-18 CIFAR, ~3 min
    python benchmarks/vs_pytorch_paired.py --suite           # the README's three rows
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import harness
import vs_pytorch

SCRIPT = Path(__file__).resolve()
PREFIX = "PAIRED "  # the protocol's lines on a child's stdout; anything else is ignored
SIDES = ("torch", "jax-hand", "jax-fit")
VARIANT = "jax-fit-flags"  # --also-xla-flags: ours once more, in the same turns
NAN = float("nan")
# Steps per turn for the suite's rows: a turn of 2-4 s on a 2-core CPU.
TURN_STEPS = {("resnet18", 32, 128): 1, ("resnet50", 64, 32): 4, ("resnet50", 224, 16): 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=["resnet18", "resnet50"], default="resnet18",
                   help="resnet18: CIFAR stem at 32x32; resnet50: ImageNet stem at --image-size")
    p.add_argument("--image-size", type=int, default=None,
                   help="input side (default 32 for resnet18, 64 for resnet50)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default 128 for resnet18, 32 for resnet50")
    p.add_argument("--rounds", type=int, default=8, help="turns of each side")
    p.add_argument("--turn-steps", type=int, default=None,
                   help="steps per turn (default: TURN_STEPS for a suite row, else 1)")
    p.add_argument("--suite", action="store_true",
                   help="the README's three rows (ResNet-18 CIFAR 32/128, ResNet-50 64/32 "
                        "and 224/16), one table")
    p.add_argument("--also-xla-flags", default=None, metavar="FLAGS",
                   help="a fourth side in the same turns: ours with these flags added to "
                        "XLA_FLAGS (e.g. --xla_cpu_use_fusion_emitters=false; ' ' runs ours "
                        "twice alike, which shows the method's own spread)")
    harness.add_common_arguments(p)
    p.add_argument("--_serve", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--_steps", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker_args(args: argparse.Namespace) -> argparse.Namespace:
    """The namespace ``vs_pytorch``'s builders read."""
    return argparse.Namespace(model=args.model, image_size=args.image_size,
                              batch_size=args.batch_size, steps=None, quick=args.quick,
                              layout="nhwc", precision="fp32")


# -------------------------------------------------------------------------- child side


def say(kind: str, **fields: Any) -> None:
    print(PREFIX + json.dumps({"kind": kind, **fields}), flush=True)


def turns(run_steps: Any) -> None:
    """Answer the parent's ``run N`` lines until ``stop``: time N steps each."""
    for line in sys.stdin:
        if line.strip() == "stop":
            return
        steps = int(line.split()[1])
        start, cpu = time.perf_counter(), time.process_time()
        run_steps(steps)
        say("turn", seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu)


def serve_fit(args: argparse.Namespace, total_steps: int) -> None:
    """``Trainer.fit`` over ``total_steps`` batches in one epoch, held between turns."""
    import jax
    import workloads

    import nnx_trainer

    class TurnGate:
        """After the second step (the first compiles), wait for the parent's turns."""

        name = "benchmark_turn_gate"

        def __init__(self) -> None:
            self.steps = self.left = 0
            self.start = self.cpu = 0.0

        def next_turn(self, trainer: Any) -> None:
            line = sys.stdin.readline().strip()
            if not line or line == "stop":
                trainer.should_stop = True
                return
            self.left = int(line.split()[1])
            self.start, self.cpu = time.perf_counter(), time.process_time()

        @nnx_trainer.hookimpl(trylast=True)
        def on_train_batch_end(self, trainer: Any, loss: Any) -> None:
            self.steps += 1
            if self.steps == 2:
                jax.block_until_ready(loss)
                say("ready")
                self.next_turn(trainer)
            elif self.left:
                self.left -= 1
                if not self.left:
                    jax.block_until_ready(loss)
                    say("turn", seconds=time.perf_counter() - self.start,
                        cpu_seconds=time.process_time() - self.cpu)
                    self.next_turn(trainer)

    # Four batches of images in memory, as on the other sides, repeated for the epoch
    # (Grain's repeat copies nothing; a bigger array would add its size to the peak).
    task = vs_pytorch.jax_task(args, 4)
    examples = task.train_data().repeat(math.ceil(total_steps / 4))
    task.train_data = lambda: examples
    batch = vs_pytorch.sizes(args)["batch_size"]
    with tempfile.TemporaryDirectory(prefix="nnx-bench-") as run_dir:
        nnx_trainer.Trainer(max_epochs=1, batch_size=batch, run_dir=run_dir,
                            plugins=[TurnGate(), workloads.quiet_progress()]).fit(task)


def serve(args: argparse.Namespace) -> None:
    side, wargs = args._serve, worker_args(args)
    if side == "torch":
        run, _ = vs_pytorch.torch_stepper(wargs)
        say("ready")
        turns(run)
        return
    harness.prepare_runtime(quick=args.quick)
    if side == "jax-fit":
        serve_fit(wargs, args._steps)
        return
    loop = vs_pytorch.hand_loop(wargs)  # compiled by its first step
    loop.run(1)  # a second warm-up step, as the other sides take
    say("ready")
    turns(loop.run)


# ------------------------------------------------------------------------- parent side


class Side:
    """One side's process: started, then told to run turns; its peak RSS read at exit."""

    def __init__(self, args: argparse.Namespace, side: str, total_steps: int,
                 name: str | None = None, xla_flags: str = "") -> None:
        argv = [sys.executable, str(SCRIPT), "--_serve", side, "--model", args.model,
                "--_steps", str(total_steps),
                *(["--image-size", str(args.image_size)] if args.image_size else []),
                *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
                *(["--quick"] if args.quick else [])]
        env = harness.child_environment()
        if xla_flags.strip():
            env["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), xla_flags]).strip()
        self.name, self.errors = name or side, tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.errors, text=True, env=env,
                                     cwd=harness.REPO_ROOT)
        self.expect("ready")

    def expect(self, kind: str) -> dict:
        out: IO[str] = self.proc.stdout  # type: ignore[assignment]
        for line in out:
            if line.startswith(PREFIX):
                message = json.loads(line[len(PREFIX):])
                if message["kind"] == kind:
                    return message
        self.errors.seek(0)
        raise harness.ChildFailed(f"{self.name} ended before '{kind}':\n"
                                  + self.errors.read()[-3000:])

    def turn(self, steps: int) -> dict:
        self.proc.stdin.write(f"run {steps}\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self.expect("turn")

    def stop(self) -> float:
        """Let the process finish; its peak RSS, MiB."""
        self.proc.stdin.write("stop\n")  # type: ignore[union-attr]
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.stdout.read()  # type: ignore[union-attr]
        _, status, usage = os.wait4(self.proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            self.errors.seek(0)
            raise harness.ChildFailed(f"{self.name} exited {status}:\n"
                                      + self.errors.read()[-3000:])
        return usage.ru_maxrss / 1024


def measure(args: argparse.Namespace) -> dict:
    """One configuration: the three sides started, ``--rounds`` rounds of turns, stopped."""
    s = vs_pytorch.sizes(worker_args(args))
    key = (args.model, s["image_size"], s["batch_size"])
    steps = args.turn_steps or TURN_STEPS.get(key, 1)
    stem = "imagenet" if args.model == "resnet50" else "cifar"
    print(f"model {args.model} ({stem} stem, width {s['width']}), {s['image_size']}x"
          f"{s['image_size']}x3 float32 in memory, batch {s['batch_size']}; {args.rounds} "
          f"rounds of {steps} step(s) per side", flush=True)
    total = args.rounds * steps + 3
    # Without PyTorch the two JAX sides still run (the smoke test's environment): every
    # ratio to PyTorch is then NaN.
    sides = [Side(args, side, total) for side in SIDES
             if side != "torch" or vs_pytorch.torch_available()]
    labels = dict(vs_pytorch.SIDES)
    if args.also_xla_flags is not None:  # ours again, compiled with other XLA flags
        sides.append(Side(args, "jax-fit", total, name=VARIANT, xla_flags=args.also_xla_flags))
        labels[VARIANT] = f"ours with XLA_FLAGS += {args.also_xla_flags.strip() or '(none)'}"
    names = [side.name for side in sides]
    rates: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for index in range(args.rounds):
        shift = index % len(sides)
        for side in sides[shift:] + sides[:shift]:
            turn = side.turn(steps)
            rates[side.name].append(steps * s["batch_size"] / turn["seconds"])
            cpu[side.name].append(turn["cpu_seconds"] / steps * 1e3)
        print(f"  round {index + 1}: " + ", ".join(
            f"{name} {rates[name][-1]:.1f}" for name in names) + " images/s", flush=True)
    peaks = {side.name: side.stop() for side in sides}
    result: dict[str, Any] = {"rates": rates, "peaks": peaks}
    for name, versus in (("jax-hand", "torch"), ("jax-fit", "torch"), (VARIANT, "jax-fit")):
        if name in rates and versus in rates:
            ratios = [a / b for a, b in zip(rates[name], rates[versus], strict=True)]
            result[name] = (harness.median(ratios), min(ratios), max(ratios))
    for name in names:
        print(f"  {labels[name]:<62} {harness.median(rates[name]):7.1f} images/s  "
              f"CPU {harness.median(cpu[name]):7.0f} ms/step  peak RSS {peaks[name]:6.0f} MiB")
    for name, label in (("jax-fit", "ours"), ("jax-hand", "jax-hand")):
        mid, low, high = result.setdefault(name, (NAN,) * 3)
        print(f"  ratio {label}/pytorch (images/s), median of {args.rounds} paired rounds: "
              f"{mid:.3f} (range {low:.3f}-{high:.3f})")
    peaks.setdefault("torch", NAN)
    print(f"  ratio peak RSS ours/pytorch: {peaks['jax-fit'] / peaks['torch']:.2f}", flush=True)
    if VARIANT in result:
        mid, low, high = result[VARIANT]
        print(f"  ratio ours with the flags/ours (images/s): {mid:.3f} (range {low:.3f}-"
              f"{high:.3f}); peak RSS {peaks[VARIANT] / peaks['jax-fit']:.2f}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._serve:
        serve(args)
        return 0
    if args.quick:
        args.rounds = min(args.rounds, 2)
    harness.print_header("ResNet training, paired turns: PyTorch vs nnx-trainer", args,
                         extra_packages=["torch"])
    if not vs_pytorch.torch_available():
        print("PyTorch is not installed: pip install -e '.[bench]' (torch==2.13.0, CPU build)")
    configs = ([(model, side, batch) for model, side, batch, _ in vs_pytorch.SUITE]
               if args.suite else [(args.model, args.image_size, args.batch_size)])
    rows = []
    for model, side, batch in configs:
        print(flush=True)
        row_args = argparse.Namespace(**{**vars(args), "model": model, "image_size": side,
                                         "batch_size": batch})
        rows.append((row_args, measure(row_args)))
    print(f"\n| model, input, batch | ours / PyTorch, median (range) of {args.rounds} paired "
          "rounds | hand JAX / PyTorch | peak RSS ours / PyTorch |"
          + (" ours with the flags / ours (speed, peak RSS) |" if args.also_xla_flags is not None
             else "") + "\n|---|---|---|---|" + ("---|" if args.also_xla_flags is not None else ""))
    for row_args, r in rows:
        s = vs_pytorch.sizes(worker_args(row_args))
        stem = "ImageNet" if row_args.model == "resnet50" else "CIFAR"
        fit, hand = r["jax-fit"], r["jax-hand"]
        print(f"| {row_args.model} {stem} stem, {s['image_size']}², {s['batch_size']} "
              f"| **{fit[0]:.2f}** ({fit[1]:.2f}-{fit[2]:.2f}) "
              f"| {hand[0]:.2f} ({hand[1]:.2f}-{hand[2]:.2f}) "
              f"| {r['peaks']['jax-fit'] / r['peaks']['torch']:.2f} |", end="")
        if VARIANT in r:
            low, high = r[VARIANT][1], r[VARIANT][2]
            print(f" {r[VARIANT][0]:.2f} ({low:.2f}-{high:.2f}), "
                  f"{r['peaks'][VARIANT] / r['peaks']['jax-fit']:.2f} |", end="")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
