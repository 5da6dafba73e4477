"""The command line's edges (issue 20, item 8): exit status 2 without a traceback for bad
input found inside the fit, task files and Grain workers, config dataclasses, precedence,
clean stdout, plugin errors that name the plugin, every ``on_run_end``, one resume line.

The command runs as users run it, in a subprocess (``python -m nnx_trainer.cli``), from a
working directory that is not the repository's.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from tiny_task import TinyTask, make_trainer

from nnx_trainer import hookimpl
from nnx_trainer.cli import main
from nnx_trainer_plugins.orbax_checkpoint import OrbaxCheckpoint

TESTS = Path(__file__).resolve().parent
EXAMPLE = TESTS.parent / "examples" / "train_resnet.py"
TINY = ("--task", "tiny_task:TinyTask", "--trainer.batch_size", "16")


def _env(extra_path: str | None = None, **extra: str) -> dict[str, str]:
    paths = [str(TESTS), *([extra_path] if extra_path else []), *sys.path]
    env = {k: v for k, v in os.environ.items() if k != "NNX_TRAINER_PLUGINS"}
    return {**env, "PYTHONPATH": os.pathsep.join(paths), "JAX_PLATFORMS": "cpu",
            "NNX_TRAINER_DISABLE_PLUGIN_AUTOLOAD": "1", "WANDB_MODE": "disabled", **extra}


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
        command: tuple[str, ...] = ("-m", "nnx_trainer.cli")) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *command, *args], cwd=cwd, env=env or _env(),
                          capture_output=True, text=True, timeout=600)


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


NAN_TASK = '''
import jax.numpy as jnp
from tiny_task import TinyTask

class NanTask(TinyTask):
    """Its loss is NaN from the first step: a bad input, before any update."""

    def training_step(self, model, batch):
        loss, metrics = super().training_step(model, batch)
        return loss * jnp.nan, metrics
'''
TWO_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
GUARD = ("--plugins.nonfinite_guard", "{}", "--trainer.log_every_n_steps", "1")


# ---- 1. bad input found inside the fit: exit 2, the message, no traceback, nothing written

@pytest.mark.parametrize(("args", "env", "status", "message"), [
    (("--trainer.batch_size", "1000"), {}, 2, "batch size 1000 is larger than the training set"),
    (("--trainer.strategy", "data_parallel", "--trainer.batch_size", "15"), TWO_DEVICES, 2,
     "batch size 15 is not divisible by the 2 devices"),
    (("--trainer.strategy", "data_parallel", "--trainer.eval_batch_size", "3"), TWO_DEVICES, 2,
     "eval_batch_size 3 is not divisible by the 2 devices"),
    (("--task", "nantask.py:NanTask", *GUARD), {}, 2, "non-finite loss (nan) at step 0"),
    # Diverging later is a failed training, not bad input: exit 1, still one line.
    (("--task.lr", "1e30", "--trainer.max_steps", "8", *GUARD), {}, 1,
     "non-finite loss (nan) at step 1"),
], ids=["batch>data", "batch/devices", "eval_batch/devices", "nan@0", "nan-later"])
def test_errors_found_in_the_fit_exit_with_one_line(tmp_path, args, env, status, message):
    (tmp_path / "nantask.py").write_text(NAN_TASK)
    run_dir = tmp_path / "run"
    proc = cli("fit", *TINY, *args, "--trainer.run_dir", str(run_dir), cwd=tmp_path,
               env=_env(**env))
    assert proc.returncode == status, proc.stderr[-3000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if status == 2 and "nan" not in message:  # refused before anything was written
        assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())


def test_resume_into_another_model_exits_2_without_traceback(tmp_path):
    run_dir = tmp_path / "run"
    base = (*TINY, "--plugins.checkpoint", "{}", "--trainer.max_steps", "2",
            "--trainer.run_dir", str(run_dir))
    assert cli("fit", *base, cwd=tmp_path).returncode == 0
    config = (run_dir / "config.yaml").read_text()
    proc = cli("fit", *base, "--task.dim", "5", "--ckpt_path", "last", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (run_dir / "config.yaml").read_text() == config  # the run to continue is intact


def test_the_example_reports_a_failed_training_in_one_line(tmp_path):
    # --lr so large that the first update overflows: the loss is NaN from step 1 on.
    proc = cli("--max-steps", "4", "--lr", "1e38", "--log-every", "1", "--no-checkpoint",
               "--disable-plugin", "progress", "--run-dir", str(tmp_path / "run"),
               cwd=tmp_path, command=(str(EXAMPLE),),
               env=_env(NNX_TRAINER_PLUGINS="nonfinite_guard"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error: non-finite loss" in proc.stderr and "Traceback" not in proc.stderr


# ---- 2. --task path/to/file.py:Class

SIBLING = '''
import grain

class Double(grain.transforms.Map):
    """Defined beside the task file: Grain's workers must import it to unpickle it."""

    def map(self, example):
        return {"image": example["image"] * 2, "label": example["label"]}
