"""Every benchmark script runs end to end with ``--quick`` and prints its figures.

Only that the scripts work is checked: exit status 0 and a result line. Never a
figure: timings depend on the machine and on whatever else runs on it. The scripts
run two at a time (each is mostly one process compiling on one core).
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# script -> a text its result lines contain; the longest runs first, so that the two
# workers of the fixture below finish together.
SCRIPTS = {
    "vs_pytorch.py": "| model, input, batch | PyTorch images/s",
    "vs_pytorch_paired.py": "| model, input, batch | ours / PyTorch, median",
    "conv_grad.py": "ratio custom/xla",
    "compile_cache.py": "ratio second/first",
    "memory_phases.py": "ratio peak RSS trim/none",
    "memory.py": "ratio peak RSS example/hand",
    "state_checks.py": "ratio first check per kind/one program",
    "data_throughput.py": "ratio digits pipeline/step",
    "strategies_throughput.py": "ratio fsdp/single_device",
    "loop_overhead.py": "ratio small",
    "resnet50_gpu.py": "images/s",
    "folder_startup.py": "seconds to first step",
}
# Arguments beyond --quick: vs_pytorch runs the README's three rows as one table (ResNet-50
# among them); memory_phases and state_checks take ResNet-18, whose compiles cost about
# half the CPU of their ResNet-50 default (benchmarks/README.md, "Smoke test").
EXTRA_ARGS = {"vs_pytorch.py": ("--suite", "--with-bf16"),
              "memory_phases.py": ("--model", "resnet18"),
              "state_checks.py": ("--model", "resnet18")}


def run_script(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True,
        timeout=timeout, env=env, stdin=subprocess.DEVNULL, cwd=BENCHMARKS.parent,
    )


@pytest.fixture(scope="module")
def quick_runs() -> dict[str, subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_script, name, "--quick", *EXTRA_ARGS.get(name, ()))
                   for name in SCRIPTS}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_quick_run_exits_cleanly_and_prints_its_result(quick_runs, name):
    proc = quick_runs[name]
    assert proc.returncode == 0, (proc.stdout[-2000:] + proc.stderr[-4000:])
    assert SCRIPTS[name] in proc.stdout, proc.stdout[-3000:]
    # Every script says what it ran on and with which inputs.
    assert "machine:" in proc.stdout and "inputs:" in proc.stdout


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_describes_the_script(name):
    proc = run_script(name, "--help", timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--quick" in proc.stdout


def test_image_pipeline_benchmark_runs_tiny_and_prints_its_table(tmp_path):
    # Its own run (not in SCRIPTS' shared fixture): tiny sizes, a private image cache.
    proc = run_script("image_pipeline.py", "--images", "16", "--batch", "8", "--quick",
                      "--cache-dir", str(tmp_path))
    assert proc.returncode == 0, (proc.stdout[-2000:] + proc.stderr[-4000:])
    assert "machine:" in proc.stdout and "inputs:" in proc.stdout
    for kind in ("folder", "folder-hostnorm", "arrayrecord"):
        assert f"result: images/s per core {kind}" in proc.stdout, proc.stdout[-3000:]
    assert "result: decoder pillow" in proc.stdout and "1.00x Pillow" in proc.stdout
    # torchvision either ran (and is compared) or says why it was skipped.
    assert ("result: images/s per core torchvision" in proc.stdout
            or "torchvision: skipped" in proc.stdout)
    help_proc = run_script("image_pipeline.py", "--help", timeout=60)
    assert help_proc.returncode == 0 and "--quick" in help_proc.stdout


def test_conv_sweep_times_the_kernel_gradients_product_orders():
    # Not in SCRIPTS: its --quick still sweeps shapes; this is its shortest mode.
    proc = run_script("conv_sweep.py", "--dw-orders", "--quick", "--dtype", "float32",
                      "--batch-size", "4", "--rounds", "1", "--min-time", "0")
    assert proc.returncode == 0, (proc.stdout[-2000:] + proc.stderr[-4000:])
    assert "machine:" in proc.stdout and "inputs:" in proc.stdout
    assert "x^T g" in proc.stdout and "the faster order's time over the chosen one's" in \
        proc.stdout, proc.stdout[-3000:]
