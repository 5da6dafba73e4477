"""examples/train_gan.py: two optimizers and a custom update train, log both losses and
resume exactly (the run continued from a checkpoint equals the uninterrupted run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

GAN = Path(__file__).parent.parent / "examples" / "train_gan.py"


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, str(GAN), "--log-every", "1",
                           "--disable-plugin", "wandb", "--disable-plugin", "tensorboard", *args],
                          capture_output=True, text=True, timeout=600, env=env,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["train/d_loss"], r["train/g_loss"]) for r in rows if "train/d_loss" in r}


def test_gan_trains_both_networks_and_resumes_exactly(tmp_path):
    full = tmp_path / "full"
    out = run("--max-steps", "60", "--run-dir", str(full)).stdout
    assert "sees" in out and (full / "samples.png").stat().st_size > 0
    by_step = losses(full)
    assert sorted(by_step) == list(range(1, 61))
    d_first, g_first = by_step[1]
    d_last, g_last = by_step[60]
    assert abs(d_last - d_first) > 0.05 and abs(g_last - g_first) > 0.05  # both move

    part = tmp_path / "part"
    run("--max-steps", "30", "--run-dir", str(part), "--ckpt-every-steps", "15")
    run("--max-steps", "60", "--run-dir", str(part), "--resume", "last")
    assert losses(part) == by_step  # every step, before and after the resume, is equal
