"""Compilation cache: the example's compile seconds on a first run and on a second one.

Runs ``examples/train_resnet.py`` twice, one process after the other, with JAX's
persistent compilation cache in a fresh directory (``NNX_TRAINER_COMPILATION_CACHE``):
the first run compiles and writes the cache, the second loads from it. Each run's
train-step compile seconds (``perf/compile_seconds`` in its ``metrics.jsonl``) and the
whole command's wall seconds are printed; then a third run with the cache off, as the
baseline.

    python benchmarks/compile_cache.py                 # the default example: ~1.5 min
    python benchmarks/compile_cache.py -- --model resnet18 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_resnet.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("example_args", nargs="*",
                   help="extra flags for the example (after --), e.g. --model resnet18")
    harness.add_common_arguments(p)
    return p.parse_args(argv)


def run_example(run_dir: Path, cache: str, extra: list[str]) -> tuple[float, float]:
    """(train-step compile seconds, wall seconds of the whole command)."""
    env = {**os.environ, "NNX_TRAINER_COMPILATION_CACHE": cache}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--disable-plugin", "progress", "--no-checkpoint",
         "--run-dir", str(run_dir), *extra], env=env, capture_output=True, text=True,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"the example failed:\n{proc.stderr[-3000:]}")
    compile_s = float("nan")
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        compile_s = json.loads(line).get("perf/compile_seconds", compile_s)
    return compile_s, wall


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.prepare_runtime(quick=args.quick)
    harness.print_header("compilation cache: first vs second run of the example", args)
    extra = list(args.example_args) or (["--epochs", "1", "--limit-train-batches", "2"]
                                        if args.quick else [])
    with tempfile.TemporaryDirectory(prefix="nnx-compile-cache-") as tmp:
        base, cache = Path(tmp), str(Path(tmp) / "cache")
        rows = [("first run (cache empty)", *run_example(base / "r1", cache, extra)),
                ("second run (cache warm)", *run_example(base / "r2", cache, extra)),
                ("cache off", *run_example(base / "r3", "off", extra))]
        entries = len(list(Path(cache).iterdir()))
    print(f"example: {' '.join(extra) or '(defaults)'}; cache entries written: {entries}")
    for label, compile_s, wall in rows:
        print(f"  {label:<26} train step compile {compile_s:7.2f} s   whole command {wall:7.2f} s")
    ratio = rows[1][1] / rows[0][1]
    print(f"result: ratio second/first compile seconds {ratio:.3f} "
          f"(whole command {rows[1][2] / rows[0][2]:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
