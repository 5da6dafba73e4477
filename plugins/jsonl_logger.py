"""Metrics as JSON Lines: one object per ``log_metrics`` call, plus ``hparams.json``.

Files, under ``trainer.run_dir`` (created on first write):

- ``hparams.json``: the run's configuration from ``log_hyperparams`` (rewritten at
  each fit start, atomically, so a resumed run shows its latest configuration), plus
  ``flops`` from ``log_model_summary`` (the train step's FLOP count, known at the first
  step).
- ``<filename>`` (default ``metrics.jsonl``): one line per call,
  ``{"step": 120, "time": 1700000000.0, "train/loss": 0.41, "epoch": 1.0}``;
  ``time`` is Unix time in seconds, every metric a float.

Non-finite values are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"``
(never the bare ``NaN``/``Infinity`` tokens, which are not JSON); ``float("nan")``
etc. read them back. Metrics that are not scalars are written as nested lists.

Each call opens the file in append mode, writes one complete line and closes it,
so after the call returns the line is in the operating system's hands: a killed
process leaves a valid file up to its last line. A line left half-written by a crash
is cut off before the next write.

Each fit's records are its own (decided at ``log_hyperparams``, which every fit calls
once, after any restore and before its first step):

- a fresh fit (``trainer.global_step == 0``) into a run directory that already holds
  ``metrics.jsonl``/``hparams.json`` moves them aside first, numbered in order:
  ``metrics.1.jsonl`` and ``hparams.1.json`` are the first fit's, ``.2`` the next...;
- a resumed fit (``trainer.resumed_from`` set, restored at step ``k``) keeps the file
  but drops its rows with ``step > k`` (written after the checkpoint by the run that
  was killed; the resumed run logs those steps again), rewriting it atomically, so
  each step appears once.

Standalone ``validate``/``test`` calls append to the current file.

Reading metrics waits for the device, but only at the engine's log cadence
(``log_every_n_steps``) and after evaluations. Only the main process writes.

A write that fails (disk full, read-only) stops the run with one
:class:`~nnx_trainer.write_errors.RunDirWriteError` naming the file, the step and the
operating system's error.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nnx_trainer import hookimpl
from nnx_trainer.host_values import metric_value
from nnx_trainer.write_errors import writing

if TYPE_CHECKING:
    from nnx_trainer import RunView
    from nnx_trainer.flops import StepFlops


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


def _write_json(target: Path, data: Any) -> None:
    """Write ``data`` as JSON via a temporary file, so ``target`` is never half-written."""
    tmp = target.with_name(target.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, allow_nan=False, default=str) + "\n",
                       encoding="utf-8")
        os.replace(tmp, target)
    except OSError:  # disk full or read-only: leave no half-written file behind
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def _numbered(path: Path, number: int) -> Path:
    """``metrics.jsonl`` -> ``metrics.<number>.jsonl``."""
    return path.with_name(f"{path.stem}.{number}{path.suffix}")


def move_aside(paths: list[Path]) -> int | None:
    """Rename the existing ``paths`` to ``<stem>.<n><suffix>``, one free ``n`` for all.

    Returns ``n``, or None when none of them exists (nothing to move).
    """
    existing = [p for p in paths if p.exists()]
    if not existing:
        return None
    number = 1
    while any(_numbered(p, number).exists() for p in paths):
        number += 1
    for path in existing:
        os.replace(path, _numbered(path, number))
    return number


def drop_rows_after(path: Path, step: int) -> None:
    """Rewrite ``path`` (atomically) without the rows whose ``step`` is after ``step``."""
    _cut_partial_line(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except FileNotFoundError:
        return
    kept = []
    for line in lines:
        try:
            row_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue  # not a record of ours: cannot be placed, dropped
        if row_step <= step:
            kept.append(line)
    if len(kept) == len(lines):
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


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

    def path(self, trainer: RunView) -> Path:
        """Where this trainer's metrics go."""
        return Path(trainer.run_dir) / self.filename

    def _start_fit(self, trainer: RunView, hparams_path: Path) -> None:
        """This fit's records are its own: a resumed fit drops the rows it will redo, a
        fresh one moves an earlier fit's files aside (see the module docstring)."""
        path = self.path(trainer)
        step = int(trainer.global_step)
        if getattr(trainer, "resumed_from", None) is not None and step > 0:
            drop_rows_after(path, step)
        else:
            move_aside([path, hparams_path])
        self._checked.add(path)

    @hookimpl
    def log_hyperparams(self, trainer: RunView, params: Mapping[str, Any]) -> None:
        """Write ``run_dir/hparams.json`` (via a temporary file, so it is never half-written)."""
        if not trainer.is_main_process:
            return
        run_dir = Path(trainer.run_dir)
        target = run_dir / "hparams.json"
        with writing("the hyperparameters", target, step=int(trainer.global_step)):
            run_dir.mkdir(parents=True, exist_ok=True)
            self._start_fit(trainer, target)
            _write_json(target, json_safe(dict(params)))

    def update_hparams(self, trainer: RunView, values: Mapping[str, Any]) -> None:
        """Add ``values`` to this fit's ``hparams.json`` (e.g. the FLOP count, known only
        at the first step), rewritten atomically like the first write."""
        target = Path(trainer.run_dir) / "hparams.json"
        if not trainer.is_main_process or not target.exists():
            return
        with writing("the hyperparameters", target):
            _write_json(target, {**json.loads(target.read_text(encoding="utf-8")),
                                 **json_safe(dict(values))})

    @hookimpl
    def log_model_summary(self, trainer: RunView, flops: StepFlops | None) -> None:
        """Add the train step's FLOP count to ``hparams.json`` (the parameters are in it)."""
        if flops is not None:
            self.update_hparams(trainer, {"flops": flops.as_dict()})

    @hookimpl
    def log_metrics(self, trainer: RunView, metrics: Mapping[str, Any], step: int) -> None:
        """Append ``{"step", "time", **metrics}`` as one line; complete on disk on return."""
        if not trainer.is_main_process:
            return
        record: dict[str, Any] = {"step": int(step), "time": time.time()}
        for name, value in metrics.items():
            record[str(name)] = metric_value(value)
        line = _dumps(record) + "\n"
        path = self.path(trainer)
        with writing(f"the metrics of step {int(step)}", path, step=int(step)):
            if path not in self._checked:
                path.parent.mkdir(parents=True, exist_ok=True)
                _cut_partial_line(path)
                self._checked.add(path)
            # Open per call: no handle to close on exit, crash or preemption, and the
            # cost (one open per log cadence) is nothing next to a training step.
            with path.open("a", encoding="utf-8") as f:
                f.write(line)
