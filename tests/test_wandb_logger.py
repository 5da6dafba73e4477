"""WandbLogger: activation rules, no prompt, and what an offline run actually recorded.

W&B runs offline here (no network, no account). An offline run writes everything
into ``offline-run-*/run-<id>.wandb`` (wandb 0.31 writes no config.yaml or
wandb-summary.json offline), a LevelDB-style log of ``wandb_internal_pb2.Record``
protobufs; ``_records`` below reads it back so the tests assert what W&B stored.
"""

from __future__ import annotations

import json
import math
import os
import pty
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny_task import TinyTask, make_trainer

import nnx_trainer
from nnx_trainer_plugins.jsonl_logger import JsonlLogger
from nnx_trainer_plugins.wandb_logger import RUN_ID_FILE, STEP_METRIC, WandbLogger

REPO = Path(__file__).resolve().parents[1]
_WANDB_VARS = [k for k in os.environ if k.startswith("WANDB_")]


@pytest.fixture(scope="module", autouse=True)
def offline_wandb(tmp_path_factory):
    """Offline, silent, no git/code/stats capture, every wandb path inside tmp."""
    root = tmp_path_factory.mktemp("wandb_env")
    with pytest.MonkeyPatch.context() as mp:
        for key in _WANDB_VARS:
            mp.delenv(key, raising=False)
        env = {
            "WANDB_MODE": "offline", "WANDB_DIR": root / "root", "WANDB_SILENT": "true",
            "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true", "WANDB_CONSOLE": "off",
            "WANDB_ERROR_REPORTING": "false", "WANDB__DISABLE_STATS": "true",
            "WANDB__DISABLE_META": "true", "WANDB_CONFIG_DIR": root / "config",
            "WANDB_CACHE_DIR": root / "cache", "WANDB_DATA_DIR": root / "data",
            "WANDB_ARTIFACT_DIR": root / "artifacts", "NETRC": root / "no-netrc",
        }
        for key, value in env.items():
            mp.setenv(key, str(value))
        (root / "root").mkdir()
        yield root / "root"
        if "wandb" in sys.modules:  # forget settings read from this env
            sys.modules["wandb"].teardown()


# ---------------------------------------------------------------- read-back


