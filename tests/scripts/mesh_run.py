"""Train an annotated MLP on 2-D meshes, check placements, move checkpoints between
meshes; print one JSON report line. Run with 8 simulated CPU devices (set by the caller).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_task import AnnotatedTask, TinyTask, value_errors  # noqa: E402

import nnx_trainer  # noqa: E402
from nnx_trainer.task import OptimizerSpec  # noqa: E402
from nnx_trainer_plugins.orbax_checkpoint import OrbaxCheckpoint  # noqa: E402
from nnx_trainer_plugins.strategies import (  # noqa: E402
    DataParallel,
    FullyShardedDataParallel,
    MeshParallel,
)

RULES = [("mlp", "model"), ("embed", None)]


class TwoOptimizerAnnotated(AnnotatedTask):
    def configure_optimizer(self, total_steps):
        return {"up": OptimizerSpec(optax.adam(1e-2), wrt=nnx.PathContains("up")),
                "down": OptimizerSpec(optax.sgd(0.1, momentum=0.9),
                                      wrt=nnx.PathContains("down"))}


class Losses:
    def __init__(self) -> None:
        self.values: list[float] = []

    @nnx_trainer.hookimpl
    def on_train_batch_end(self, loss):
        self.values.append(float(loss))


def fit(strategy, task, run_dir=None, max_steps=12, resume=None, checkpoint=False):
    losses = Losses()
    plugins = [losses] + ([OrbaxCheckpoint(min_seconds_between_saves=0)] if checkpoint else [])
    trainer = nnx_trainer.Trainer(
        max_steps=max_steps, batch_size=16, strategy=strategy, plugin_autoload=False,
        plugins=plugins, run_dir=run_dir or "/tmp/unused",
    )
    trainer.fit(task, ckpt_path=resume)
    return trainer, losses.values


def params(trainer) -> list[list[float]]:
    return [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(
        nnx.state(trainer.model, nnx.Param))]


def placements(trainer) -> dict[str, object]:
    """Each parameter's PartitionSpec and one shard's shape, and the Adam moments' specs."""
    out = {}
    for path, var in nnx.to_flat_state(trainer.state.model):
        key = ".".join(map(str, path))
        value = var.get_value()
        out[key] = [str(value.sharding.spec), list(value.addressable_shards[0].data.shape)]
    optimizer = trainer.state.optimizer
    states = optimizer if isinstance(optimizer, dict) else {"default": optimizer}
    for name, state in states.items():
        for path, var in nnx.to_flat_state(state):
            if "mu" in map(str, path):
                key = ".".join(map(str, path))
                out[f"opt.{name}.{key}"] = str(var.get_value().sharding.spec)
    return out


def main() -> int:
    base = Path(sys.argv[1])
    task = AnnotatedTask(n_train=64, dim=64)
    report: dict = {"devices": jax.device_count()}
    single, report["single_losses"] = fit("single_device", task)
    report["single_params"] = params(single)
    for shape in ((4, 2), (2, 4)):
        trainer, losses = fit(MeshParallel(axes={"data": shape[0], "model": shape[1]},
                                           rules=RULES), task)
        report[f"mesh_{shape[0]}x{shape[1]}"] = {
            "losses": losses, "params": params(trainer), "placements": placements(trainer),
            "batch_spec": str(trainer.strategy.batch_sharding().spec),
        }
    fsdp, losses = fit(FullyShardedDataParallel(min_shard_size=16, rules=[("mlp", "data")]),
                       task)
    report["fsdp_annotated"] = {"losses": losses, "placements": placements(fsdp)}
    unannotated, _ = fit(MeshParallel(axes={"data": 4, "model": 2}, min_shard_size=16),
                         TinyTask(n_train=64, dim=64))
    report["mesh_unannotated"] = placements(unannotated)

    # One checkpoint through (8,) data parallel -> (4, 2) -> single device, two optimizers.
    two = TwoOptimizerAnnotated(n_train=64, dim=64)
    _, full = fit("single_device", two, max_steps=9)
    run = base / "moving"
    _, first = fit(DataParallel(), two, run, max_steps=3, checkpoint=True)
    mesh = MeshParallel(axes={"data": 4, "model": 2}, rules=RULES)
    middle_trainer, middle = fit(mesh, two, run, max_steps=6, resume="last", checkpoint=True)
    report["moved_mesh_placements"] = placements(middle_trainer)
    _, last = fit("single_device", two, run, max_steps=9, resume="last", checkpoint=True)
    report["moving"] = {"full": full, "resumed": first + middle + last}
    report["errors"] = value_errors({
        "bad_axes": lambda: MeshParallel(axes={"data": 3, "model": 2}),
        "no_data_axis": lambda: MeshParallel(axes={"model": 8}),
        "indivisible": lambda: fit(MeshParallel(axes={"data": 2, "model": 4}, rules=RULES),
                                   type("Odd", (AnnotatedTask,), {"hidden": 10})(dim=64)),
    })
    print("REPORT " + json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
