"""Sharding strategies over ``jax.sharding`` meshes: data parallel and FSDP, one or many processes.

Chosen by name through the ``select_strategy`` hook (``Trainer(strategy="fsdp")``,
``--strategy fsdp`` in the example), or passed as objects. ``data_parallel`` and
``fsdp`` build a one-axis mesh named ``"data"`` over every device of every process;
``mesh`` (or ``fsdp`` with ``axes=``) a mesh with more named axes, ``("data",
"model")``, whose parameters are placed by the model's own ``nnx.with_partitioning``
annotations. XLA inserts the collectives.

Multi-process runs call :func:`initialize_distributed` (done by the strategies
themselves) which wraps ``jax.distributed.initialize``: it reads the usual
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` variables,
or, under SLURM (``srun`` with more than one task) or Open MPI (``mpirun``), lets JAX's
cluster auto-detection find the coordinator, process count and id. It must run before
JAX touches a device.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nnx_trainer import Strategy, hookimpl

# Cluster detection lives in the engine, which also needs it (to refuse a one-process
# strategy in a multi-process launch); importable from here as before.
from nnx_trainer.strategy import CLUSTER_ENVIRONMENTS, detect_cluster  # noqa: F401
from nnx_trainer_plugins import partition_rules
from nnx_trainer_plugins.partition_rules import Rules, mesh_shape

DATA_AXIS = "data"
_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Join a multi-process run if one is configured; return True when running distributed.

    - Explicit: arguments, else ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
      ``JAX_PROCESS_ID``. A cluster environment (below) fills in the count and id that
      are not given.
    - Detected: under SLURM (``srun``, more than one task) or Open MPI (``mpirun``, more
      than one rank), see :func:`detect_cluster`, ``jax.distributed.initialize()`` is
      called without arguments and JAX's cluster auto-detection derives the coordinator
      (SLURM: the first node of ``SLURM_STEP_NODELIST``, a port from the job id, or
      ``JAX_COORDINATOR_PORT``), the process count and the process id.
    - Neither: nothing happens (one process).

    Already initialised (``jax.distributed.is_initialized()``): nothing to do, True.
    On CPU the collectives go through gloo, the implementation that works across processes.
    """
    if jax.distributed.is_initialized():
        return True
    env = {k: os.environ.get(k) for k in _DISTRIBUTED_ENV}
    address = coordinator_address or env["JAX_COORDINATOR_ADDRESS"]
    cluster = detect_cluster()
    if address is None and cluster is None:
        return False
    count = num_processes if num_processes is not None else env["JAX_NUM_PROCESSES"]
    index = process_id if process_id is not None else env["JAX_PROCESS_ID"]
    if address is not None and cluster is None and (count is None or index is None):
        raise ValueError(
            "a coordinator address is set but not the process count and id; set "
            "JAX_NUM_PROCESSES and JAX_PROCESS_ID (or pass num_processes/process_id)"
        )
    kwargs: dict[str, Any] = {}
    if address is not None:
        kwargs["coordinator_address"] = address
    if count is not None:
        kwargs["num_processes"] = int(count)
    if index is not None:
        kwargs["process_id"] = int(index)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)  # JAX detects what is not given (SLURM, Open MPI)
    except RuntimeError as exc:
        if "before any JAX calls" not in str(exc):
            raise
        raise ValueError(
            "cannot join the multi-process run: something in this process already used "
            "JAX's devices (an array, a random key, jax.devices(), a model initialised "
            "outside the Trainer) before the Trainer joined jax.distributed; build the "
            "Trainer first, or call nnx_trainer_plugins.strategies.initialize_distributed() "
            "at the start of the program"
        ) from exc
    return True


class MeshStrategy(Strategy):
    """A ``"data"`` mesh over ``num_devices`` devices (default: all of them); ``axes``
    (``{"data": 4, "model": 2}``) gives it more named axes. Batches shard over ``data``.
    """

    def __init__(self, num_devices: int | None = None,
                 axes: Mapping[str, int] | None = None) -> None:
        initialize_distributed()
        available = jax.devices()
        if num_devices is None:
            num_devices = len(available)
        if num_devices < 1 or num_devices > len(available):
            raise ValueError(
                f"{self.name} asked for {num_devices} devices but {len(available)} are "
                f"available; use num_devices <= {len(available)} (on CPU, "
                "XLA_FLAGS=--xla_force_host_platform_device_count=N simulates N devices)"
            )
        if num_devices % jax.process_count():
            raise ValueError(
                f"{num_devices} devices cannot be split evenly over {jax.process_count()} "
                "processes; use a multiple of the process count"
            )
        per_process = num_devices // jax.process_count()
        # Devices ordered process by process, so each process's rows of a global batch
        # land on its own devices (make_array_from_process_local_data relies on it).
        devices = [
            d for p in range(jax.process_count())
            for d in [d for d in available if d.process_index == p][:per_process]
        ]
        shape = mesh_shape(axes or {DATA_AXIS: -1}, num_devices)
        # Row-major: the last axes (e.g. "model") vary fastest, over neighbouring devices
        # of one process, where their collectives are cheapest.
        self.mesh = Mesh(np.array(devices).reshape(tuple(shape.values())), tuple(shape))
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._batch = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))

    @property
    def num_devices(self) -> int:  # noqa: D102 - see base class
        return self.mesh.size

    def setup(self, global_batch_size: int) -> None:
        """Check the global batch splits evenly over the devices."""
        super().setup(global_batch_size)
        ways = self.mesh.shape[DATA_AXIS]
        if global_batch_size % ways:
            raise ValueError(
                f"batch size {global_batch_size} is not divisible by the {ways} "
                f"devices of the {self.name} mesh's data axis; use a multiple of {ways} "
                f"(e.g. {ways * max(1, round(global_batch_size / ways))})"
            )

    def batch_sharding(self) -> NamedSharding:
        """Examples split along the ``data`` axis."""
        return self._batch