def _records(path: Path) -> list:
    """Every Record in a ``.wandb`` file: 7-byte header, then 32 KiB blocks of chunks
    (crc32 of type+data, uint16 length, uint8 type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0)
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left for a header: padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        if len(chunk) < length:  # still being written
            break
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"bad checksum at {pos}"
        pending += chunk
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _offline_runs(wandb_dir: Path, run_id: str) -> list[Path]:
    """The ``.wandb`` files of every offline session of run ``run_id``, oldest first.

    Sessions are ``offline-run-<time>-<id>``; one started within the same second as
    the previous one gets a ``-1``, ``-2``... suffix.
    """

    def order(path: Path) -> tuple[str, int]:
        stamp, _, suffix = path.parent.name.removeprefix("offline-run-").partition(run_id)
        return stamp, int(suffix.lstrip("-") or 0)

    paths = Path(wandb_dir).glob(f"wandb/offline-run-*-{run_id}*/run-{run_id}.wandb")
    return sorted(paths, key=order)


def _parse(path: Path, timeout: float = 30.0) -> SimpleNamespace:
    """The run's records, once complete: ``run.finish()`` returns before wandb-core
    has flushed the file, so wait for the final ``exit`` record."""
    deadline = time.monotonic() + timeout
    records = _records(path)
    while not any(r.HasField("exit") for r in records):
        assert time.monotonic() < deadline, f"{path} never got its exit record"
        time.sleep(0.1)
        records = _records(path)
    kinds = [r.WhichOneof("record_type") for r in records]
    (run,) = [r.run for r in records if r.HasField("run")]
    rows = [
        {i.nested_key[0] if i.nested_key else i.key: json.loads(i.value_json)
         for i in r.history.item}
        for r in records if r.HasField("history")
    ]
    summary: dict = {}
    for r in records:
        if r.HasField("summary"):
            for u in r.summary.update:
                if len(u.nested_key) <= 1:
                    summary[u.nested_key[0] if u.nested_key else u.key] = json.loads(u.value_json)
    exits = [r.exit for r in records if r.HasField("exit")]
    metrics = [r.metric for r in records if r.HasField("metric")]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    return SimpleNamespace(kinds=kinds, run=run, config=config, rows=rows, summary=summary,
                           exits=exits, metrics=metrics)


# ------------------------------------------------------------- full runs


class _Raise:
    """Raises after a given step (a stand-in for a crash mid-training)."""

    def __init__(self, at: int) -> None:
        self.at = at

    @nnx_trainer.hookimpl
    def on_train_batch_end(self, step: int) -> None:
        if step + 1 == self.at:
            raise RuntimeError("boom")


class _Preempt:
    """Asks for a preemption stop after a given step, as the SIGTERM handler would."""

    def __init__(self, at: int) -> None:
        self.at = at

    @nnx_trainer.hookimpl
    def on_train_batch_end(self, trainer, step: int) -> None:
        if step + 1 == self.at:
            trainer.preempted, trainer.stop_reason = True, "SIGTERM"


SHORT_RUN = {"max_epochs": 2, "batch_size": 8, "log_every_n_steps": 3}


@pytest.fixture(scope="module")
def runs(offline_wandb, tmp_path_factory):
    """A 2-epoch fit, then a standalone validate into the same, still open, run."""
    run_dir = tmp_path_factory.mktemp("wandb_run") / "exp-1"
    task = TinyTask()
    logger = WandbLogger(project="nnx-tests", tags=["tiny"])
    trainer = make_trainer(run_dir, logger, JsonlLogger(), **SHORT_RUN)
    trainer.fit(task)  # 8 steps per epoch, val after each epoch
    first_id = (run_dir / RUN_ID_FILE).read_text().strip()
    open_after_fit = logger.run is not None
    validated = trainer.validate(task)
    logger.finish()  # what the exit handler does at interpreter exit
    files = _offline_runs(offline_wandb, first_id)
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return SimpleNamespace(run_dir=run_dir, run_id=first_id, files=files, jsonl=jsonl,
                           validated=validated, sessions=[_parse(f) for f in files],
                           open_after_fit=open_after_fit)


def test_config_and_run_identity(runs):
    fit = runs.sessions[0]
    assert fit.run.project == "nnx-tests" and list(fit.run.tags) == ["tiny"]
    assert fit.run.display_name == "exp-1"  # default name: the run directory's
    assert fit.config["trainer"]["batch_size"] == 8
    assert fit.config["trainer"]["max_epochs"] == 2
    assert fit.config["trainer"]["total_steps"] == 16
    assert fit.config["task"] == {"lr": 0.1, "n_train": 64}


def test_metrics_rows_match_the_logged_values_and_steps(runs):
    rows = runs.sessions[0].rows
    train = [r for r in rows if "train/loss" in r]
    val = [r for r in rows if "val/loss" in r]
    assert [r[STEP_METRIC] for r in train] == [3, 6, 9, 12, 15, 16]
    assert [r[STEP_METRIC] for r in val] == [8, 16, 16]  # the fit's two, then validate's
    # Same numbers as the JSONL logger saw (8 lines of the fit, then the validate's).
    expected = [{k: v for k, v in line.items() if k not in ("step", "time")}
                for line in runs.jsonl]
    assert len(runs.jsonl) == 9
    got = [{k: v for k, v in r.items() if not k.startswith("_") and k != STEP_METRIC}
           for r in rows]
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.keys() == e.keys()
        assert all(math.isclose(g[k], e[k], rel_tol=1e-6) for k in g)


def test_every_metric_is_plotted_against_the_global_step(runs):
    defined = {(m.glob_name or m.name): m.step_metric for m in runs.sessions[0].metrics}
    assert defined.pop(STEP_METRIC) == "" and defined.pop("*") == STEP_METRIC
    # wandb 0.26 and before also record each metric the glob matched.
    assert set(defined.values()) <= {STEP_METRIC}, defined


def test_final_summary_and_clean_finish(runs):
    fit = runs.sessions[0]
    last_val = [r for r in fit.rows if "val/loss" in r][-1]
    assert fit.summary["status"] == "finished"
    assert fit.summary[STEP_METRIC] == 16 and fit.summary["total_steps"] == 16
    assert fit.summary["fit_seconds"] > 0
    assert math.isclose(fit.summary["val/loss"], last_val["val/loss"], rel_tol=1e-6)
    assert math.isclose(fit.summary["val/accuracy"], last_val["val/accuracy"], rel_tol=1e-6)
    assert [e.exit_code for e in fit.exits] == [0]


def test_fit_then_validate_is_one_run(runs):
    # The fit does not finish the run: the validate after it logs into the same one.
    assert runs.open_after_fit
    assert len(runs.files) == 1  # one offline run directory, one id
    (session,) = runs.sessions
    assert session.run.run_id == runs.run_id
    row = session.rows[-1]
    assert row[STEP_METRIC] == 16 and "train/loss" not in row
    assert math.isclose(row["val/loss"], runs.validated["val/loss"], rel_tol=1e-6)
    assert [e.exit_code for e in session.exits] == [0]
    assert (runs.run_dir / RUN_ID_FILE).read_text().strip() == runs.run_id


FIT_THEN_VALIDATE = """
import sys
import nnx_trainer
from tiny_task import TinyTask
from nnx_trainer_plugins.wandb_logger import WandbLogger

