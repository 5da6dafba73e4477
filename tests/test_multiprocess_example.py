"""The example launched as docs/sharding.md documents it: several ``jax.distributed`` processes.

``JAX_COORDINATOR_ADDRESS=… JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=i python
examples/train_resnet.py --strategy fsdp`` must train (building the Task may not
initialise JAX's backend before the Trainer joins the run), and the same launch without
a multi-process strategy must be refused before the processes collide in one run
directory. Every process here is a real one, on 127.0.0.1, with one CPU device each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from processes import clean_env, free_port, jax_process_env

import nnx_trainer
from nnx_trainer.plugin_manager import AUTOLOAD_ENV, PLUGINS_ENV

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_resnet.py"
# Small: 6 global batches of 32 (16 per process), metrics every 2 steps, one final save.
SMALL = ("--epochs", "1", "--max-steps", "6", "--log-every", "2", "--batch-size", "32")
TIMEOUT = 420  # seconds; a hang (a process waiting on its peer forever) fails, not blocks

# A third-party plugin, installed as a real *.dist-info, that records what every process
# is given to log: the example's own logger writes on process 0 only.
_RECORDER = '''
import json, os
from pathlib import Path

from nnx_trainer import hookimpl
from nnx_trainer.host_values import metric_value


@hookimpl
def log_metrics(trainer, metrics, step):
    row = {"step": step, **{k: metric_value(v) for k, v in metrics.items()}}
    path = Path(os.environ["RECORD_DIR"]) / f"process-{trainer.strategy.process_index}.jsonl"
    with path.open("a") as f:
        f.write(json.dumps(row) + "\\n")
'''


def _recorder_site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    dist = site / "metrics_recorder-1.0.dist-info"
    dist.mkdir(parents=True)
    (site / "metrics_recorder.py").write_text(_RECORDER)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: metrics-recorder\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[nnx_trainer]\nmetrics_recorder = metrics_recorder\n")
    return site


def _launch(tmp_path: Path, *flags: str, count: int = 2,
            extra_env: dict[str, str] | None = None) -> list[tuple[int, str]]:
    """The documented launch of the example in ``count`` processes: (exit code, output) each."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(EXAMPLE), *flags],
            env={**clean_env(), **(extra_env or {}), **jax_process_env(port, count, i)},
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(count)
    ]
    try:
        logs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, log) for p, log in zip(procs, logs, strict=True)]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _model_metrics(rows: list[dict]) -> dict[int, dict[str, float]]:
    """Step -> the training and validation values logged there (not the timings, which
    each process measures on its own clock)."""
    out: dict[int, dict[str, float]] = {}
    for row in rows:
        kept = {k: v for k, v in row.items() if k.startswith(("train/", "val/"))}
        if kept:
            out.setdefault(row["step"], {}).update(kept)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "data_parallel"])
def test_the_readme_launch_trains_in_two_processes_that_agree(tmp_path, strategy):
    run_dir = tmp_path / "run"
    record = tmp_path / "record"
    record.mkdir()
    path = [str(_recorder_site(tmp_path)), os.environ.get("PYTHONPATH", "")]
    env = {"PYTHONPATH": os.pathsep.join(x for x in path if x), "RECORD_DIR": str(record)}
    env[PLUGINS_ENV] = ",".join(x for x in (clean_env().get(PLUGINS_ENV), "metrics_recorder") if x)
    env[AUTOLOAD_ENV] = ""  # the example's default plugins, as a user gets them
    results = _launch(tmp_path, "--strategy", strategy, "--run-dir", str(run_dir), *SMALL,
                      extra_env=env)
    assert [rc for rc, _ in results] == [0, 0], "\n\n".join(log[-3000:] for _, log in results)

    # Every process was given the same values to log, at the same steps...
    seen = [_model_metrics(_rows(record / f"process-{i}.jsonl")) for i in range(2)]
    assert sorted(seen[0]) == sorted(seen[1]) == [2, 4, 6]
    for step, values in seen[0].items():
        assert sorted(values) == sorted(seen[1][step])
        np.testing.assert_allclose([values[k] for k in sorted(values)],
                                   [seen[1][step][k] for k in sorted(values)], rtol=1e-6)
        assert np.isfinite(values["train/loss"])
    assert "val/loss" in seen[0][6]
    # ... and process 0's metrics.jsonl holds exactly them.
    written = _model_metrics(_rows(run_dir / "metrics.jsonl"))
    assert written == seen[0]
    # Both processes report the same held-out accuracy after the final validation.
    finals = [next(ln for ln in log.splitlines() if ln.startswith("held-out top-1 accuracy"))
              for _, log in results]
    assert finals[0].split(" after ")[0] == finals[1].split(" after ")[0]
    assert (run_dir / "checkpoints" / "6").is_dir()  # the collective final save
    assert "initialise the XLA backend" not in "".join(log for _, log in results)


