"""Where arrays live: the Strategy protocol and the single-device default.

A strategy owns placement only (devices, mesh, batch and state shardings,
process topology). Precision, checkpoint IO and the optimizer step live
elsewhere. Multi-device strategies are plugins (``select_strategy`` hook).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding, SingleDeviceSharding


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
        return jax.device_put(state, self.state_shardings(state))

    @property
    def num_devices(self) -> int:
        """Devices the batch is spread over."""
        return 1


class SingleDeviceStrategy(Strategy):
    """Everything on one device (the first one unless given)."""

    name = "single_device"

    def __init__(self, device: jax.Device | None = None) -> None:
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
