"""Exact resume through real processes: SIGKILL between saves, SIGKILL during an
asynchronous save, SIGTERM from the parent, and Grain worker processes; and the save
decision of two real processes whose clocks disagree.

Every run is ``tests/scripts/ckpt_train.py`` (TinyTask, 64 examples, batch 16: four
steps per epoch, 20 steps, validation after each epoch). A run that was stopped and
resumed must reproduce the uninterrupted run's per-step losses after the restored
step and its final arrays bit for bit (CPU, same settings).
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from processes import script_env

SCRIPT = Path(__file__).resolve().parent / "scripts" / "ckpt_train.py"
MAX_STEPS = 20
BEST_K = ("--every-n-steps", "3", "--monitor", "val/loss", "--keep-best", "2", "--keep-last", "1")

pytestmark = pytest.mark.slow


def _read_step_values(path) -> dict[int, float]:
    """``{step: value}`` from the script's ``<step> <value>`` lines."""
    out = {}
    for line in path.read_text().splitlines():
        step, value = line.split()
        out[int(step)] = float(value)
    return out


class Run:
    """One invocation of the script and the files it leaves."""

    def __init__(self, base: Path, name: str, run_dir: Path) -> None:
        self.name, self.run_dir = name, run_dir
        self.losses_file = base / f"{name}.losses"
        self.vals_file = base / f"{name}.vals"
        self.out_file = base / f"{name}.json"
        self.params_file = base / f"{name}.npz"
        self.proc: subprocess.CompletedProcess | None = None

    def args(self, *extra: str) -> list[str]:
        return [
            sys.executable, str(SCRIPT), "--run-dir", str(self.run_dir),
            "--max-steps", str(MAX_STEPS), "--losses", str(self.losses_file),
            "--vals", str(self.vals_file), "--out", str(self.out_file),
            "--params", str(self.params_file), *extra,
        ]

    def run(self, *extra: str, rc: int = 0) -> Run:
        self.proc = subprocess.run(
            self.args(*extra), env=script_env(), capture_output=True, text=True, timeout=240
        )
        assert self.proc.returncode == rc, (
            f"{self.name}: exit {self.proc.returncode}, expected {rc}\n"
            f"{self.proc.stdout[-3000:]}\n{self.proc.stderr[-5000:]}"
        )
        return self

    @property
    def stderr(self) -> str:
        return self.proc.stderr if self.proc is not None else ""

    @property
    def losses(self) -> dict[int, float]:
        return _read_step_values(self.losses_file)

    @property
    def vals(self) -> dict[int, float]:
        return _read_step_values(self.vals_file)

    @property
    def out(self) -> dict:
        return json.loads(self.out_file.read_text())

    @property
    def params(self) -> list[np.ndarray]:
        with np.load(self.params_file) as z:
            return [z[f"arr_{i}"] for i in range(len(z.files))]

    def committed_steps(self) -> list[int]:
        ckpt = self.run_dir / "checkpoints"
        return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in (self.run_dir / "checkpoints").iterdir()
                      if "orbax-checkpoint-tmp" in p.name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Run:
    """The uninterrupted run every resumed run is compared with (same checkpoint options)."""
    base = tmp_path_factory.mktemp("reference")
    return Run(base, "reference", base / "run").run(*BEST_K)


def assert_same_continuation(resumed: Run, reference: Run, start: int) -> None:
    ref, got = reference.losses, resumed.losses
    assert sorted(got) == list(range(start, MAX_STEPS))
    assert [got[s] for s in sorted(got)] == [ref[s] for s in sorted(got)]  # bit-identical
    ref_params, got_params = reference.params, resumed.params
    assert len(got_params) == len(ref_params) > 0
    for a, b in zip(got_params, ref_params, strict=True):
        np.testing.assert_array_equal(a, b)