def test_the_launch_without_a_strategy_is_refused_in_every_process(tmp_path):
    # Two processes that would each think they are process 0, in one run directory.
    run_dir = tmp_path / "run"
    results = _launch(tmp_path, "--run-dir", str(run_dir), *SMALL)
    for rc, log in results:
        assert rc == 2, log[-3000:]
        assert "JAX_NUM_PROCESSES=2" in log and "single_device strategy" in log, log
        assert "--strategy data_parallel" in log and "Traceback" not in log, log
    assert not run_dir.exists()  # nothing written


@pytest.mark.parametrize(("environ", "launch"), [
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, "JAX_NUM_PROCESSES=2"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS=10.0.0.1:1234"),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "4",
      "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, "SLURM's srun (SLURM_NTASKS=4)"),
    ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"},
     "Open MPI's mpirun (OMPI_COMM_WORLD_SIZE=2)"),
])
def test_a_multi_process_launch_is_read_from_the_environment(environ, launch):
    from nnx_trainer.strategy import multi_process_launch

    assert multi_process_launch(environ) == launch
    # JAX_NUM_PROCESSES=1 is an explicit single process, even under a cluster launcher.
    assert multi_process_launch({**environ, "JAX_NUM_PROCESSES": "1"}) is None


def test_one_process_environments_are_not_a_multi_process_launch():
    from nnx_trainer.strategy import multi_process_launch

    assert multi_process_launch({}) is None
    assert multi_process_launch({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1",
                                 "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
                                 "SLURM_LOCALID": "0"}) is None  # a one-task job
    assert multi_process_launch({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}) is None  # salloc


def _set_env(monkeypatch, environ: dict[str, str]) -> None:
    for key in [k for k in os.environ if k.startswith(("JAX_", "SLURM_", "OMPI_"))]:
        monkeypatch.delenv(key)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)


def test_the_trainer_refuses_single_device_in_a_multi_process_launch(monkeypatch):
    _set_env(monkeypatch, {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2",
                           "JAX_PROCESS_ID": "0"})
    with pytest.raises(ValueError, match=r"one of several \(JAX_NUM_PROCESSES=2\).*"
                                         r"single_device strategy.*strategy='data_parallel'"):
        nnx_trainer.Trainer(plugin_autoload=False, run_dir="/nonexistent/unused")


def test_nnx_trainer_fit_refuses_single_device_in_a_multi_process_launch(
        monkeypatch, tmp_path, capsys):
    from nnx_trainer.cli import main

    _set_env(monkeypatch, {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
                           "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"})
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    run_dir = tmp_path / "run"
    assert main(["fit", "--task", "tiny_task:TinyTask", "--trainer.max_steps", "2",
                 "--trainer.run_dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "--trainer.strategy data_parallel" in err and "Traceback" not in err
    assert not run_dir.exists()


_BUILD_THEN_JOIN = textwrap.dedent("""
    import sys

    import jax
    from jax._src import xla_bridge

    from resnet_task.task import ResNetConfig, ResNetTask

    ResNetTask(ResNetConfig())  # the defaults: resnet20, conv_impl "auto"
    ResNetTask(ResNetConfig(model="simple", model_kwargs=(("num_blocks", 1),)))
    ResNetTask(ResNetConfig(model="resnet18", stem="imagenet", conv_impl="custom"))
    assert not xla_bridge.backends_are_initialized(), "building a ResNetTask used the backend"
    # What a multi-process run does next: join jax.distributed, then use devices.
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=1, process_id=0)
    print("JOINED", jax.process_count(), jax.device_count())
    jax.distributed.shutdown()
""")


def test_building_the_task_leaves_the_backend_untouched(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", _BUILD_THEN_JOIN, f"127.0.0.1:{free_port()}"], env=clean_env(),
        cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "JOINED 1 1" in proc.stdout


_DEVICES_THEN_JOIN = textwrap.dedent("""
    import jax

    from nnx_trainer_plugins.strategies import initialize_distributed

    jax.devices()  # what a script that builds arrays before its Trainer does
    try:
        initialize_distributed()
    except ValueError as exc:
        print("REFUSED", exc)
""")


def test_joining_after_the_backend_started_names_the_fix(tmp_path):
    env = {**clean_env(), **jax_process_env(free_port(), 1, 0)}
    proc = subprocess.run([sys.executable, "-c", _DEVICES_THEN_JOIN], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REFUSED cannot join the multi-process run" in proc.stdout
    assert "build the Trainer first" in proc.stdout
