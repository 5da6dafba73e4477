"""The example script end to end (reduced budget) and its command-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_resnet.py"


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args], capture_output=True, text=True,
        timeout=timeout, env=env, stdin=subprocess.DEVNULL,
    )


def test_example_trains_end_to_end_with_a_reduced_budget(tmp_path):
    proc = run("--epochs", "2", "--limit-train-batches", "6", "--run-dir", str(tmp_path),
               "--log-every", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "digits: 1438 train / 359 held-out examples" in proc.stdout
    assert "held-out top-1 accuracy" in proc.stdout
    assert "after 12 steps" in proc.stdout
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "train/loss" in x] == [3, 6, 9, 12]


def test_help_explains_every_flag():
    proc = run("--help", timeout=120)
    assert proc.returncode == 0
    for flag in ("--dataset", "--data-dir", "--model", "--epochs", "--batch-size", "--lr",
                 "--precision", "--strategy", "--disable-plugin", "--seed"):
        assert flag in proc.stdout


def test_missing_data_dir_fails_before_training_with_the_fix(tmp_path):
    proc = run("--dataset", "cifar10", "--data-dir", str(tmp_path / "nope"), timeout=120)
    assert proc.returncode == 2
    assert "not found" in proc.stderr and "--data-dir" in proc.stderr
    assert "Traceback" not in proc.stderr


def _accuracy(stdout: str) -> float:
    line = next(x for x in stdout.splitlines() if x.startswith("held-out top-1 accuracy"))
    return float(line.split()[3])


def test_bf16_trains_the_example_to_comparable_accuracy(tmp_path):
    common = ("--epochs", "3", "--disable-plugin", "progress", "--no-checkpoint")
    fp32 = run(*common, "--run-dir", str(tmp_path / "fp32"))
    bf16 = run(*common, "--precision", "bf16", "--run-dir", str(tmp_path / "bf16"))
    assert fp32.returncode == 0 and bf16.returncode == 0, bf16.stderr[-2000:]
    assert _accuracy(bf16.stdout) >= _accuracy(fp32.stdout) - 0.05
    assert _accuracy(bf16.stdout) > 0.8