trainer = nnx_trainer.Trainer(max_steps=3, batch_size=8, log_every_n_steps=1,
                              plugin_autoload=False, plugins=[WandbLogger(dir=sys.argv[1])],
                              run_dir=sys.argv[1])
task = TinyTask()
trainer.fit(task)
trainer.validate(task)
# No finish: the run ends with the interpreter.
"""


def test_fit_then_validate_in_one_process_is_one_run_finished_at_exit(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    proc = subprocess.run([sys.executable, "-c", FIT_THEN_VALIDATE, str(tmp_path)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = (tmp_path / RUN_ID_FILE).read_text().strip()
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1  # one run directory
    (path,) = _offline_runs(tmp_path, run_id)
    session = _parse(path)
    assert [r[STEP_METRIC] for r in session.rows if "train/loss" in r] == [1, 2, 3]
    # The validate's row (the fit stopped mid-epoch, before any validation of its own).
    assert [r[STEP_METRIC] for r in session.rows if "val/loss" in r] == [3]
    assert [e.exit_code for e in session.exits] == [0]
    assert session.summary["status"] == "finished"


def test_resume_passes_the_stored_id(tmp_path, monkeypatch):
    import wandb

    seen = {}

    def fake_init(**kwargs):
        seen.update(kwargs)
        return SimpleNamespace(id=kwargs["id"], define_metric=lambda *a, **k: None,
                               finish=lambda **k: None)

    monkeypatch.setattr(wandb, "init", fake_init)
    (tmp_path / RUN_ID_FILE).write_text("abc123\n")
    stub = SimpleNamespace(run_dir=tmp_path, is_main_process=True)
    logger = WandbLogger(project="p", mode="offline")
    logger.log_hyperparams(trainer=stub, params={"trainer": {"seed": 0}})
    logger.on_fit_start(trainer=stub)
    assert seen["id"] == "abc123" and seen["resume"] == "allow"
    assert seen["config"] == {"trainer": {"seed": 0}} and seen["mode"] == "offline"
    assert seen["dir"] == os.environ["WANDB_DIR"]  # WANDB_DIR wins over run_dir
    logger.finish()


def test_exception_finishes_the_run_with_exit_code_1(tmp_path):
    wandb_dir = tmp_path / "explicit"
    trainer = make_trainer(tmp_path / "run", WandbLogger(dir=wandb_dir), _Raise(at=4),
                           max_steps=6, **SHORT_RUN)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(TinyTask())
    run_id = (tmp_path / "run" / RUN_ID_FILE).read_text().strip()
    (path,) = _offline_runs(wandb_dir, run_id)  # dir= wins over WANDB_DIR
    failed = _parse(path)
    assert [r[STEP_METRIC] for r in failed.rows] == [3]
    assert failed.summary["status"] == "failed"
    assert [e.exit_code for e in failed.exits] == [1]


def test_preemption_marks_and_finishes_the_run(tmp_path):
    logger = WandbLogger(dir=tmp_path)
    make_trainer(tmp_path / "run", logger, _Preempt(at=5), max_steps=6, **SHORT_RUN).fit(
        TinyTask())
    assert logger.run is None
    run_id = (tmp_path / "run" / RUN_ID_FILE).read_text().strip()
    (path,) = _offline_runs(tmp_path, run_id)
    preempted = _parse(path)
    assert "preempting" in preempted.kinds
    assert preempted.summary["status"] == "preempted"
    assert preempted.summary["stop_reason"] == "SIGTERM"
    assert preempted.summary[STEP_METRIC] == 5
    assert [e.exit_code for e in preempted.exits] == [1]


# ------------------------------------------------------------ activation


@pytest.mark.parametrize(
    ("env", "registered"),
    [
        ({}, False),
        ({"WANDB_MODE": "offline"}, True),
        ({"WANDB_MODE": "online"}, True),
        ({"WANDB_API_KEY": "k" * 40}, True),
        ({"WANDB_PROJECT": "p"}, True),
        ({"WANDB_MODE": "disabled", "WANDB_PROJECT": "p"}, False),
    ],
)
def test_autoload_registers_it_only_when_the_environment_configures_wandb(
    monkeypatch, tmp_path, env, registered
):
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT",
                "NNX_TRAINER_DISABLE_PLUGIN_AUTOLOAD"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert (WandbLogger.from_environment() is not None) is registered
    manager = nnx_trainer.Trainer(run_dir=tmp_path).plugin_manager
    assert isinstance(manager.get_plugin("wandb"), WandbLogger) is registered
    if not registered:
        assert manager.inactive["wandb"] == WandbLogger.activation


@pytest.mark.parametrize(
    ("env", "options", "active"),
    [
        ({}, {}, True),  # configured (or requested by name): on
        ({"WANDB_MODE": "disabled"}, {}, False),
        ({"WANDB_MODE": "disabled"}, {"mode": "offline"}, True),
        ({}, {"mode": "disabled"}, False),
    ],
)
def test_a_configured_instance_logs_unless_its_mode_is_disabled(monkeypatch, env, options,
                                                                 active):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert WandbLogger(**options).is_active() is active


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="mode must be one of"):
        WandbLogger(mode="dryrun")


def test_non_main_process_does_nothing(tmp_path):
    stub = SimpleNamespace(run_dir=tmp_path / "run", is_main_process=False)
    logger = WandbLogger()
    logger.log_hyperparams(trainer=stub, params={"a": 1})
    logger.on_fit_start(trainer=stub)
    logger.log_metrics(trainer=stub, metrics={"train/loss": 1.0}, step=1)
    assert logger.run is None and not (tmp_path / "run").exists()


FRESH_PROCESS = """
import json, os, sys
import nnx_trainer
from tiny_task import TinyTask
from nnx_trainer_plugins.wandb_logger import WandbLogger

