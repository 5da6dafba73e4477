"""One run directory, one run (``nnx_trainer.run_lock``), and ``config.yaml`` written only by
a fit that really started, never over another config (``nnx_trainer.config_file``).

The lock is tested with real processes: a fit holding its run directory, second launches
through the command line and the example (the same command, ``--ckpt_path last``), then
``kill -9`` of the holder and a resume that must find no stale lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from processes import clean_env, free_port, jax_process_env

from nnx_trainer.cli import main
from nnx_trainer.run_lock import LOCK_NAME, RunDirInUse, RunDirLock

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
CLI_TINY = ("--task", "tiny_task:TinyTask", "--trainer.batch_size", "16",
            "--trainer.log_every_n_steps", "1", "--plugins.metrics_jsonl", "{}",
            "--plugins.checkpoint.every_n_steps", "2")


def _env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this environment) for a child running the tests' tiny task."""
    return {**(os.environ if base is None else base),
            "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path]), "JAX_PLATFORMS": "cpu",
            "WANDB_MODE": "disabled", "NNX_TRAINER_DISABLE_PLUGIN_AUTOLOAD": "1"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nnx_trainer.cli", "fit", *args],
                          capture_output=True, text=True, env=_env(), timeout=300,
                          stdin=subprocess.DEVNULL)


def _files(run_dir: Path) -> dict[str, bytes]:
    """Every file under ``run_dir`` with its bytes."""
    return {str(p.relative_to(run_dir)): p.read_bytes()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def _steps(run_dir: Path) -> list[int]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "train/loss" in r]


@pytest.fixture
def holder(tmp_path):
    """A live fit holding ``tmp_path/run`` at step 4 (its checkpoint committed)."""
    run_dir, ready = tmp_path / "run", tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, str(TESTS / "scripts" / "held_run.py"), "--run-dir", str(run_dir),
         "--ready", str(ready)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the holding run never got ready:\n{proc.communicate()[0][-3000:]}")
            time.sleep(0.2)
        yield proc, run_dir
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_a_second_launch_is_refused_naming_the_holder_and_kill_9_leaves_no_stale_lock(holder):
    proc, run_dir = holder
    before = _files(run_dir)
    assert {"config.yaml", "metrics.jsonl", LOCK_NAME} <= set(before)
    assert "4" in {p.name for p in (run_dir / "checkpoints").iterdir()}

    for launch in ((), ("--ckpt_path", "last")):  # a fresh start, then a resume
        start = time.monotonic()
        second = _cli(*CLI_TINY, "--trainer.run_dir", str(run_dir), *launch)
        assert second.returncode == 2, second.stderr[-3000:]
        assert time.monotonic() - start < 240  # refused at once (generous for a busy CPU)
        err = second.stderr
        assert "is in use by another run" in err and f"PID {proc.pid}" in err
        assert f"host {socket.gethostname()}" in err and "running since" in err
        assert "--run-dir" in err and "Traceback" not in err
        assert _files(run_dir) == before  # nothing moved, appended or rewritten

    example = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_resnet.py"), "--run-dir", str(run_dir),
         "--dataset", "synthetic", "--model", "simple", "--epochs", "1"],
        capture_output=True, text=True, env=_env(), timeout=300, stdin=subprocess.DEVNULL)
    assert example.returncode == 2, example.stderr[-3000:]
    assert f"PID {proc.pid}" in example.stderr and "Traceback" not in example.stderr
    assert _files(run_dir) == before

    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert (run_dir / LOCK_NAME).exists()  # left behind by the killed run: harmless
    third = _cli(*CLI_TINY, "--trainer.run_dir", str(run_dir), "--ckpt_path", "last",
                 "--trainer.max_steps", "6")
    assert third.returncode == 0, third.stderr[-3000:]
    assert _steps(run_dir) == [1, 2, 3, 4, 5, 6]  # resumed at step 4, not started afresh
    assert not (run_dir / "metrics.1.jsonl").exists()
    assert not (run_dir / LOCK_NAME).exists()  # released at the end of the run


