"""What every benchmark script shares and that must work before JAX is imported.

XLA reads ``XLA_FLAGS`` once, when its backend starts, so each script parses its
arguments, calls :func:`prepare_runtime`, and only then imports JAX (through
``workloads``). Nothing here imports JAX.

Also here: the machine description every script prints, child processes whose
peak resident memory is read from the kernel (``wait4``), and the one-line
result protocol between a script and the children it starts.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
# Measure the checkout these scripts live in, whichever copy an editable install points at.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(1, str(REPO_ROOT))
RESULT_PREFIX = "BENCH_RESULT "
# Quick runs only prove a script works end to end: LLVM optimisation off makes
# every compilation several times faster; their figures mean nothing.
QUICK_XLA_FLAGS = ("--xla_backend_optimization_level=0",)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--quick``: tiny sizes and unoptimised compilation, for the smoke test."""
    parser.add_argument(
        "--quick", action="store_true",
        help="tiny sizes and XLA optimisation off: checks the script runs, figures are meaningless",
    )


def prepare_runtime(*, quick: bool = False, xla_flags: Sequence[str] = ()) -> None:
    """Set ``XLA_FLAGS`` (appended to the user's) and quiet loggers; call before importing JAX."""
    if "jax" in sys.modules:
        raise RuntimeError("prepare_runtime must run before JAX is imported")
    flags = list(xla_flags) + (list(QUICK_XLA_FLAGS) if quick else [])
    if flags:
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()
    os.environ.setdefault("WANDB_MODE", "disabled")  # never upload from a benchmark
    # Compile times are part of what benchmarks report: cold unless a script asks.
    os.environ.setdefault("NNX_TRAINER_COMPILATION_CACHE", "off")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def cpu_model() -> str:
    """The processor's marketing name from /proc/cpuinfo (or what the platform module knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def simd_flags() -> str:
    """The vector extensions the kernel reports (XLA and oneDNN pick kernels by them)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                wanted = [f for f in flags if f.startswith(("avx", "amx")) or f == "fma"]
                return " ".join(wanted) or "none of avx/fma/amx"
    except OSError:
        pass
    return "unknown"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_lines(extra_packages: Sequence[str] = ()) -> list[str]:
    """What the figures depend on: processor, cores, load, library versions, flags, date."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    packages = ["jax", "jaxlib", "flax", "optax", "grain", *extra_packages]
    versions = " ".join(f"{p} {_version(p)}" for p in packages)
    return [
        f"machine: {cpu_model()}, {os.cpu_count()} cores ({usable} usable), "
        f"{_memory_gib():.0f} GiB, python {platform.python_version()}; SIMD: {simd_flags()}",
        f"versions: {versions}",
        f"XLA_FLAGS: {os.environ.get('XLA_FLAGS', '') or '(none)'}",
        f"load average (1, 5, 15 min): {load}"
        + ("  [> 1.5: figures are provisional, other work shares the cores]"
           if os.getloadavg()[0] > 1.5 else ""),
        f"date: {datetime.datetime.now().isoformat(timespec='seconds')}",
    ]


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def print_header(title: str, args: argparse.Namespace, extra_packages: Sequence[str] = ()) -> None:
    """Title, the inputs this run used, and the machine it ran on."""
    print(f"== {title} ==")
    inputs = " ".join(f"{k}={v}" for k, v in sorted(vars(args).items()) if not k.startswith("_"))
    print(f"inputs: {inputs}")
    for line in machine_lines(extra_packages):
        print(line)
    sys.stdout.flush()


def peak_rss_mib_self() -> float:
    """This process's peak resident set size so far (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib_self() -> float:
    """This process's current resident set size (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def emit_result(payload: Mapping[str, Any]) -> None:
    """A child's answer to its parent: one JSON line with a fixed prefix."""
    print(RESULT_PREFIX + json.dumps(dict(payload)), flush=True)


class ChildFailed(RuntimeError):
    """A benchmark child process exited non-zero; the message carries its output tail."""


def child_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with this checkout first on ``PYTHONPATH``: children
    (the example too) import this checkout's packages, like their parent."""
    child_env = dict(env if env is not None else os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [child_env.get("PYTHONPATH")])])
    return child_env


def run_child(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    cwd: Path = REPO_ROOT,
) -> dict[str, Any]:
    """Run ``argv`` to completion; return its stdout, exit code and peak RSS (``ru_maxrss``).

    ``os.wait4`` reports the resources of exactly this child, so several children
    started one after another each get their own peak, unlike ``RUSAGE_CHILDREN``.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            list(argv), stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=cwd,
            env=child_environment(env),
        )
        killer = threading.Timer(timeout, proc.kill) if timeout is not None else None
        if killer is not None:
            killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            if killer is not None:
                killer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    result = {
        "returncode": proc.returncode,
        "stdout": stdout,
        "stderr": stderr,
        # Linux reports ru_maxrss in KiB.
        "peak_rss_mib": usage.ru_maxrss / 1024,
    }
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result["result"] = json.loads(line[len(RESULT_PREFIX):])
    return result


def child_result(argv: Sequence[str], **kwargs: Any) -> dict[str, Any]:
    """:func:`run_child`, raising :class:`ChildFailed` unless it exited 0 with a result line."""
    done = run_child(argv, **kwargs)
    if done["returncode"] != 0 or "result" not in done:
        tail = (done["stdout"][-1500:] + "\n" + done["stderr"][-3000:]).strip()
        raise ChildFailed(f"{' '.join(argv)} exited {done['returncode']}:\n{tail}")
    return {**done["result"], "peak_rss_mib": done["peak_rss_mib"]}


def median(values: Sequence[float]) -> float:
    """The median (NaN for no values)."""
    return statistics.median(values) if values else float("nan")


def this_script_argv(script: str | Path, *args: str) -> list[str]:
    """Command line that runs a benchmark script with this interpreter."""
    return [sys.executable, str(script), *args]
