"""One of two jax.distributed processes that print the Trainer's default run directory.

``--skew`` moves this process's clock, as two hosts' clocks differ.
"""

from __future__ import annotations

import argparse
import datetime
import os

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--index", type=int, required=True)
parser.add_argument("--skew", type=float, default=0.0)
args = parser.parse_args()
os.environ.update(
    JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{args.port}", JAX_NUM_PROCESSES="2",
    JAX_PROCESS_ID=str(args.index),
)


class SkewedClock(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return super().now(tz) + datetime.timedelta(seconds=args.skew)


datetime.datetime = SkewedClock

import nnx_trainer  # noqa: E402

trainer = nnx_trainer.Trainer(plugin_autoload=False, plugins=["strategies"],
                              strategy="data_parallel")
print("RUN_DIR", trainer.run_dir, flush=True)
