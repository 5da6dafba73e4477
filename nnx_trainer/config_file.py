"""The run's config file, written when a fit has really started, never over another.

``nnx-trainer fit`` and ``examples/train_resnet.py`` save the run as a YAML config in
the run directory, so ``nnx-trainer fit --config run_dir/config.yaml --ckpt_path last``
continues it. Writing it before the fit would let a start that then fails (a batch
larger than the data, a checkpoint of another model, a run directory in use) replace
the config of the run it was meant to continue. So the entry points register a
:class:`ConfigFile` plugin, and the file is written from ``on_fit_start`` (called last
among the plugins): after the run directory is locked and the data planned, the model
built and any checkpoint restored. The engine itself knows nothing of configs.

In the run directory (main process only):

- no ``config.yaml`` yet: it is written (via a temporary file, never half-written);
- the same text already there (a resume with the same config): left as it is;
- another text there: that file is moved aside first, numbered as ``metrics.N.jsonl``
  is (``config.1.yaml`` the earliest, then ``.2``...), and this fit's config becomes
  ``config.yaml``, so the plain name always describes the latest fit that started and
  no earlier config is ever lost.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from nnx_trainer.hookspecs import hookimpl

if TYPE_CHECKING:
    from nnx_trainer.run_view import RunView

CONFIG_NAME = "config.yaml"
__all__ = ["CONFIG_NAME", "ConfigFile", "write_config"]


class ConfigFile:
    """Writes the run's config into ``run_dir/filename`` once the fit has started.

    :param render: the config's text for a run directory (the directory is resolved by
        the Trainer, e.g. a default timestamped one, and belongs in the file).
    :param filename: the file name inside ``trainer.run_dir``.
    """

    name = "config_file"

    def __init__(self, render: Callable[[Path], str], filename: str = CONFIG_NAME) -> None:
        if not filename or Path(filename).name != filename:
            raise ValueError(f"filename must be a plain file name, got {filename!r}")
        self.render = render
        self.filename = filename
        self.written: Path | None = None  # where the latest fit's config is

    @hookimpl(trylast=True)
    def on_fit_start(self, trainer: RunView) -> None:
        """Save the config now that the fit has really started (main process only)."""
        if trainer.is_main_process:
            run_dir = Path(trainer.run_dir)
            self.written = write_config(run_dir / self.filename, self.render(run_dir))


def write_config(target: Path, text: str) -> Path:
    """Write ``text`` to ``target`` unless it holds it already; another text there is
    moved to ``<stem>.<n><suffix>`` (the first free ``n``) first. Returns ``target``."""
    try:
        if target.read_text(encoding="utf-8") == text:
            return target
    except FileNotFoundError:
        pass
    else:
        number = 1
        while _numbered(target, number).exists():
            number += 1
        os.replace(target, _numbered(target, number))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)
    return target


def _numbered(path: Path, number: int) -> Path:
    """``config.yaml`` -> ``config.<number>.yaml``."""
    return path.with_name(f"{path.stem}.{number}{path.suffix}")
