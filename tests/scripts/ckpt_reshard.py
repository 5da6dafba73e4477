"""Save under one strategy, resume under another (device count and shardings change).

Run with XLA_FLAGS=--xla_force_host_platform_device_count=4 (set by the caller). Prints
one JSON line: whether each restore reproduced the saved arrays and the shardings the
restored arrays got.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_task import TinyTask  # noqa: E402

import nnx_trainer  # noqa: E402
from nnx_trainer_plugins.orbax_checkpoint import OrbaxCheckpoint  # noqa: E402
from nnx_trainer_plugins.strategies import FullyShardedDataParallel  # noqa: E402


class AtStart:
    """The training state as restored (host copies) and its shardings, at fit start."""

    def __init__(self) -> None:
        self.arrays: list[np.ndarray] = []
        self.shardings: list[str] = []

    @nnx_trainer.hookimpl
    def on_fit_start(self, trainer) -> None:
        leaves = jax.tree.leaves(trainer.checkpoint_state().arrays())
        self.arrays = [np.asarray(x) for x in leaves]
        self.shardings = sorted({type(x.sharding).__name__ for x in leaves})


def fit(run_dir: Path, strategy, max_steps: int, resume: str | None):
    start = AtStart()
    trainer = nnx_trainer.Trainer(
        run_dir=run_dir, batch_size=16, max_steps=max_steps, strategy=strategy,
        plugin_autoload=False, plugins=[OrbaxCheckpoint(min_seconds_between_saves=0), start],
    )
    trainer.fit(TinyTask(n_train=64, dim=64), ckpt_path=resume)
    final = [np.asarray(x) for x in jax.tree.leaves(trainer.checkpoint_state().arrays())]
    return start, final, trainer


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def main() -> int:
    base = Path(sys.argv[1])
    fsdp = FullyShardedDataParallel(min_shard_size=16)
    _, saved, _ = fit(base / "one_to_four", "single_device", 3, None)
    start, _, trainer = fit(base / "one_to_four", fsdp, 5, "last")
    report = {
        "devices": jax.device_count(),
        "single_to_fsdp_equal": same(start.arrays, saved),
        "single_to_fsdp_shardings": start.shardings,
        "single_to_fsdp_step": trainer.global_step,
    }
    _, saved, _ = fit(base / "four_to_one", FullyShardedDataParallel(min_shard_size=16), 3, None)
    start, final, trainer = fit(base / "four_to_one", "single_device", 5, "last")
    report.update({
        "fsdp_to_single_equal": same(start.arrays, saved),
        "fsdp_to_single_shardings": start.shardings,
        "fsdp_to_single_finite": all(np.isfinite(x).all() for x in final if x.dtype.kind == "f"),
    })
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
