"""A failing disk ends the run within seconds, with one clear error, and never hangs.

Real processes (tests/scripts/disk_fail_train.py) train while the test breaks the disk
under them for real: a small tmpfs mounted for the test is filled up, or remounted
read-only, while the run waits at a known step with its earlier checkpoints committed.
Each run must exit non-zero within ``EXIT_BOUND`` seconds (a hang fails the test, it
does not stall it) with the one message naming what, where and the OS error, no
traceback, and the earlier checkpoints intact: once the disk is fixed the run resumes
from them. Mounting needs root (as CI has); elsewhere the process fails its own file
calls instead (:class:`Disk`), a fallback also tested here.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nnx_trainer.write_errors import RunDirWriteError, os_error_of, writing

SCRIPT = Path(__file__).parent / "scripts" / "disk_fail_train.py"
EXIT_BOUND = 60.0  # seconds from breaking the disk to the process's exit: generous
START_BOUND = 240.0  # seconds to import JAX and reach the pause on a loaded machine
MAX_STDERR_LINES = 12  # the error, its plugin note, and a few library start-up lines


# ------------------------------------------------------------------ helpers


def _can_mount(probe: Path) -> bool:
    probe.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)],
                          capture_output=True)
    subprocess.run(["umount", str(probe)], capture_output=True)
    return done.returncode == 0


class Disk:
    """A folder the run writes to, which the test breaks while the run is paused.

    ``real``: a small tmpfs of its own, filled up or remounted read-only (needs root, as
    CI has). Otherwise the writing process fails its own file calls under the folder
    (``--inject-under``; the errno goes in the ``go`` file): Python-level writes only,
    TensorStore's are not reached, but Orbax's step ``mkdir`` comes first.
    """

    def __init__(self, path: Path, real: bool) -> None:
        self.path, self.real, self.filler = path, real, path / "filler"
        path.mkdir(parents=True, exist_ok=True)
        if real:
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(path)],
                           check=True)

    def args(self) -> list[str]:
        """What the script needs to break it (nothing for a real one)."""
        return [] if self.real else ["--inject-under", str(self.path)]

    def fill(self) -> str:
        """Make it full; returns what to write into ``go``."""
        if not self.real:
            return str(errno.ENOSPC)
        chunk = b"\0" * (1 << 20)
        with pytest.raises(OSError) as full:
            with open(self.filler, "wb") as f:
                while True:
                    f.write(chunk)
                    f.flush()
        assert full.value.errno == errno.ENOSPC
        return ""

    def make_read_only(self) -> str:
        """Make it read-only; returns what to write into ``go``."""
        if self.real:
            self._remount("ro")
        return "" if self.real else str(errno.EROFS)

    def fix(self) -> None:
        """Free the space and make it writable again."""
        if self.real:
            self._remount("rw")
            self.filler.unlink(missing_ok=True)

    def _remount(self, mode: str) -> None:
        # Retried: remounting read-only waits for files still open for writing to close.
        deadline = time.monotonic() + 20
        while True:
            done = subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)],
                                  capture_output=True, text=True)
            if done.returncode == 0:
                return
            assert time.monotonic() < deadline, done.stderr
            time.sleep(0.05)


@pytest.fixture
def disk(tmp_path):
    """``disk(name)``: a :class:`Disk` at ``tmp_path/name``, real where a tmpfs can be
    mounted, else injected (``disk(name, real=False)``: injected anyway)."""
    disks: list[Disk] = []
    can_mount = _can_mount(tmp_path / ".probe")

    def make(name: str, real: bool = True) -> Disk:
        disks.append(Disk(tmp_path / name, real and can_mount))
        return disks[-1]

    yield make
    for made in disks:
        if made.real:
            subprocess.run(["umount", "-l", str(made.path)], capture_output=True)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.pop("XLA_FLAGS", None)
    return env


def _start(tmp_path: Path, run_dir: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    signals = tmp_path / "signals"
    signals.mkdir(exist_ok=True)
    for name in ("paused", "go"):
        (signals / name).unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--run-dir", str(run_dir), "--signals", str(signals),
         *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + START_BOUND
    while not (signals / "paused").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the run never reached its pause (exit {proc.returncode}):\n{err}")
        time.sleep(0.05)
    return proc, signals


def _go(proc: subprocess.Popen, signals: Path, fault: str) -> tuple[int, str, str, float]:
    """Let the paused run go on (``fault``: an errno to inject, or ""); ``(exit status,
    stdout, stderr, seconds to exit)``."""
    start = time.monotonic()
    (signals / "go").write_text(fault)
    try:
        out, err = proc.communicate(timeout=EXIT_BOUND)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"still running {EXIT_BOUND:.0f} s after the disk broke (a hang):\n{err}")
    seconds = time.monotonic() - start
    print(f"exit {proc.returncode} after {seconds:.1f} s; stderr:\n{err}")
    return proc.returncode, out, err, seconds


def _run(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--run-dir", str(run_dir), *extra],
                          capture_output=True, text=True, env=_env(), timeout=START_BOUND)


def _one_clear_error(err: str, message: str, os_error: str) -> str:
    """The error line: there once, with the OS error; no traceback, no flood."""
    lines = [line for line in err.splitlines() if message in line]
    assert len(lines) == 1, err
    assert os_error in lines[0], lines[0]
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in err, err
    assert len(err.splitlines()) <= MAX_STDERR_LINES, err
    return lines[0]


def _steps(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


# -------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("real", [True, False], ids=["tmpfs", "injected"])
def test_read_only_disk_stops_the_run_at_the_failed_save_and_it_resumes(tmp_path, disk, real):
    """Today: ``OSError: [Errno 30]`` and a process that never exits. (``injected``: the
    fallback where no tmpfs can be mounted, run here too so that it keeps working.)"""
    ckpt = disk("checkpoints", real)  # only the checkpoints: the run dir holds a lock open
    run_dir = tmp_path / "run"
    proc, signals = _start(tmp_path, run_dir, "--ckpt-dir", str(ckpt.path), "--pause-at",
                           "31", *ckpt.args())
    assert _steps(ckpt.path) == [10, 20, 30]
    status, _, err, _ = _go(proc, signals, ckpt.make_read_only())
    assert status == 1
    line = _one_clear_error(err, "could not write the checkpoint of step 40",
                            "[Errno 30] Read-only file system")
    assert f"{ckpt.path}/40" in line and "(steps 10, 20, 30) are intact" in line, line
    assert "--ckpt_path last" in line, line

    ckpt.fix()  # the run goes on from its last checkpoint
    resumed = _run(run_dir, "--ckpt-dir", str(ckpt.path), "--resume", "last")
    assert resumed.returncode == 0, resumed.stderr
    assert "done: steps 30..60" in resumed.stdout
    assert _steps(ckpt.path) == [40, 50, 60]


def test_full_disk_stops_the_run_at_the_failed_save_and_it_resumes(tmp_path, disk):
    """Today: ~600 lines of Orbax tracebacks, and the failure reported a save later.
    (On a real full disk the step directory is made and the arrays' writes fail in
    Orbax's background threads: reported at the next step end.)"""
    full = disk("disk")
    run_dir = full.path / "run"
    proc, signals = _start(tmp_path, run_dir, "--pause-at", "31", *full.args())
    status, _, err, _ = _go(proc, signals, full.fill())
    assert status == 1
    line = _one_clear_error(err, "could not write the checkpoint of step 40",
                            "[Errno 28] No space left on device")
    assert f"{run_dir}/checkpoints/40" in line, line
    assert "(steps 10, 20, 30) are intact" in line, line
    assert _steps(run_dir / "checkpoints") == [10, 20, 30]

    full.fix()
    resumed = _run(run_dir, "--resume", "last")
    assert resumed.returncode == 0, resumed.stderr
    assert "done: steps 30..60" in resumed.stdout
    assert _steps(run_dir / "checkpoints") == [40, 50, 60]


def test_orbax_threads_stuck_on_a_failed_save_cannot_keep_the_process_alive(tmp_path, disk):
    """The last resort: with Orbax's background directory creation (its default, which
    leaves threads waiting forever on a failed ``mkdir``), the process still exits."""
    ckpt = disk("checkpoints")
    proc, signals = _start(tmp_path, tmp_path / "run", "--ckpt-dir", str(ckpt.path),
                           "--pause-at", "31", "--orbax-async-dirs", *ckpt.args())
    status, _, err, _ = _go(proc, signals, ckpt.make_read_only())
    assert status != 0
    assert err.count("could not write the checkpoint of step 40") == 1, err
    assert "[Errno 30] Read-only file system" in err


# ------------------------------------------------------------------ loggers


@pytest.mark.parametrize(("writer", "message", "file"), [
    ("jsonl", "could not write the metrics of step", "metrics.jsonl"),
    ("tensorboard", "could not write the TensorBoard events of step", "tensorboard"),
])
def test_full_disk_stops_a_logger(tmp_path, disk, writer, message, file):
    """A logger that cannot write stops the run: one error (file, step, OS error)."""
    full = disk("disk")
    run_dir = full.path / "run"
    # A tmpfs fails an append only when it needs a new page: soon, within the steps.
    proc, signals = _start(tmp_path, run_dir, "--writers", writer, "--pause-at", "31",
                           "--max-steps", "3000", *full.args())
    status, _, err, _ = _go(proc, signals, full.fill())
    assert status == 1
    line = _one_clear_error(err, message, "[Errno 28] No space left on device")
    assert f"{run_dir}/{file}" in line, line


def test_full_disk_stops_the_curves_writer(tmp_path, disk):
    """The plot is drawn as the fit ends: a run that trained well but cannot write it
    exits 1 naming the file, and leaves no half-written PNG."""
    full = disk("disk")
    run_dir = full.path / "run"
    proc, signals = _start(tmp_path, run_dir, "--writers", "curves", "--pause-at", "31",
                           *full.args())
    status, _, err, _ = _go(proc, signals, full.fill())
    assert status == 1
    line = _one_clear_error(err, "could not write the curves of step 60",
                            "[Errno 28] No space left on device")
    assert f"{run_dir}/curves.png" in line, line
    assert not list(run_dir.glob("curves.png*"))


# ------------------------------------------------------------- in process


def test_the_os_error_is_found_behind_orbax_and_tensorstore_errors():
    """Orbax's threads carry TensorStore's failures as text: the errno is still found."""
    text = ValueError("RESOURCE_EXHAUSTED: Error writing local file \"/r/_sharding\": "
                      "No space left on device [os_error_code='28']")
    assert os_error_of(text) == (errno.ENOSPC, os.strerror(errno.ENOSPC))
    chained = RuntimeError("wrapped")
    chained.__cause__ = OSError(errno.EROFS, "Read-only file system")
    assert os_error_of(chained) == (errno.EROFS, "Read-only file system")
    assert os_error_of(RuntimeError("not a disk error")) is None
    with pytest.raises(RunDirWriteError) as raised:
        with writing("the metrics of step 7", "/r/metrics.jsonl", step=7):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), "/r/metrics.jsonl")
    assert raised.value.errno == errno.EDQUOT and raised.value.step == 7
    assert str(raised.value).startswith(
        "could not write the metrics of step 7 to /r/metrics.jsonl: [Errno 122] ")


