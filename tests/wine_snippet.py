"""Runs a documented Wine Task example (README, Task guide) as written and checks what it prints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_wine_example(code: str, directory: Path) -> subprocess.CompletedProcess:
    """Run ``code`` as ``wine.py`` in ``directory``; assert its three printed results agree.

    The example prints ``validate`` after the fit, ``validate`` of a new Task instance and
    ``test`` of the best checkpoint, each as a dict line.
    """
    (directory / "wine.py").write_text(code)
    proc = subprocess.run(
        [sys.executable, "wine.py"], cwd=directory, capture_output=True, text=True,
        env={**os.environ, "WANDB_MODE": "disabled"}, timeout=600, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    trained, new_instance, best = (eval(x) for x in lines[:3])  # noqa: S307 - our own output
    assert trained == new_instance
    assert trained["val/accuracy"] > 0.8  # 38 held-out wines; chance is 1/3
    assert best["test/accuracy"] >= trained["val/accuracy"] - 1e-6
    return proc