class DataParallel(MeshStrategy):
    """Batch sharded over all devices; parameters and optimizer state replicated."""

    name = "data_parallel"

    def state_shardings(self, abstract_state: Any) -> Any:
        """Every state leaf replicated on every device."""
        return jax.tree.map(lambda _: self._replicated, abstract_state)


class FullyShardedDataParallel(MeshStrategy):
    """Batch sharded; parameters and optimizer state placed by the model's own sharding
    annotations where they name a mesh axis (see :mod:`partition_rules`), every other
    leaf sharded along its largest axis that divides by the ``data`` axis.

    Leaves smaller than ``min_shard_size`` elements (biases, norms, scalars) stay
    replicated: sharding them costs more in collectives than it saves in memory.

    :param num_devices: devices to use (default: all).
    :param min_shard_size: smallest unannotated leaf that is sharded.
    :param axes: the mesh's named axes and sizes, ``{"data": 4, "model": 2}`` (one
        size may be -1: the rest); default one ``data`` axis.
    :param rules: logical axis rules, ``[("mlp", "model"), ("embed", None)]``: which
        mesh axis each annotated dimension name shards over.
    """

    name = "fsdp"

    def __init__(self, num_devices: int | None = None, min_shard_size: int = 2**10,
                 axes: Mapping[str, int] | None = None, rules: Rules = ()) -> None:
        super().__init__(num_devices, axes)
        if min_shard_size < 1:
            raise ValueError(f"min_shard_size must be >= 1, got {min_shard_size}")
        self.min_shard_size = min_shard_size
        self.rules = tuple(rules)

    def leaf_spec(self, shape: tuple[int, ...]) -> PartitionSpec:
        """The partition of an unannotated array: its largest axis divisible by ``data``."""
        if int(np.prod(shape, dtype=np.int64)) < self.min_shard_size:
            return PartitionSpec()
        ways = self.mesh.shape[DATA_AXIS]
        candidates = [i for i, n in enumerate(shape) if n % ways == 0]
        if not candidates:
            return PartitionSpec()
        axis = max(candidates, key=lambda i: shape[i])
        spec: list[str | None] = [None] * len(shape)
        spec[axis] = DATA_AXIS
        return PartitionSpec(*spec)

    def state_shardings(self, abstract_state: Any) -> Any:
        """Annotated leaves as annotated, large others sharded, small ones replicated."""
        return partition_rules.state_shardings(
            abstract_state, self.mesh, self.rules, self.leaf_spec
        )


class MeshParallel(FullyShardedDataParallel):
    """Data x model parallel (tensor parallel): a mesh with named axes, default
    ``{"data": -1, "model": 2}``; parameters placed by their annotations, the rest
    as in ``fsdp`` over the ``data`` axis (``min_shard_size`` large: replicated).

    ``Trainer(strategy=MeshParallel(axes={"data": 4, "model": 2}, rules=[("mlp", "model")]))``
    """

    name = "mesh"

    def __init__(self, axes: Mapping[str, int] | None = None, rules: Rules = (),
                 num_devices: int | None = None, min_shard_size: int = 2**10) -> None:
        super().__init__(num_devices, min_shard_size, axes or {DATA_AXIS: -1, "model": 2},
                         rules)


STRATEGIES: Mapping[str, type[Strategy]] = {
    DataParallel.name: DataParallel,
    FullyShardedDataParallel.name: FullyShardedDataParallel,
    MeshParallel.name: MeshParallel,
}


@hookimpl
def strategy_names() -> list[str]:
    """The strategies this plugin provides."""
    return sorted(STRATEGIES)


@hookimpl
def select_strategy(name: str) -> Strategy | None:
    """Build the named strategy over all devices, or None for names it does not know."""
    cls = STRATEGIES.get(name)
    return cls() if cls is not None else None