class _Manager:
    """What SaveWatch asks of an Orbax CheckpointManager, with a save that failed."""

    def __init__(self, directory: Path, running: bool) -> None:
        self.directory, self.running, self.waited = directory, running, 0

    def is_saving_in_progress(self) -> bool:
        return self.running

    def wait_until_finished(self) -> None:
        self.waited += 1
        raise ValueError("RESOURCE_EXHAUSTED: Failed writing: No space left on device "
                         "[os_error_code='28']")


def test_a_failed_background_save_is_reported_at_the_next_step_end(tmp_path):
    """Not at the next save: each step end asks (without waiting) whether the save in
    flight is over, and only then collects its outcome."""
    from nnx_trainer_plugins.checkpoint_writes import SaveWatch

    (tmp_path / "30").mkdir()
    watch, manager = SaveWatch(), _Manager(tmp_path, running=True)
    watch._pending = 40  # (what SaveWatch.save sets once Orbax took the save)
    watch.poll(manager)
    assert manager.waited == 0  # still running: the loop goes on without waiting
    manager.running = False
    with pytest.raises(RunDirWriteError) as raised:
        watch.poll(manager)
    assert raised.value.step == 40 and raised.value.errno == errno.ENOSPC
    assert f"the checkpoint of step 40 to {tmp_path}/40: [Errno 28]" in str(raised.value)
    assert "(steps 30) are intact" in str(raised.value)
    watch.poll(manager)  # reported once
    assert manager.waited == 1
