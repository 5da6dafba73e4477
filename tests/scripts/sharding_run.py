"""Train TinyTask under several strategies in one process; print a JSON report.

Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (set by the caller,
before JAX starts) to get 8 CPU devices.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_task import TinyTask, value_errors  # noqa: E402

import nnx_trainer  # noqa: E402
from nnx_trainer_plugins.strategies import DataParallel, FullyShardedDataParallel  # noqa: E402


class Record:
    """Per-step losses and the sharding of the first batch."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.batch_sharding = None

    @nnx_trainer.hookimpl
    def on_train_batch_start(self, batch):
        if self.batch_sharding is None:
            # On one CPU device the step takes the host (NumPy) batch, which has no sharding.
            sharding = getattr(batch["image"], "sharding", None)
            self.batch_sharding = str(getattr(sharding, "spec", "single"))

    @nnx_trainer.hookimpl
    def on_train_batch_end(self, loss):
        self.losses.append(float(loss))


def run(strategy, precision: str = "fp32") -> dict:
    rec = Record()
    trainer = nnx_trainer.Trainer(
        max_epochs=3, batch_size=16, strategy=strategy, plugin_autoload=False,
        plugins=[rec], run_dir="/tmp/unused", precision=precision,
    )
    trainer.fit(TinyTask(n_train=64, dim=64))
    params = nnx.state(trainer.model, nnx.Param)
    kernel = trainer.state[0]["fc1"]["kernel"][...]
    return {
        "losses": rec.losses,
        "params": [np.asarray(x).tolist() for x in jax.tree.leaves(params)],
        "param_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(params)}),
        "batch_spec": rec.batch_sharding,
        "kernel_shape": list(kernel.shape),
        "kernel_shard_shapes": [list(s.data.shape) for s in kernel.addressable_shards],
        "val_accuracy": float(trainer.callback_metrics["val/accuracy"]),
    }


if __name__ == "__main__":
    report = {"devices": jax.device_count()}
    report["single_device"] = run("single_device")
    report["data_parallel"] = run("data_parallel")
    report["fsdp"] = run(FullyShardedDataParallel(min_shard_size=64))
    report["data_parallel_bf16"] = run(DataParallel(), precision="bf16")
    report["errors"] = value_errors({
        "indivisible_batch": lambda: nnx_trainer.Trainer(
            batch_size=12, strategy="data_parallel", plugin_autoload=False,
            plugins=["strategies"], run_dir="/tmp/unused",
        ).fit(TinyTask()),
        "too_many_devices": lambda: DataParallel(num_devices=16),
        "unknown": lambda: nnx_trainer.Trainer(strategy="ddp", plugins=["strategies"],
                                               plugin_autoload=False),
    })
    fsdp = FullyShardedDataParallel()
    report["fsdp_specs"] = {
        str(shape): str(fsdp.leaf_spec(shape))
        for shape in [(3, 3, 64, 128), (100,), (4096,), (1000, 24), (7, 9, 33)]
    }
    print("REPORT " + json.dumps(report))
