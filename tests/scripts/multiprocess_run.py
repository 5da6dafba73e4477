"""One process of a data-parallel run over jax.distributed (gloo on CPU); writes its losses.

With ``--count 1`` it is a plain single-device run (no jax.distributed), so a test can
hand checkpoints between a 2-process run and a 1-process run in either direction.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
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
args = parser.parse_args()
if args.count > 1:
    os.environ.update(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{args.port}", JAX_NUM_PROCESSES=str(args.count),
        JAX_PROCESS_ID=str(args.index),
    )

from tiny_task import TinyTask  # noqa: E402

import nnx_trainer  # noqa: E402


class Record:
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    @nnx_trainer.hookimpl
    def on_train_batch_end(self, step, loss):
        self.losses[step] = float(loss)


rec = Record()
plugins: list = ["strategies", rec]
if args.run_dir:
    plugins.append("checkpoint")
trainer = nnx_trainer.Trainer(
    max_steps=args.max_steps, batch_size=16, plugin_autoload=False, plugins=plugins,
    strategy="data_parallel" if args.count > 1 else "single_device",
    run_dir=args.run_dir or "/tmp/unused",
)
trainer.fit(TinyTask(n_train=64, dim=64), ckpt_path=args.resume)
import jax  # noqa: E402

Path(args.out).write_text(json.dumps({
    "losses": rec.losses, "process_count": jax.process_count(),
    "devices": jax.device_count(),
    "val_accuracy": float(trainer.validate(trainer.task)["val/accuracy"]),
}))
