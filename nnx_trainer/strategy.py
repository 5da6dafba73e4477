"""Where arrays live: the Strategy protocol and the single-device default.

A strategy owns placement only (devices, mesh, batch and state shardings,
process topology). Precision, checkpoint IO and the optimizer step live
elsewhere. Multi-device strategies are plugins (``select_strategy`` hook).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding, SingleDeviceSharding

# The cluster environments JAX's own auto-detection (``jax.distributed.initialize()``
# with no arguments, jax._src.clusters) recognises without extra packages or network
# calls, and the variables it reads (jax 0.10): name -> (variables that must all be
# set, the variable holding the process count).
CLUSTER_ENVIRONMENTS: Mapping[str, tuple[tuple[str, ...], str]] = {
    "slurm": (("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID"), "SLURM_NTASKS"),
    "ompi": (("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
             "OMPI_COMM_WORLD_SIZE"),
}
_CLUSTER_LAUNCHERS = {"slurm": "SLURM's srun", "ompi": "Open MPI's mpirun"}


def detect_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """The multi-process cluster environment this process runs in, or None.

    ``"slurm"`` under ``srun`` with more than one task, ``"ompi"`` under Open MPI's
    ``mpirun`` with more than one rank: the environments whose variables JAX's
    auto-detection reads. A single task (``SLURM_NTASKS=1``: an ``salloc`` shell, a
    one-task job) is not a multi-process run.
    """
    environ = os.environ if environ is None else environ
    for name, (required, count_var) in CLUSTER_ENVIRONMENTS.items():
        if all(var in environ for var in required):
            try:
                if int(environ[count_var]) > 1:
                    return name
            except ValueError:
                continue
    return None


def multi_process_launch(environ: Mapping[str, str] | None = None) -> str | None:
    """How this process was launched as one of several, in words, or None.

    Read from the environment only (the backend stays untouched): ``JAX_NUM_PROCESSES``
    above 1, ``JAX_COORDINATOR_ADDRESS`` without a process count, or a cluster launch
    (:func:`detect_cluster`). ``JAX_NUM_PROCESSES=1`` says "one process" and wins over
    a cluster's variables: the way to run independent one-process trainings under
    ``srun``/``mpirun``.
    """
    environ = os.environ if environ is None else environ
    count = environ.get("JAX_NUM_PROCESSES", "").strip()
    try:
        processes = int(count) if count else None
    except ValueError:
        processes = None
    if processes is not None:
        return f"JAX_NUM_PROCESSES={processes}" if processes > 1 else None
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return f"JAX_COORDINATOR_ADDRESS={environ['JAX_COORDINATOR_ADDRESS']}"
    cluster = detect_cluster(environ)
    if cluster is not None:
        count_var = CLUSTER_ENVIRONMENTS[cluster][1]
        return f"{_CLUSTER_LAUNCHERS[cluster]} ({count_var}={environ[count_var]})"
    return None


def refuse_single_process_in(launch: str, strategy: str) -> ValueError:
    """The error for a one-process strategy in a multi-process launch (``launch``, in words)."""
    return ValueError(
        f"this process was started as one of several ({launch}), but the {strategy} "
        "strategy trains in one process: every process would train alone as process 0, "
        "into the same run directory. Choose a multi-process strategy: "
        "strategy='data_parallel' or 'fsdp' (--strategy data_parallel in "
        "examples/train_resnet.py, --trainer.strategy data_parallel for nnx-trainer fit); "
        "or, for independent one-process runs, set JAX_NUM_PROCESSES=1 and give each its "
        "own run directory"
    )


class Strategy:
    """Placement of batches and training state. Subclass and override what differs."""

    name: str = "strategy"

    def setup(self, global_batch_size: int) -> None:
        """Validate the configuration before anything compiles; raise ValueError with the fix."""
        if global_batch_size % self.process_count:
            raise ValueError(
                f"batch size {global_batch_size} is not divisible by the process count "
                f"{self.process_count}; use a multiple of {self.process_count}"
            )

    # ---- topology ------------------------------------------------------------

    @property
    def process_index(self) -> int:
        """This process's index among all training processes."""
        return jax.process_index()

    @property
    def process_count(self) -> int:
        """How many processes train together."""
        return jax.process_count()

    @property
    def is_main_process(self) -> bool:
        """True in the process that logs, shows progress and owns run-directory files."""
        return self.process_index == 0

    def barrier(self, name: str) -> None:
        """Wait until every process reaches this point (no-op with one process)."""
        if self.process_count > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(name)

    # ---- placement -------------------------------------------------------------

    def batch_sharding(self) -> Sharding:
        """Sharding of a global batch array (leading axis = examples)."""
        raise NotImplementedError

    def state_shardings(self, abstract_state: Any) -> Any:
        """A pytree of shardings matching ``abstract_state`` (params, optimizer, metrics)."""
        raise NotImplementedError

    def shard_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Turn this process's slice of a global batch into global device arrays.

        ``make_array_from_process_local_data`` is the multi-process-correct path and
        also serves one process, so every strategy shares it.
        """
        sharding = self.batch_sharding()
        return {
            key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
            for key, value in local_batch.items()
        }

    def place_state(self, state: Any) -> Any:
        """Move a state pytree onto its shardings."""
        shardings = self.state_shardings(state)
        if not any(map(is_prng_key, jax.tree.leaves(state))):
            return jax.device_put(state, shardings)
        # device_put refuses to place a typed PRNG key (an nnx.RngStream's, e.g.
        # nnx.Dropout(rngs=...)) on the devices of several processes; its key data, uint32
        # words sharded alike along the key's own axes, it places, and the key is rewrapped.
        placed = jax.device_put(jax.tree.map(
            lambda x: jax.random.key_data(x) if is_prng_key(x) else x, state), shardings)
        return jax.tree.map(
            lambda x, p: jax.random.wrap_key_data(p, impl=jax.random.key_impl(x))
            if is_prng_key(x) else p, state, placed)

    @property
    def num_devices(self) -> int:
        """Devices the batch is spread over."""
        return 1


def is_prng_key(x: Any) -> bool:
    """Whether ``x`` is a typed PRNG key array (JAX's extended key dtype)."""
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


class SingleDeviceStrategy(Strategy):
    """Everything on one device (the first one unless given)."""

    name = "single_device"

    def __init__(self, device: jax.Device | None = None) -> None:
        # Checked from the environment before any device query: the refusal comes before
        # the processes of such a launch could collide in one run directory.
        launch = multi_process_launch()
        if launch is not None and not jax.distributed.is_initialized():
            raise refuse_single_process_in(launch, self.name)
        self.device = device if device is not None else jax.local_devices()[0]
        self._sharding = SingleDeviceSharding(self.device)
        # On the CPU backend a device's memory is host memory: there is no transfer to
        # hide, and the compiled step takes NumPy arguments through jit's C++ argument
        # path, placing them next to the (committed) state, for less host CPU than
        # device_put's Python path (about 0.2 ms per step, benchmarks/loop_overhead.py).
        self._host_memory = self.device.platform == "cpu"

    def setup(self, global_batch_size: int) -> None:  # noqa: D102 - see base class
        if self.process_count > 1:
            raise ValueError(
                f"the single_device strategy cannot run in {self.process_count} processes; "
                "choose strategy='data_parallel' or 'fsdp' for multi-process training"
            )

    def batch_sharding(self) -> Sharding:  # noqa: D102
        return self._sharding

    def state_shardings(self, abstract_state: Any) -> Any:  # noqa: D102
        return jax.tree.map(lambda _: self._sharding, abstract_state)

    def shard_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """The batch as the compiled step takes it: on a CPU device, the host arrays themselves."""
        host = {key: np.asarray(value) for key, value in local_batch.items()}
        if self._host_memory and _implicit_transfers_allowed():
            return host
        # One device_put of the whole dict is a single dispatch (cheaper per step).
        return jax.device_put(host, self._sharding)


def _implicit_transfers_allowed() -> bool:
    """False under a host-to-device transfer guard: the batch then goes up explicitly."""
    return (jax.config.jax_transfer_guard_host_to_device in (None, "allow")
            and jax.config.jax_transfer_guard in (None, "allow"))


def resolve_strategy(strategy: str | Strategy, hook: Any, view: Any) -> Strategy:
    """``strategy`` itself, or the strategy a plugin provides under that name
    (``select_strategy``, asked with ``trainer=view``), or the built-in single device."""
    if isinstance(strategy, Strategy):
        return strategy
    chosen = hook.select_strategy(trainer=view, name=strategy)
    if chosen is not None:
        return chosen
    if strategy == SingleDeviceStrategy.name:
        return SingleDeviceStrategy()
    offered = sorted({SingleDeviceStrategy.name, *sum(hook.strategy_names(), [])})
    raise ValueError(f"unknown strategy {strategy!r}; choose one of: {', '.join(offered)}")
