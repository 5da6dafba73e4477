"""Metrics as JSON Lines: one object per ``log_metrics`` call, plus ``hparams.json``.

Files, under ``trainer.run_dir`` (created on first write):

- ``hparams.json``: the run's configuration from ``log_hyperparams`` (rewritten at
  each fit start, atomically, so a resumed run shows its latest configuration).
- ``<filename>`` (default ``metrics.jsonl``): one line per call,
  ``{"step": 120, "time": 1700000000.0, "train/loss": 0.41, "epoch": 1.0}``;
  ``time`` is Unix time in seconds, every metric a float.

Non-finite values are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"``
(never the bare ``NaN``/``Infinity`` tokens, which are not JSON); ``float("nan")``
etc. read them back. Metrics that are not scalars are written as nested lists.

Each call opens the file in append mode, writes one complete line and closes it,
so after the call returns the line is in the operating system's hands: a killed
process leaves a valid file up to its last line, and a resumed run appends to the
same file. Steps between the resumed checkpoint and the crash then appear twice;
the later line is the one from the run that continued. A line left half-written
by a crash is cut off before the first append of the next run.

Reading metrics waits for the device, but only at the engine's log cadence
(``log_every_n_steps``) and after evaluations. Only the main process writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nnx_trainer import hookimpl
from nnx_trainer.host_values import metric_value

if TYPE_CHECKING:
    from nnx_trainer import Trainer


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by ``"nan"``/``"inf"``/``"-inf"``, recursively."""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _dumps(obj: Any) -> str:
    # allow_nan=False: json_safe must already have replaced every non-finite float;
    # failing loudly beats writing a file no strict parser can read.
    return json.dumps(json_safe(obj), allow_nan=False, default=str)


def _cut_partial_line(path: Path) -> None:
    """Drop a trailing line without its newline (a write cut short by a killed process)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        # Scan back in blocks for the last newline; keep everything up to it.
        end = size
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            block = f.read(end - start)
            cut = block.rfind(b"\n")
            if cut != -1:
                f.truncate(start + cut + 1)
                return
            end = start
        f.truncate(0)


class JsonlLogger:
    """Appends every logged metric dict as one JSON line to ``run_dir/filename``.

    :param filename: name of the metrics file inside ``trainer.run_dir``.
    """

    name = "metrics_jsonl"

    def __init__(self, filename: str = "metrics.jsonl") -> None:
        if not filename or Path(filename).name != filename:
            raise ValueError(f"filename must be a plain file name, got {filename!r}")
        self.filename = filename
        self._checked: set[Path] = set()  # files whose tail was checked in this process

    def path(self, trainer: Trainer) -> Path:
        """Where this trainer's metrics go."""
        return Path(trainer.run_dir) / self.filename

    @hookimpl
    def log_hyperparams(self, trainer: Trainer, params: Mapping[str, Any]) -> None:
        """Write ``run_dir/hparams.json`` (via a temporary file, so it is never half-written)."""
        if not trainer.is_main_process:
            return
        run_dir = Path(trainer.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        target = run_dir / "hparams.json"
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(
            json.dumps(json_safe(dict(params)), indent=2, allow_nan=False, default=str) + "\n",
            encoding="utf-8",
        )
        os.replace(tmp, target)

    @hookimpl
    def log_metrics(self, trainer: Trainer, metrics: Mapping[str, Any], step: int) -> None:
        """Append ``{"step", "time", **metrics}`` as one line; complete on disk on return."""
        if not trainer.is_main_process:
            return
        record: dict[str, Any] = {"step": int(step), "time": time.time()}
        for name, value in metrics.items():
            record[str(name)] = metric_value(value)
        line = _dumps(record) + "\n"
        path = self.path(trainer)
        if path not in self._checked:
            path.parent.mkdir(parents=True, exist_ok=True)
            _cut_partial_line(path)
            self._checked.add(path)
        # Open per call: no handle to close on exit, crash or preemption, and the
        # cost (one open per log cadence) is nothing next to a training step.
        with path.open("a", encoding="utf-8") as f:
            f.write(line)
