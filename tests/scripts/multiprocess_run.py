"""One process of a data-parallel run over jax.distributed (gloo on CPU); prints its losses.

Usage: multiprocess_run.py PORT NUM_PROCESSES PROCESS_ID OUT_JSON
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

port, count, index, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
os.environ.update(
    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(count),
    JAX_PROCESS_ID=str(index),
)

from tiny_task import TinyTask  # noqa: E402

import nnx_trainer  # noqa: E402


class Record:
    def __init__(self) -> None:
        self.losses: list[float] = []

    @nnx_trainer.hookimpl
    def on_train_batch_end(self, loss):
        self.losses.append(float(loss))


rec = Record()
trainer = nnx_trainer.Trainer(
    max_epochs=2, batch_size=16, strategy="data_parallel", plugin_autoload=False,
    plugins=["strategies", rec], run_dir="/tmp/unused",
)
trainer.fit(TinyTask(n_train=64, dim=64))
import jax  # noqa: E402

Path(out).write_text(json.dumps({
    "losses": rec.losses, "process_count": jax.process_count(),
    "devices": jax.device_count(),
    "val_accuracy": float(trainer.validate(trainer.task)["val/accuracy"]),
}))
