"""ResNet image-classification task for nnx-trainer: data, transforms, model.

``from resnet_task import ResNetTask, ResNetConfig`` (and ``nnx-trainer fit --task
resnet_task.ResNetTask``) names the task. They are imported on first access: the
submodules that need no engine (the data converter, the JPEG decoders, which Grain's
worker processes import too) stay free of Flax, Optax and nnx_trainer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from resnet_task.task import ResNetConfig, ResNetTask

__all__ = ["ResNetConfig", "ResNetTask"]

# Public name -> the submodule that defines it.
_LAZY = {"ResNetConfig": "resnet_task.task", "ResNetTask": "resnet_task.task"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