run_dir = sys.argv[1]
# 1. Autoload with no WANDB_* variable: not registered, wandb never imported.
os.environ.pop("NNX_TRAINER_DISABLE_PLUGIN_AUTOLOAD", None)
trainer = nnx_trainer.Trainer(run_dir=run_dir + "/default")
manager = trainer.plugin_manager
print(json.dumps({"default_registered": manager.get_plugin("wandb") is not None,
                  "default_reason": manager.inactive.get("wandb"),
                  "default_imported_wandb": "wandb" in sys.modules}), flush=True)

# 2. WANDB_PROJECT activates it; the mode stays online and no key exists anywhere.
os.environ["WANDB_PROJECT"] = "p"
trainer = nnx_trainer.Trainer(max_steps=2, batch_size=8, plugin_autoload=False,
    plugins=[WandbLogger()], run_dir=run_dir + "/online")
try:
    trainer.fit(TinyTask())
    error = None
except RuntimeError as exc:
    error = str(exc)
print(json.dumps({"online_error": error, "global_step": trainer.global_step}), flush=True)
"""


@pytest.fixture(scope="module", autouse=True)
def _fresh_process_started(tmp_path_factory):
    """Starts FRESH_PROCESS when the module starts, so it runs alongside the fits here,
    in a new interpreter whose stdin and stderr are a terminal (a pty): exactly where
    wandb.init would show its interactive login prompt and wait for an answer."""
    home = tmp_path_factory.mktemp("fresh_home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]), TERM="xterm",
        HOME=str(home), NETRC=str(home / "no-netrc"), WANDB_CONFIG_DIR=str(home / "cfg"),
        WANDB_CACHE_DIR=str(home / "cache"), WANDB_ERROR_REPORTING="false",
    )
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", FRESH_PROCESS, str(home / "runs")], env=env, cwd=REPO,
        stdin=slave, stderr=slave, stdout=subprocess.PIPE, text=True,
    )
    os.close(slave)
    terminal: list[bytes] = []

    def drain() -> None:  # keep the pty from filling up; keep what was shown
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the child closed its side
                return
            if not chunk:
                return
            terminal.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    yield SimpleNamespace(proc=proc, reader=reader, terminal=terminal, home=home)
    if proc.poll() is None:
        proc.kill()
        proc.communicate()
    reader.join(timeout=5)
    os.close(master)


@pytest.fixture(scope="module")
def fresh_process(_fresh_process_started):
    """FRESH_PROCESS's results, once it has exited."""
    started = _fresh_process_started
    try:
        stdout, _ = started.proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        started.proc.kill()
        started.proc.communicate()
        pytest.fail(f"the process hung: waiting at a prompt? {b''.join(started.terminal)!r}")
    started.reader.join(timeout=5)
    shown = b"".join(started.terminal).decode(errors="replace")
    assert started.proc.returncode == 0, shown
    results = {}
    for line in stdout.splitlines():
        results.update(json.loads(line))
    return SimpleNamespace(results=results, shown=shown, runs=started.home / "runs")


def test_without_wandb_env_it_is_not_registered_and_never_imports_wandb(fresh_process):
    assert fresh_process.results["default_registered"] is False
    assert fresh_process.results["default_reason"] == WandbLogger.activation
    assert fresh_process.results["default_imported_wandb"] is False
    assert not any((fresh_process.runs / "default").glob("*"))  # wrote nothing at all


def test_online_without_credentials_fails_at_fit_start_without_prompting(fresh_process):
    error = fresh_process.results["online_error"]
    assert error is not None and "no W&B API key is configured" in error
    assert "WANDB_MODE=offline" in error and "wandb login" in error
    assert fresh_process.results["global_step"] == 0  # before the first step
    assert "Enter your choice" not in fresh_process.shown
    online = fresh_process.runs / "online"
    assert not (online / RUN_ID_FILE).exists() and not (online / "wandb").exists()
