"""The example script end to end (reduced budget) and its command-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

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


def _folder_with_one_truncated_jpeg(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, colour in enumerate(((200, 30, 30), (30, 200, 30))):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(24):
            pixels = np.clip(rng.normal(colour, 20, (20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i:02d}.jpg", quality=90)
    bad = root / "class1" / "05.jpg"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])  # a truncated JPEG
    return bad


FOLDER_RUN = ("--dataset", "folder", "--image-size", "16", "--batch-size", "8", "--epochs", "2",
              "--workers", "2", "--no-checkpoint", "--disable-plugin", "progress")


def test_a_bad_image_stops_the_run_naming_it_and_skip_trains_around_it(tmp_path):
    import psutil

    bad = _folder_with_one_truncated_jpeg(tmp_path / "data")
    shm = Path("/dev/shm")
    shm_before = set(shm.iterdir()) if shm.is_dir() else set()
    # Building does not open files, so the truncated JPEG is met mid-run, in a Grain
    # worker process: the run stops with the file's name, and no worker is left behind.
    stopped = run(*FOLDER_RUN, "--data-dir", str(tmp_path / "data"),
                  "--run-dir", str(tmp_path / "stop"), timeout=300)
    assert stopped.returncode != 0
    assert str(bad) in stopped.stderr and "--bad-images skip" in stopped.stderr
    leftovers = [p for p in psutil.process_iter(["cmdline"])
                 if str(tmp_path / "stop") in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []
    # Grain's shared-memory batches are all unlinked by the time the run has exited
    # (Python's resource tracker may warn while it does so: google/grain#398).
    assert (set(shm.iterdir()) if shm.is_dir() else set()) <= shm_before
    skipped = run(*FOLDER_RUN, "--data-dir", str(tmp_path / "data"), "--bad-images", "skip",
                  "--max-bad-images-fraction", "0.05", "--run-dir", str(tmp_path / "skip"),
                  timeout=300)
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert f"skipped undecodable image '{bad}'" in skipped.stderr
    # The stopped run met the file in epoch 1, the same draws: counted at least that once.
    assert re.search(r"warning: [12] undecodable training images were replaced",
                     skipped.stderr)
    assert "held-out top-1 accuracy" in skipped.stdout
    # Not on a dataset without files.
    wrong = run("--bad-images", "skip", "--epochs", "1")
    assert wrong.returncode == 2 and "--dataset folder or arrayrecord only" in wrong.stderr
    wrong = run("--max-bad-images-fraction", "0.5", "--epochs", "1")  # not silently ignored
    assert wrong.returncode == 2 and "--max-bad-images-fraction apply to" in wrong.stderr


def _train_losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def test_the_example_and_the_nnx_trainer_command_describe_the_same_run(tmp_path):
    """The example's flags become Trainer/ResNetConfig/plugin keys; if one drifted (a
    renamed parameter), the command would reject the saved config."""
    flags = ("--epochs", "1", "--max-steps", "5", "--log-every", "1", "--no-checkpoint",
             "--disable-plugin", "progress", "--label-smoothing", "0.2")
    printed = run(*flags, "--print-config")
    assert printed.returncode == 0, printed.stderr[-3000:]
    example = run(*flags, "--run-dir", str(tmp_path / "example"))
    assert example.returncode == 0, example.stderr[-3000:]
    saved = tmp_path / "example" / "config.yaml"
    assert saved.read_text().replace(f"run_dir: {tmp_path / 'example'}", "run_dir: null") == (
        printed.stdout)
    env = {**os.environ, "WANDB_MODE": "disabled"}
    command = subprocess.run(
        [str(Path(sys.executable).with_name("nnx-trainer")), "fit", "--config", str(saved),
         "--trainer.run_dir", str(tmp_path / "command")],
        capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)
    assert command.returncode == 0, command.stderr[-3000:]
    losses = _train_losses(tmp_path / "example")
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5]
    assert _train_losses(tmp_path / "command") == losses