'''
FILE_TASK = '''
import grain
from helper_transforms import Double  # a sibling module of this file
from tiny_task import TinyTask

class Halve(grain.transforms.Map):
    """Defined in the task file itself: the workers import the file by its name."""

    def map(self, example):
        return {"image": example["image"] / 2, "label": example["label"]}

class FileTask(TinyTask):
    def train_transforms(self):
        return [Double(), Halve()]
'''


def test_a_task_file_imports_its_siblings_in_grain_workers_and_reruns_from_elsewhere(tmp_path):
    project = tmp_path / "project" / "tasks"
    project.mkdir(parents=True)
    (project / "helper_transforms.py").write_text(SIBLING)
    (project / "file_task.py").write_text(FILE_TASK)
    run_dir = tmp_path / "run"
    common = ("--trainer.max_steps", "2", "--plugins.metrics_jsonl", "{}",
              "--trainer.log_every_n_steps", "1")
    proc = cli("fit", "--task", "tasks/file_task.py:FileTask", "--trainer.batch_size", "16",
               "--trainer.worker_count", "2", *common, "--trainer.run_dir", str(run_dir),
               cwd=tmp_path / "project")
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["task"]["class_path"] == f"{project / 'file_task.py'}:FileTask"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    again = cli("fit", "--config", str(run_dir / "config.yaml"),
                "--trainer.run_dir", str(tmp_path / "again"), cwd=elsewhere)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _losses(tmp_path / "again") == _losses(run_dir)


# ---- 3. a Task with a dataclass config and other parameters

CONFIG_TASK = '''
import dataclasses
from tiny_task import TinyTask

@dataclasses.dataclass(frozen=True)
class Options:
    lr: float = 0.1
    n_train: int = 32

class ConfigTask(TinyTask):
    """A dataclass config plus a parameter of its own."""

    def __init__(self, config: Options | None = None, dim: int = 8, **overrides):
        config = dataclasses.replace(config or Options(), **overrides)
        super().__init__(n_train=config.n_train, n_val=0, lr=config.lr, dim=dim)
