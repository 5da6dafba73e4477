"""Starting cooperating test processes: a free coordinator port and a clean environment."""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(devices: int | None = None) -> dict[str, str]:
    """This environment without ``JAX_*`` variables and ``XLA_FLAGS``, so a child process
    joins no run by accident; ``devices`` simulates that many CPU devices in it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.pop("XLA_FLAGS", None)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def script_env() -> dict[str, str]:
    """:func:`clean_env` for a test script's training process: CPU only, and only the
    plugins the script registers itself (no autoload)."""
    return {**clean_env(), "JAX_PLATFORMS": "cpu", "NNX_TRAINER_DISABLE_PLUGIN_AUTOLOAD": "1"}


def jax_process_env(port: int, count: int, index: int) -> dict[str, str]:
    """The variables the multi-process launch of docs/sharding.md sets for process ``index``."""
    return {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(count),
            "JAX_PROCESS_ID": str(index)}
