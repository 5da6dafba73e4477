"""Sharding strategies on 8 simulated CPU devices and across 2 real processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from processes import clean_env, free_port

import nnx_trainer
from nnx_trainer_plugins.strategies import DataParallel

SCRIPTS = Path(__file__).parent / "scripts"


_env = clean_env


@pytest.fixture(scope="module")
def report() -> dict:
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "sharding_run.py")], env=_env(8),
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT "))
    return json.loads(line[len("REPORT "):])


def _flat(params) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(p, dtype=np.float64)) for p in params])


@pytest.mark.parametrize("name", ["data_parallel", "fsdp"])
def test_sharded_training_equals_one_device(report, name):
    assert report["devices"] == 8
    single, sharded = report["single_device"], report[name]
    assert len(sharded["losses"]) == 12
    np.testing.assert_allclose(sharded["losses"], single["losses"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_flat(sharded["params"]), _flat(single["params"]), atol=1e-5)
    assert sharded["batch_spec"] == "P('data',)"


def test_data_parallel_replicates_and_fsdp_shards_the_parameters(report):
    assert report["data_parallel"]["kernel_shard_shapes"] == [[64, 16]] * 8
    # fc1's 64x16 kernel split along its largest axis: each device holds 1/8.
    assert report["fsdp"]["kernel_shard_shapes"] == [[8, 16]] * 8


def test_fsdp_picks_the_largest_divisible_axis_and_replicates_small_leaves(report):
    assert report["fsdp_specs"] == {
        "(3, 3, 64, 128)": "P(None, None, None, 'data')",
        "(100,)": "P()",  # below the size threshold
        "(4096,)": "P('data',)",
        "(1000, 24)": "P('data', None)",
        "(7, 9, 33)": "P()",  # no axis divisible by 8
    }


def test_bf16_trains_comparably_with_float32_parameters(report):
    bf16, fp32 = report["data_parallel_bf16"], report["single_device"]
    assert bf16["param_dtypes"] == ["float32"]
    np.testing.assert_allclose(bf16["losses"], fp32["losses"], rtol=0.02, atol=0.02)
    assert bf16["val_accuracy"] >= fp32["val_accuracy"] - 0.1


def test_bad_configurations_fail_before_compiling_with_the_fix(report):
    errors = report["errors"]
    assert "batch size 12 is not divisible by the 8 devices" in errors["indivisible_batch"]
    assert "use a multiple of 8" in errors["indivisible_batch"]
    assert "asked for 16 devices but 8 are available" in errors["too_many_devices"]
    assert "unknown strategy 'ddp'; choose one of: data_parallel, fsdp" in errors["unknown"]


def test_too_many_devices_in_this_process():
    with pytest.raises(ValueError, match="asked for 64 devices"):
        DataParallel(num_devices=64)


def test_strategy_names_are_offered_through_the_plugin(tmp_path):
    trainer = nnx_trainer.Trainer(
        strategy="data_parallel", plugin_autoload=False, run_dir=tmp_path
    )  # "strategies" is essential: loaded even with autoload off
    assert trainer.strategy.name == "data_parallel"


def _run_processes(tmp_path: Path, count: int, tag: str, *extra: str) -> list[dict]:
    """Start ``count`` cooperating processes; return each one's JSON report."""
    port = free_port()
    outs = [tmp_path / f"{tag}-{i}.json" for i in range(count)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPTS / "multiprocess_run.py"), "--port", str(port),
             "--count", str(count), "--index", str(i), "--out", str(outs[i]), *extra],
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(count)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * count, "\n".join(x[-2000:] for x in logs)
    return [json.loads(o.read_text()) for o in outs]


def _losses(report: dict) -> list[float]:
    return [report["losses"][k] for k in sorted(report["losses"], key=int)]


def test_two_processes_train_like_one(report, tmp_path):
    results = _run_processes(tmp_path, 2, "fresh")
    for r in results:
        assert r["process_count"] == 2 and r["devices"] == 2
        # The same global batches as one process: the first 8 single-device steps.
        np.testing.assert_allclose(
            _losses(r), report["single_device"]["losses"][:8], rtol=1e-5, atol=1e-6
        )
    assert results[0]["val_accuracy"] == results[1]["val_accuracy"]


def test_a_stream_over_two_processes_trains_like_one_and_resumes_on_one(tmp_path):
    """Each process keeps its rows of every global batch of the same stream, and the
    stream's position (Grain's iterator state) moves to a one-process resume."""
    one = _run_processes(tmp_path, 1, "stream1", "--stream", "--max-steps", "10")[0]
    run_dir = str(tmp_path / "run")
    two = _run_processes(tmp_path, 2, "stream2", "--stream", "--max-steps", "6",
                         "--run-dir", run_dir)
    for r in two:
        assert r["process_count"] == 2
        np.testing.assert_allclose(_losses(r), _losses(one)[:6], rtol=1e-5, atol=1e-6)
    resumed = _run_processes(tmp_path, 1, "stream3", "--stream", "--max-steps", "10",
                             "--run-dir", run_dir, "--resume", "last")[0]
    assert sorted(resumed["losses"], key=int) == [str(s) for s in range(6, 10)]
    np.testing.assert_allclose(_losses(resumed), _losses(one)[6:], rtol=1e-5, atol=1e-6)


