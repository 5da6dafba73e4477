"""Optional libraries, imported where they are first needed, with the extra that brings each.

``import resnet_task`` and a task on synthetic data need neither of them: Pillow decodes
and resizes images (``pip install "nnx-trainer[images]"``), scikit-learn ships the bundled
digits (``pip install "nnx-trainer[examples]"``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]

# Top-level import name -> (distribution, extra that installs it).
_EXTRAS = {"PIL": ("Pillow", "images"), "sklearn": ("scikit-learn", "examples")}


def require(module: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``, or an ImportError that names the extra to install.

    ``purpose`` says what needs it, e.g. ``"decoding images"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        distribution, extra = _EXTRAS[module.partition(".")[0]]
        raise ImportError(
            f"{purpose} needs {distribution}, which is not installed: "
            f'pip install "nnx-trainer[{extra}]"'
        ) from exc