def test_sigkill_between_saves_resumes_exactly_with_best_k_and_plugin_state(tmp_path, reference):
    run_dir = tmp_path / "run"
    killed = Run(tmp_path, "killed", run_dir).run(*BEST_K, "--kill-at-step", "10", rc=-9)
    ref = reference.losses
    assert killed.losses == {s: ref[s] for s in range(10)}
    # Saves at 3, 4 (epoch end), 6, 8 (epoch end), 9; the kill came after 9 committed.
    assert killed.committed_steps()[-1] == 9

    resumed = Run(tmp_path, "resumed", run_dir).run(*BEST_K, "--resume", "last")
    assert resumed.out["start_step"] == 9 and resumed.out["end_step"] == MAX_STEPS
    assert_same_continuation(resumed, reference, start=9)
    # The counter plugin's state came back from the checkpoint: 9 + 11 batches.
    assert resumed.out["counter"] == reference.out["counter"] == MAX_STEPS

    # Best-2 by val/loss among the epoch-end checkpoints, plus the latest: the same
    # steps as the uninterrupted run kept, and the ones the rule names.
    vals = reference.vals
    assert sorted(vals) == [4, 8, 12, 16, 20]
    best2 = sorted(sorted(vals, key=lambda s: (vals[s], s))[:2])
    expected = sorted({*best2, MAX_STEPS})
    assert reference.committed_steps() == expected
    assert resumed.committed_steps() == expected
    assert not resumed.leftovers()


def test_sigkill_during_async_save_skips_the_partial_checkpoint(tmp_path, reference):
    run_dir = tmp_path / "run"
    opts = ("--every-n-steps", "3", "--keep-last", "1")
    # The commit (final rename) of checkpoint 6 never happens; the process is killed
    # while that asynchronous save is in flight.
    Run(tmp_path, "killed", run_dir).run(*opts, "--hang-save-at", "6", rc=-9)
    partial = Path((run_dir / "commit_hanging").read_text())
    assert partial.exists() and partial.name.startswith("6.orbax-checkpoint-tmp")
    assert (partial / "state").exists()  # its data was written; only the commit is missing
    killed = Run(tmp_path, "killed", run_dir)
    # keep_last=1: 3 went once 4 committed, but 4 stays until its successor commits.
    assert killed.committed_steps() == [4]

    resumed = Run(tmp_path, "resumed", run_dir).run(*opts, "--resume", "last")
    assert "uncommitted checkpoint" in resumed.stderr and str(partial) in resumed.stderr
    assert resumed.out["start_step"] == 4
    assert_same_continuation(resumed, reference, start=4)
    # Step 6 was saved again (committed: the next save waits for it and would fail
    # otherwise), later ones replaced it, and nothing partial or deleted is left.
    assert resumed.out["saved_steps"][:2] == [6, 8]
    assert resumed.committed_steps() == [MAX_STEPS]
    assert not resumed.leftovers()
    assert not (run_dir / "checkpoints" / "_deleted").exists()


def test_sigterm_from_the_parent_saves_exits_zero_and_resumes_exactly(tmp_path, reference):
    run_dir = tmp_path / "run"
    first = Run(tmp_path, "terminated", run_dir)
    proc = subprocess.Popen(
        first.args("--step-sleep", "0.15"), env=script_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if first.losses_file.exists() and len(first.losses_file.read_text().split()) >= 12:
                break  # six steps done
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-4000:]
    stopped = first.out
    assert stopped["preempted"] is True and "SIGTERM" in stderr
    step = stopped["end_step"]
    assert 6 <= step < MAX_STEPS
    assert first.committed_steps()[-1] == step  # the preemption save is committed

    resumed = Run(tmp_path, "resumed", run_dir).run("--resume", "last")
    assert resumed.out["start_step"] == step
    assert_same_continuation(resumed, reference, start=step)