def test_two_processes_draw_the_dropout_masks_of_one_predict_its_rows_and_resume_on_one(
        tmp_path):
    """A model holding an RNG stream (``nnx.Dropout(rngs=...)``): its typed PRNG key is
    placed on both processes' devices (``device_put`` refuses a key for devices of
    several processes) and checkpointed; each process reads a contiguous block of every
    global batch, so the batch array, and the masks drawn over its rows, are one
    process's; ``predict`` gathers every process's rows, in the examples' order."""
    one = _run_processes(tmp_path, 1, "drop1", "--dropout", "--max-steps", "4", "--predict")[0]
    run_dir = str(tmp_path / "run")
    two = _run_processes(tmp_path, 2, "drop2", "--dropout", "--max-steps", "4", "--predict",
                         "--run-dir", run_dir)
    assert len(one["predictions"]) == 20  # TinyTask's validation examples
    for r in two:
        np.testing.assert_allclose(_losses(r), _losses(one), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r["predictions"], one["predictions"], rtol=1e-5, atol=1e-5)
    resumed = _run_processes(tmp_path, 1, "drop3", "--dropout", "--max-steps", "6",
                             "--run-dir", run_dir, "--resume", "last")[0]
    assert sorted(resumed["losses"], key=int) == ["4", "5"]


@pytest.mark.parametrize(("first", "second"), [(2, 1), (1, 2)])
def test_checkpoint_moves_between_two_processes_and_one(report, tmp_path, first, second):
    run_dir = str(tmp_path / "run")
    _run_processes(tmp_path, first, "a", "--run-dir", run_dir, "--max-steps", "4")
    resumed = _run_processes(
        tmp_path, second, "b", "--run-dir", run_dir, "--max-steps", "8", "--resume", "last"
    )
    for r in resumed:
        assert sorted(int(k) for k in r["losses"]) == [4, 5, 6, 7]  # continued from step 4
        np.testing.assert_allclose(
            _losses(r), report["single_device"]["losses"][4:8], rtol=1e-5, atol=1e-6
        )


# ------------------------------------------------------------ cluster detection

_SLURM_PORT_BASE = 65535 - 2**12 + 1  # JAX derives the port from the job id in this range


def _slurm_env(ntasks: int, procid: int, job_id: int = 1234) -> dict[str, str]:
    return {
        "SLURM_JOB_ID": str(job_id), "SLURM_STEP_NODELIST": "localhost",
        "SLURM_NTASKS": str(ntasks), "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid),
        "SLURM_STEP_NUM_NODES": "1",
    }


def test_cluster_detection_picks_slurm_and_open_mpi_with_more_than_one_process():
    from nnx_trainer_plugins.strategies import detect_cluster

    assert detect_cluster({}) is None
    assert detect_cluster(_slurm_env(2, 1)) == "slurm"
    assert detect_cluster(_slurm_env(1, 0)) is None  # one task: not a multi-process run
    assert detect_cluster({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"}) is None  # not under srun
    ompi = {"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:4000", "OMPI_COMM_WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_RANK": "3"}
    assert detect_cluster(ompi) == "ompi"


def test_a_slurm_environment_initializes_jax_distributed_with_its_id_count_and_coordinator(
    monkeypatch,
):
    """Under srun, initialize_distributed calls jax.distributed.initialize() and JAX's
    auto-detection (what the real call runs) derives coordinator, count and id from SLURM."""
    import jax
    from jax._src import clusters

    from nnx_trainer_plugins import strategies

    for key in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_", "JAX_"))]:
        monkeypatch.delenv(key)
    for key, value in _slurm_env(2, 1, job_id=77).items():
        monkeypatch.setenv(key, value)
    calls = []

    def fake_initialize(**kwargs):
        # What jax.distributed.initialize does with the arguments it was not given.
        detected = clusters.ClusterEnv.auto_detect_unset_distributed_params(
            kwargs.get("coordinator_address"), kwargs.get("num_processes"),
            kwargs.get("process_id"), None, None, 300,
        )
        calls.append((kwargs, detected))

    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", fake_initialize)
    monkeypatch.setattr(jax.config, "update", lambda *a, **k: None)
    assert strategies.initialize_distributed() is True
    [(kwargs, (address, count, index, _))] = calls
    assert kwargs == {}  # nothing forced: JAX's own detection decides
    assert (address, count, index) == (f"localhost:{_SLURM_PORT_BASE + 77}", 2, 1)

    calls.clear()
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert strategies.initialize_distributed() is False and calls == []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert strategies.initialize_distributed() is True and calls == []  # already joined


_SLURM_CHILD = """
import json, sys
import jax
from nnx_trainer_plugins.strategies import DataParallel, initialize_distributed
assert initialize_distributed()
strategy = DataParallel()
print("RESULT " + json.dumps({"count": jax.process_count(), "index": jax.process_index(),
                              "devices": strategy.num_devices}))
jax.distributed.shutdown()
"""


def _free_slurm_job_id() -> int:
    for offset in range(2**12):
        with socket.socket() as s:
            try:
                s.bind(("", _SLURM_PORT_BASE + offset))
            except OSError:
                continue
        return offset
    pytest.skip("no free port in JAX's SLURM port range")


def test_two_processes_join_from_a_simulated_slurm_environment(tmp_path):
    job_id = _free_slurm_job_id()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SLURM_CHILD], env={**_env(), **_slurm_env(2, i, job_id)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-2000:] for x in logs)
    results = [json.loads(next(ln for ln in log.splitlines() if ln.startswith("RESULT "))[7:])
               for log in logs]
    assert results == [{"count": 2, "index": i, "devices": 2} for i in range(2)]