def test_the_lock_is_exclusive_per_open_file_and_removed_on_release(tmp_path):
    run_dir = tmp_path / "new" / "run"
    first, second = RunDirLock(run_dir), RunDirLock(run_dir)
    first.acquire("validate")
    record = json.loads((run_dir / LOCK_NAME).read_text())
    assert record["pid"] == os.getpid() and record["stage"] == "validate"
    with pytest.raises(RunDirInUse, match=f"validate in PID {os.getpid()} on host"):
        second.acquire()
    assert not second.held
    first.release()
    assert not (tmp_path / "new").exists()  # created by the lock, empty: removed again
    second.acquire()
    (run_dir / "kept.txt").write_text("x")
    second.release()
    assert sorted(p.name for p in run_dir.iterdir()) == ["kept.txt"]


def test_a_file_system_without_flock_runs_unlocked_with_a_warning(tmp_path, monkeypatch,
                                                                  caplog):
    def unsupported(fd, operation):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(fcntl, "flock", unsupported)
    lock = RunDirLock(tmp_path / "run")
    lock.acquire()
    assert not lock.held and "does not support flock" in caplog.text
    lock.release()


def test_every_process_of_a_multi_process_launch_is_refused_and_none_hangs(tmp_path):
    # Process 0 finds the lock held (here by this test process) and broadcasts the
    # refusal: both processes exit 2 instead of process 1 waiting in a collective.
    run_dir = tmp_path / "run"
    lock = RunDirLock(run_dir)
    lock.acquire("fit")
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "nnx_trainer.cli", "fit", *CLI_TINY,
         "--trainer.strategy", "data_parallel", "--trainer.run_dir", str(run_dir)],
        env={**_env(clean_env()), **jax_process_env(port, 2, i)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        for i in range(2)]
    try:
        errs = [p.communicate(timeout=240)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        lock.release()
    assert [p.returncode for p in procs] == [2, 2], "\n".join(e[-2000:] for e in errs)
    assert f"PID {os.getpid()}" in errs[0] and "is in use by another run" in errs[1]
    assert not run_dir.exists()  # nothing written: the test's own lock removed it again


# ----------------------------------------------------------------------- config.yaml

@pytest.fixture
def _no_autoload(monkeypatch):
    monkeypatch.setenv("NNX_TRAINER_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")


def _fails(*args: str) -> None:
    """A ``fit`` that must fail (exit 2, or an exception where the CLI lets one through)."""
    try:
        code = main(["fit", *args])
    except Exception:  # noqa: BLE001 - any failure will do; the files are what is checked
        code = 1
    assert code != 0


@pytest.mark.usefixtures("_no_autoload")
def test_a_failed_start_leaves_config_yaml_and_a_changed_config_is_kept_beside_it(tmp_path):
    run_dir = tmp_path / "run"
    base = (*CLI_TINY, "--trainer.run_dir", str(run_dir))
    assert main(["fit", *base, "--trainer.max_steps", "2"]) == 0
    config = run_dir / "config.yaml"
    original = config.read_bytes()

    _fails(*base, "--trainer.batch_size", "1000", "--ckpt_path", "last")  # batch > data
    _fails(*base, "--task.dim", "5", "--ckpt_path", "last")  # another model's checkpoint
    (tmp_path / "empty").mkdir()
    _fails(*base, "--ckpt_path", str(tmp_path / "empty"))  # no checkpoint there
    assert config.read_bytes() == original
    assert sorted(p.name for p in run_dir.glob("config*")) == ["config.yaml"]

    # The continuation docs/cli.md shows: the same config, resumed: the file is left as it is.
    assert main(["fit", "--config", str(config), "--ckpt_path", "last"]) == 0
    assert config.read_bytes() == original
    # A changed config: the earlier one is kept as config.1.yaml, the new one is current.
    assert main(["fit", "--config", str(config), "--ckpt_path", "last",
                 "--trainer.max_steps", "4"]) == 0
    assert (run_dir / "config.1.yaml").read_bytes() == original
    assert yaml.safe_load(config.read_text())["trainer"]["max_steps"] == 4
    assert _steps(run_dir) == [1, 2, 3, 4]