'''


def test_a_config_dataclass_with_other_parameters_and_the_whole_config_as_a_flag(
        tmp_path, monkeypatch, capsys):
    (tmp_path / "config_task.py").write_text(CONFIG_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("NNX_TRAINER_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert main(["fit", "--task", "config_task:ConfigTask", "--task.dim", "4",
                 "--task.config", '{"n_train": 16}', "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)["task"]
    assert printed == {"class_path": "config_task:ConfigTask", "lr": 0.1, "n_train": 16, "dim": 4}
    # ResNetTask: --task.config as a JSON mapping of ResNetConfig's fields; a later flag wins.
    assert main(["fit", "--task", "resnet_task.task.ResNetTask", "--task.config",
                 '{"image_size": 32, "model": "resnet20"}', "--task.model", "resnet32",
                 "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)["task"]
    assert (printed["image_size"], printed["model"]) == (32, "resnet32")
    assert main(["fit", "--task", "resnet_task.task.ResNetTask", "--task.config",
                 '{"image_sise": 32}']) == 2
    assert "ResNetConfig has no field 'image_sise'; did you mean 'image_size'?" in \
        capsys.readouterr().err


# ---- 4. flags override files, wherever they stand

def test_a_flag_before_a_config_file_still_wins(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "trainer": {"max_epochs": 8, "batch_size": 32, "log_every_n_steps": 1,
                    "run_dir": str(tmp_path / "file_run")},
        "task": {"class_path": "tiny_task:TinyTask", "n_val": 0},
        "plugins": {"metrics_jsonl": {}}}))
    proc = cli("fit", "--trainer.max_epochs", "3", "--trainer.run_dir", str(tmp_path / "flag_run"),
               "--config", str(tmp_path / "c.yaml"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "file_run").exists()
    assert sorted(_losses(tmp_path / "flag_run")) == list(range(1, 7))  # 3 epochs of 2 steps


# ---- 5. validate > m.json is JSON

def test_validate_prints_only_json_on_stdout(tmp_path):
    proc = cli("validate", *TINY, "--untrained", "true", "--plugins.progress", "{}",
               "--trainer.run_dir", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(json.loads(proc.stdout)) == {"val/accuracy", "val/loss"}
    assert "validate  step 0" in proc.stderr  # the progress plugin's line, on stderr


# ---- 6. plugin errors name the plugin

def _distribution(site: Path, name: str, module: str, source: str) -> None:
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    dist = site / f"{module}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}"
                                   "\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[nnx_trainer]\n{name} = {module}:Plugin\n")


def test_a_misspelled_hook_names_the_entry_point_and_the_nearest_hook(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    _distribution(site, "typo", "typo_plugin", '''
        from nnx_trainer import hookimpl

        class Plugin:
            @hookimpl
            def on_train_batch_ends(self, step):
                pass
    ''')
    proc = cli("fit", *TINY, "--trainer.run_dir", str(tmp_path / "run"), cwd=tmp_path,
               env=_env(str(site), NNX_TRAINER_PLUGINS="typo"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert ("plugin 'typo' (entry point typo = typo_plugin:Plugin of distribution "
            "typo-plugin) implements 'on_train_batch_ends'") in proc.stderr
    assert "did you mean 'on_train_batch_end'?" in proc.stderr
    assert "object at 0x" not in proc.stderr


def test_an_exception_inside_a_hook_names_the_plugin(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    _distribution(site, "boom", "boom_plugin", '''
        from nnx_trainer import hookimpl

        class Plugin:
            @hookimpl
            def on_train_batch_end(self, step):
                if step == 1:
                    raise RuntimeError("boom at step 1")
    ''')
    proc = cli("fit", *TINY, "--trainer.max_steps", "3", "--trainer.run_dir",
               str(tmp_path / "run"), cwd=tmp_path,
               env=_env(str(site), NNX_TRAINER_PLUGINS="boom"))
    assert proc.returncode == 1
    assert "RuntimeError: boom at step 1" in proc.stderr
    assert "raised in plugin 'boom' (boom-plugin), hook on_train_batch_end" in proc.stderr


# ---- 7. every on_run_end is called

class _Recorder:
    def __init__(self, name: str, calls: list[str], fail: bool = False) -> None:
        self.name, self.calls, self.fail = name, calls, fail

    @hookimpl
    def on_run_end(self, outcome) -> None:
        self.calls.append(self.name)
        if self.fail:
            raise RuntimeError(f"{self.name} failed to tear down")


def test_every_on_run_end_runs_when_one_raises_and_the_first_error_is_raised(tmp_path):
    calls: list[str] = []
    plugins = [_Recorder("first", calls), _Recorder("second", calls, fail=True),
               _Recorder("third", calls, fail=True)]
    trainer = make_trainer(tmp_path, *plugins, max_steps=1)
    with pytest.raises(RuntimeError, match="third failed to tear down") as info:
        trainer.fit(TinyTask(n_val=0))
    assert sorted(calls) == ["first", "second", "third"]  # pluggy's order: third first
    notes = "\n".join(info.value.__notes__)
    assert "raised in plugin 'third' (passed in), hook on_run_end" in notes
    assert "second failed to tear down" in notes


# ---- 8. a resumed fit is reported once, at INFO, numbered as the progress line is

def test_a_resume_is_logged_once_at_info_with_the_progress_numbering(tmp_path, caplog):
    make_trainer(tmp_path, OrbaxCheckpoint(every_n_steps=1), max_epochs=3, max_steps=6).fit(
        TinyTask(n_val=0))  # 4 steps per epoch: step 6 is epoch 2, batch 2
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="nnx_trainer"):
        make_trainer(tmp_path, OrbaxCheckpoint(every_n_steps=1), max_epochs=3).fit(
            TinyTask(n_val=0), ckpt_path="last")
    resumed = [r for r in caplog.records if "resumed from" in r.getMessage()]
    assert len(resumed) == 1 and resumed[0].levelno == logging.INFO
    assert "at step 6 (epoch 2/3, 2 of its batches done)" in resumed[0].getMessage()
