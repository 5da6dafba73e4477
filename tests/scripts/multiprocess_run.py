"""One process of a data-parallel run over jax.distributed (gloo on CPU); writes its losses.

With ``--count 1`` it is a plain single-device run (no jax.distributed), so a test can
hand checkpoints between a 2-process run and a 1-process run in either direction.

``--clock-seconds-per-step S`` gives Orbax's checkpoint manager in this process a fake
wall clock reading ``global_step * S`` (see tests/fake_clock.py), so two processes can
disagree about the time; the checkpoint plugin then uses the default cadence (every
epoch, throttled by ``--ckpt-min-seconds``) and the report lists the steps it saved.

``--stream`` trains tiny_task.StreamingTinyTask (a grain.IterDataset) instead, ``--dropout``
tiny_task.DropoutTask (a model holding an RNG stream).

``--marker PATH --marker-step K``: after step K this process writes PATH (a parent
waits for it, then signals this process) and every step from there on sleeps
``--step-sleep`` seconds, so a preemption notice has time to reach every process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, default=0)
parser.add_argument("--count", type=int, default=1)
parser.add_argument("--index", type=int, default=0)
parser.add_argument("--out", required=True)
parser.add_argument("--max-steps", type=int, default=8)
parser.add_argument("--run-dir", default=None, help="enables the checkpoint plugin")
parser.add_argument("--resume", default=None)
parser.add_argument("--clock-seconds-per-step", type=float, default=None)
parser.add_argument("--ckpt-min-seconds", type=float, default=60.0)
parser.add_argument("--marker", default=None)
parser.add_argument("--marker-step", type=int, default=4)
parser.add_argument("--step-sleep", type=float, default=0.05)
parser.add_argument("--stream", action="store_true", help="train on a grain.IterDataset")
parser.add_argument("--dropout", action="store_true",
                    help="train tiny_task.DropoutTask (an RNG stream in the model's state)")
parser.add_argument("--predict", action="store_true", help="report trainer.predict's rows")
args = parser.parse_args()
if args.count > 1:
    os.environ.update(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{args.port}", JAX_NUM_PROCESSES=str(args.count),
        JAX_PROCESS_ID=str(args.index),
    )

from tiny_task import DropoutTask, StreamingTinyTask, TinyTask  # noqa: E402

import nnx_trainer  # noqa: E402


class Record:
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    @nnx_trainer.hookimpl
    def on_train_batch_end(self, step, loss):
        self.losses[step] = float(loss)


class Clocked:
    def __init__(self, clock) -> None:
        self.clock = clock

    @nnx_trainer.hookimpl
    def on_train_batch_end(self, trainer):
        self.clock.seconds = trainer.global_step * args.clock_seconds_per_step


class Marker:
    @nnx_trainer.hookimpl
    def on_train_batch_end(self, trainer):
        if trainer.global_step == args.marker_step:
            Path(args.marker).write_text(str(os.getpid()))
        if trainer.global_step >= args.marker_step:
            time.sleep(args.step_sleep)


rec = Record()
plugins: list = ["strategies", rec]
if args.marker and args.index == 1:
    plugins.append(Marker())
checkpoint = None
if args.run_dir and args.clock_seconds_per_step is not None:
    from fake_clock import FakeClock

    from nnx_trainer_plugins.orbax_checkpoint import OrbaxCheckpoint

    checkpoint = OrbaxCheckpoint(min_seconds_between_saves=args.ckpt_min_seconds, keep_last=50)
    plugins += [checkpoint, Clocked(FakeClock().install())]
elif args.run_dir:
    plugins.append("checkpoint")
trainer = nnx_trainer.Trainer(
    max_steps=args.max_steps, batch_size=16, plugin_autoload=False, plugins=plugins,
    strategy="data_parallel" if args.count > 1 else "single_device",
    run_dir=args.run_dir or "/tmp/unused",
)
task_class = StreamingTinyTask if args.stream else DropoutTask if args.dropout else TinyTask
trainer.fit(task_class(n_train=64, dim=64), ckpt_path=args.resume)
import jax  # noqa: E402

Path(args.out).write_text(json.dumps({
    "losses": rec.losses, "process_count": jax.process_count(),
    "devices": jax.device_count(),
    "saved_steps": checkpoint.saved_steps if checkpoint is not None else None,
    "global_step": trainer.global_step, "preempted": trainer.preempted,
    "stop_reason": trainer.stop_reason,
    "val_accuracy": float(trainer.validate(trainer.task)["val/accuracy"]),
    "predictions": trainer.predict(trainer.task).tolist() if args.predict else None,
}))