def test_one_cpu_device_hands_the_host_batch_to_the_step_unless_transfers_are_guarded():
    from nnx_trainer.strategy import SingleDeviceStrategy

    strategy = SingleDeviceStrategy()
    batch = {"image": np.ones((4, 2), np.float32), "label": [0, 1, 2, 3]}
    host = strategy.shard_batch(batch)
    # CPU device memory is host memory: the compiled step reads NumPy arguments directly.
    assert all(isinstance(v, np.ndarray) for v in host.values())
    np.testing.assert_array_equal(host["label"], [0, 1, 2, 3])
    with jax.transfer_guard_host_to_device("disallow"):
        placed = strategy.shard_batch(batch)  # explicit device_put: allowed by the guard
    assert all(isinstance(v, jax.Array) for v in placed.values())
    assert placed["image"].devices() == {strategy.device}


# ------------------------------------------------- meshes with more than one axis


@pytest.fixture(scope="module")
def mesh_report(tmp_path_factory) -> dict:
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "mesh_run.py"), str(tmp_path_factory.mktemp("mesh"))],
        env=_env(8), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("REPORT "))
    return json.loads(line[len("REPORT "):])


@pytest.mark.parametrize("shape", ["4x2", "2x4"])
def test_data_by_model_meshes_train_like_one_device(mesh_report, shape):
    assert mesh_report["devices"] == 8
    run = mesh_report[f"mesh_{shape}"]
    assert len(run["losses"]) == 12
    np.testing.assert_allclose(run["losses"], mesh_report["single_losses"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_flat(run["params"]), _flat(mesh_report["single_params"]),
                               atol=1e-5)
    assert run["batch_spec"] == "P('data',)"


@pytest.mark.parametrize(("shape", "model"), [("4x2", 2), ("2x4", 4)])
def test_annotated_parameters_and_their_adam_moments_follow_the_annotations(
    mesh_report, shape, model
):
    placed = mesh_report[f"mesh_{shape}"]["placements"]
    hidden = 32 // model  # ("mlp", "model"): the hidden layer splits over the model axis
    assert placed["up.kernel"] == ["P(None, 'model')", [64, hidden]]  # ("embed", "mlp")
    assert placed["up.bias"] == ["P('model',)", [hidden]]
    assert placed["down.kernel"] == ["P('model',)", [hidden, 3]]  # ("mlp", None)
    assert placed["down.bias"] == ["P()", [3]]  # unannotated and small: replicated
    assert placed["opt.default.opt_state.0.mu.up.kernel"] == "P(None, 'model')"
    assert placed["opt.default.opt_state.0.mu.down.kernel"] == "P('model',)"


def test_fsdp_honours_annotations_and_unannotated_leaves_fall_back(mesh_report):
    fsdp = mesh_report["fsdp_annotated"]
    np.testing.assert_allclose(fsdp["losses"], mesh_report["single_losses"], rtol=1e-5,
                               atol=1e-6)
    assert fsdp["placements"]["up.kernel"] == ["P(None, 'data')", [64, 4]]  # ("mlp", "data")
    # No annotations: the largest axis divisible by the data axis (4), as fsdp does.
    plain = mesh_report["mesh_unannotated"]
    assert plain["fc1.kernel"] == ["P('data',)", [16, 16]]
    assert plain["fc2.bias"] == ["P()", [3]]


def test_a_checkpoint_moves_between_data_parallel_a_2d_mesh_and_one_device(mesh_report):
    moving = mesh_report["moving"]
    assert len(moving["resumed"]) == len(moving["full"]) == 9
    np.testing.assert_allclose(moving["resumed"], moving["full"], rtol=1e-5, atol=1e-6)
    placed = mesh_report["moved_mesh_placements"]  # restored onto (4, 2) from (8,)
    assert placed["up.kernel"] == ["P(None, 'model')", [64, 16]]
    assert placed["opt.up.opt_state.0.mu.up.kernel"] == "P(None, 'model')"  # two optimizers


def test_mesh_errors_name_the_problem_and_the_fix(mesh_report):
    errors = mesh_report["errors"]
    assert "hold 6 devices but 8 are used" in errors["bad_axes"]
    assert "need a 'data' axis" in errors["no_data_axis"]
    assert ("parameter model.down.kernel: dimension 0 ('mlp', size 10) does not divide over "
            "mesh axes ('model',) (4 devices)") in errors["indivisible"]