def read_checkpoint(step_dir: Path) -> tuple[dict, dict | None]:
    """(meta, metrics) of a committed checkpoint, read with orbax."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    with ocp.CheckpointManager(step_dir.parent, options=options) as manager:
        step = int(step_dir.name)
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(meta["meta"]), manager.metrics(step)


def test_sigterm_on_an_epochs_last_batch_validates_that_epoch_on_resume(tmp_path, reference):
    # SIGTERM arrives during step 8, the last batch of epoch 1: the epoch is closed and
    # saved at once, without its validation; the resumed fit runs that validation first,
    # at step 8, and makes the epoch save of step 8 it was owed (best-K gets the value).
    run_dir = tmp_path / "run"
    first = Run(tmp_path, "terminated", run_dir).run(*BEST_K, "--sigterm-at-step", "8")
    assert first.out["preempted"] is True and first.out["end_step"] == 8
    assert "SIGTERM" in first.stderr
    ref_vals = reference.vals
    assert first.vals == {4: ref_vals[4]}  # step 8's validation did not run
    meta, metrics = read_checkpoint(run_dir / "checkpoints" / "8")
    assert (meta["epoch"], meta["batch_in_epoch"], meta["validation_pending"]) == (2, 0, True)
    assert metrics == {}  # no val/loss at step 8 yet

    # Resume up to step 9 (a step save): the uninterrupted run's checkpoints at that
    # point were 4 and 8 (best two by val/loss) plus 9 (latest).
    resumed = Run(tmp_path, "resumed", run_dir).run(*BEST_K, "--resume", "last", "--max-steps", "9")
    assert resumed.out["start_step"] == 8
    assert resumed.vals == {8: ref_vals[8]}  # bit-identical, logged at step 8
    assert resumed.losses == {8: reference.losses[8]}
    assert resumed.committed_steps() == [4, 8, 9]  # 8 ranks among the best: it has its value
    assert read_checkpoint(run_dir / "checkpoints" / "8")[1] == {"val/loss": ref_vals[8]}
    assert read_checkpoint(run_dir / "checkpoints" / "9")[0]["validation_pending"] is False

    # And on to the end: the same losses, validations, final arrays and kept checkpoints.
    rest = Run(tmp_path, "rest", run_dir).run(*BEST_K, "--resume", "last")
    assert rest.out["start_step"] == 9 and rest.out["counter"] == MAX_STEPS
    assert_same_continuation(rest, reference, start=9)
    assert rest.vals == {s: ref_vals[s] for s in (12, 16, 20)}
    assert rest.committed_steps() == reference.committed_steps()


def test_resume_with_grain_worker_processes_continues_the_epoch(tmp_path, reference):
    # The data position is the step counters, not Grain's iterator state: a run saved
    # mid-epoch with 2 worker processes resumes with 0 (and back), across an epoch end.
    run_dir = tmp_path / "run"
    first = Run(tmp_path, "first", run_dir).run("--workers", "2", "--max-steps", "2")
    assert first.out["end_step"] == 2
    resumed = Run(tmp_path, "resumed", run_dir).run(
        "--workers", "0", "--max-steps", "6", "--resume", "last"
    )
    assert resumed.out["start_step"] == 2 and resumed.out["end_step"] == 6
    again = Run(tmp_path, "again", run_dir).run(
        "--workers", "2", "--max-steps", "7", "--resume", "last"
    )
    ref = reference.losses
    assert first.losses == {0: ref[0], 1: ref[1]}
    assert resumed.losses == {s: ref[s] for s in range(2, 6)}  # bit-identical, epoch 0 -> 1
    assert again.losses == {6: ref[6]}


def test_sigkill_mid_stream_resumes_from_grains_iterator_state(tmp_path):
    """A grain.IterDataset (no length): the checkpoint keeps the iterator's state."""
    opts = ("--stream", "--every-n-steps", "4")
    reference = Run(tmp_path, "stream_reference", tmp_path / "reference").run(*opts)
    run_dir = tmp_path / "run"
    killed = Run(tmp_path, "stream_killed", run_dir).run(*opts, "--kill-at-step", "10", rc=-9)
    assert killed.losses == {s: reference.losses[s] for s in range(10)}
    assert killed.committed_steps()[-1] == 8
    resumed = Run(tmp_path, "stream_resumed", run_dir).run(*opts, "--resume", "last")
    assert resumed.out["start_step"] == 8
    assert_same_continuation(resumed, reference, start=8)


def test_checkpoint_restores_onto_another_device_count_and_strategy(tmp_path):
    # One device -> FSDP over 4 (sharded leaves) and back: the arrays restore onto the
    # trainer's target shardings, values unchanged.
    env = {**script_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT.with_name("ckpt_reshard.py")), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["devices"] == 4
    assert report["single_to_fsdp_equal"] and report["single_to_fsdp_shardings"] == [
        "NamedSharding"
    ]
    assert report["single_to_fsdp_step"] == 5
    assert report["fsdp_to_single_equal"] and report["fsdp_to_single_shardings"] == [
        "SingleDeviceSharding"
    ]
    assert report["fsdp_to_single_finite"]


