"""nnx_trainer: a Lightning-style training engine for JAX + Flax NNX, extended by pluggy plugins."""

from nnx_trainer.host_memory import prefer_memory_frugal_cpu_schedule

# Before anything can start JAX's CPU backend, which reads XLA_FLAGS once: XLA's
# depth-first schedule shrinks a CPU training step's temporary buffers (host_memory.py).
prefer_memory_frugal_cpu_schedule()

from nnx_trainer.data import MASK_KEY
from nnx_trainer.hookspecs import hookimpl, hookspec
from nnx_trainer.plugin_manager import ENTRY_POINT_GROUP, PluginError
from nnx_trainer.run_lock import RunDirInUse
from nnx_trainer.run_view import RunView
from nnx_trainer.state import CheckpointContent, CheckpointMeta, Outcome, TrainState
from nnx_trainer.strategy import SingleDeviceStrategy, Strategy
from nnx_trainer.task import OptimizerSpec, Task
from nnx_trainer.trainer import Trainer

__all__ = [
    "CheckpointContent",
    "CheckpointMeta",
    "Outcome",
    "TrainState",
    "ENTRY_POINT_GROUP",
    "MASK_KEY",
    "OptimizerSpec",
    "PluginError",
    "RunDirInUse",
    "RunView",
    "SingleDeviceStrategy",
    "Strategy",
    "Task",
    "Trainer",
    "hookimpl",
    "hookspec",
]