def _start_processes(script: Path, port: int, outs: list[Path], *extra: str) -> list:
    env = {k: v for k, v in script_env().items() if k != "JAX_PLATFORMS"}
    return [
        subprocess.Popen(
            [sys.executable, str(script), "--port", str(port), "--count", str(len(outs)),
             "--index", str(i), "--out", str(out), *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i, out in enumerate(outs)
    ]


def _finish(procs: list, hang: str, timeout: float = 240) -> list[str]:
    """Each process's output; kill them all and fail with ``hang`` if one does not end."""
    try:
        return [proc.communicate(timeout=timeout)[0] for proc in procs]
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"a process hung: {hang}\n"
                    + "\n".join((p.communicate()[0] or "")[-2000:] for p in procs))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_clocks_across_the_throttle_boundary_save_the_same_steps(tmp_path):
    # Default cadence (every epoch = 4 steps), at most one save per 60 s. Process 0's clock
    # (as Orbax's checkpoint manager reads it) gives 10 s per step, process 1's 16 s: on
    # its own, process 0 would save epochs at steps 4, 12, 20 and process 1 at every one
    # (64 s apart), so per-process decisions would send process 1 into a collective save
    # alone (a hang). Orbax's ContinuousCheckpointingPolicy decides on process 0 and
    # broadcasts: both save 4, 12, 20 and the end, 24.
    port = _port()
    script = SCRIPT.with_name("multiprocess_run.py")
    env = {k: v for k, v in script_env().items() if k != "JAX_PLATFORMS"}
    procs, outs = [], [tmp_path / f"p{i}.json" for i in range(2)]
    for i, seconds in enumerate((10, 16)):
        procs.append(subprocess.Popen(
            [sys.executable, str(script), "--port", str(port), "--count", "2", "--index", str(i),
             "--out", str(outs[i]), "--run-dir", str(tmp_path / "run"), "--max-steps", "24",
             "--clock-seconds-per-step", str(seconds), "--ckpt-min-seconds", "60"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    logs = _finish(procs, "the processes disagreed about a save")
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-3000:] for x in logs)
    reports = [json.loads(o.read_text()) for o in outs]
    assert [r["process_count"] for r in reports] == [2, 2]
    assert reports[0]["saved_steps"] == reports[1]["saved_steps"] == [4, 12, 20, 24]
    ckpt = tmp_path / "run" / "checkpoints"
    assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [4, 12, 20, 24]


def test_sigterm_to_one_of_two_processes_stops_both_after_the_same_step_and_resumes(tmp_path):
    # Only process 1 gets SIGTERM. Without agreement it would stop and save alone while
    # process 0 waited in the next step's gradient all-reduce forever.
    script = SCRIPT.with_name("multiprocess_run.py")
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    outs = [tmp_path / f"p{i}.json" for i in range(2)]
    procs = _start_processes(script, _port(), outs, "--run-dir", str(run_dir),
                             "--max-steps", "40", "--marker", str(marker), "--marker-step", "6")
    deadline = time.monotonic() + 180
    while not marker.exists():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            pytest.fail("process 1 never reached step 6:\n"
                        + "\n".join((p.communicate()[0] or "")[-2000:] for p in procs))
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    logs = _finish(procs, "the processes did not stop together")
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-3000:] for x in logs)
    first = [json.loads(o.read_text()) for o in outs]
    stop = first[0]["global_step"]
    assert first[1]["global_step"] == stop and 6 <= stop < 40
    assert [r["preempted"] for r in first] == [True, True]
    assert [r["stop_reason"] for r in first] == ["SIGTERM", "SIGTERM"]
    assert sorted(int(k) for k in first[0]["losses"]) == list(range(stop))
    assert "stops after step" in logs[0]  # process 0, never signalled, was told
    committed = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir()
                       if p.name.isdigit())
    assert committed[-1] == stop  # the preemption checkpoint, saved by both together

    # Both resume from it and finish; their losses are the uninterrupted run's.
    resumed_outs = [tmp_path / f"r{i}.json" for i in range(2)]
    logs = _finish(_start_processes(script, _port(), resumed_outs, "--run-dir", str(run_dir),
                                    "--max-steps", "40", "--resume", "last"),
                   "the resumed processes did not finish")
    resumed = [json.loads(o.read_text()) for o in resumed_outs]
    whole = tmp_path / "whole.json"
    single = subprocess.run(
        [sys.executable, str(script), "--out", str(whole), "--max-steps", "40"],
        env=script_env(), capture_output=True, text=True, timeout=240,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    reference = json.loads(whole.read_text())["losses"]
    for r in resumed:
        assert sorted(int(k) for k in r["losses"]) == list(range(stop, 40))
        np.testing.assert_allclose(
            [r["losses"][str(k)] for k in range(stop, 40)],
            [reference[str(k)] for k in range(stop, 40)], rtol=1e-5, atol=1e-6,
        )
    # And before the preemption too: the interrupted run was the same run.
    np.testing.assert_allclose([first[0]["losses"][str(k)] for k in range(stop)],
                               [reference[str(k)] for k in range(stop)], rtol=1e-5, atol=1e-6)
