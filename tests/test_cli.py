"""The ``nnx-trainer`` command: config round trip, precedence, errors, resume, predict."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from tiny_task import TinyTask

import nnx_trainer
from nnx_trainer.cli import main
from nnx_trainer_plugins.jsonl_logger import JsonlLogger

TESTS = Path(__file__).resolve().parent
TINY = ("--task", "tiny_task:TinyTask", "--trainer.batch_size", "16",
        "--trainer.log_every_n_steps", "1", "--plugins.metrics_jsonl", "{}")


@pytest.fixture(autouse=True)
def _only_configured_plugins(monkeypatch):
    # No progress bars, loggers or checkpoints unless a test configures them.
    monkeypatch.setenv("NNX_TRAINER_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def printed_config(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["fit", *args, "--print_config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_then_fit_matches_the_python_api(tmp_path, capsys):
    text = yaml.safe_dump(printed_config(capsys, *TINY, "--task.lr", "0.05",
                                         "--trainer.max_steps", "3"))
    (tmp_path / "run.yaml").write_text(text)
    assert main(["fit", "--config", str(tmp_path / "run.yaml"),
                 "--trainer.run_dir", str(tmp_path / "cli")]) == 0

    nnx_trainer.Trainer(max_steps=3, batch_size=16, log_every_n_steps=1, plugin_autoload=False,
                        plugins=[JsonlLogger()], run_dir=tmp_path / "api").fit(TinyTask(lr=0.05))
    assert losses(tmp_path / "cli") == losses(tmp_path / "api")
    assert sorted(losses(tmp_path / "api")) == [1, 2, 3]

    saved = tmp_path / "cli" / "config.yaml"  # written at fit start, reproduces the run
    assert yaml.safe_load(saved.read_text())["trainer"]["run_dir"] == str(tmp_path / "cli")
    assert main(["fit", "--config", str(saved), "--trainer.run_dir", str(tmp_path / "again")]) == 0
    assert losses(tmp_path / "again") == losses(tmp_path / "api")


def test_later_config_files_override_earlier_and_flags_override_files(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("trainer: {max_steps: 5, batch_size: 8}\n"
                                     "task: {class_path: tiny_task:TinyTask, lr: 0.3}\n")
    (tmp_path / "b.yaml").write_text("trainer: {max_steps: 4}\nplugins: {ema: {decay: 0.9}}\n")
    files = ("--config", str(tmp_path / "a.yaml"), "--config", str(tmp_path / "b.yaml"))
    cfg = printed_config(capsys, *files)
    assert (cfg["trainer"]["max_steps"], cfg["trainer"]["batch_size"]) == (4, 8)
    assert cfg["task"]["lr"] == 0.3 and cfg["plugins"]["ema"]["init_args"]["decay"] == 0.9
    cfg = printed_config(capsys, *files, "--trainer.max_steps", "2", "--plugins.ema.decay", "0.5")
    assert (cfg["trainer"]["max_steps"], cfg["trainer"]["batch_size"]) == (2, 8)
    assert cfg["plugins"]["ema"]["init_args"]["decay"] == 0.5


@pytest.mark.parametrize(("args", "message"), [
    (("--task", "tiny_task:TinyTask", "--trainer.max_epoch", "3"),
     "unknown option 'trainer.max_epoch' on the command line; did you mean 'trainer.max_epochs'?"),
    (("--task", "tiny_task:TinyTask", "--plugins.ema.dcay", "0.5"),
     "did you mean 'plugins.ema.decay'?"),
    (("--task", "tiny_task:TinyTask", "--trainer.max_epochs", "abc"),
     "option 'trainer.max_epochs': expected int or None, got 'abc'"),
    (("--task", "tiny_task:TinyTask", "--plugins.ema.decay", "x"),
     "option 'plugins.ema.decay': expected float, got 'x'"),
    (("--task", "resnet_task.task.ResNetTask", "--task.learning_rate", "-0.1"),
     "learning_rate must be positive, got -0.1"),
    (("--task", "tiny_task:TinyTask", "--trainer.batch_size", "0"),
     "batch_size must be a positive integer, got 0"),
    (("--task", "tiny_task:TinyTsk"), "has no 'TinyTsk'; did you mean 'TinyTask'?"),
    (("--task.lr", "0.1"), "no Task given"),
])
def test_bad_input_exits_2_naming_the_key(args, message, capsys):
    assert main(["fit", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_missing_or_non_mapping_config_file_exits_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "runs" / "nope" / "config.yaml"
    assert main(["fit", "--config", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"--config '{missing}': no such file" in err and "Traceback" not in err
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    assert main(["fit", "--config", str(tmp_path / "list.yaml")]) == 2
    err = capsys.readouterr().err
    assert "holds a list, not a mapping of options" in err and "Traceback" not in err


def test_unknown_key_in_a_config_file_is_named_with_the_file(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("task: {class_path: tiny_task:TinyTask, lrr: 0.1}\n")
    assert main(["fit", "--config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"'task.lrr' in {tmp_path / 'bad.yaml'}; did you mean 'task.lr'?" in err


USER_MODULE = '''
import dataclasses
from tiny_task import TinyTask

@dataclasses.dataclass(frozen=True)
class MyConfig:
    lr: float = 0.1
    n_train: int = 32

class MyTask(TinyTask):
    """A task whose options come from a config dataclass."""

    def __init__(self, config: MyConfig | None = None, **overrides):
        config = dataclasses.replace(config or MyConfig(), **overrides)
        super().__init__(n_train=config.n_train, n_val=0, lr=config.lr)
'''


def test_a_task_from_the_users_own_module(tmp_path, monkeypatch, capsys):
    (tmp_path / "mymod.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = printed_config(capsys, "--task", "mymod:MyTask", "--task.lr", "0.2")
    assert cfg["task"] == {"class_path": "mymod:MyTask", "lr": 0.2, "n_train": 32}
    run_dir = tmp_path / "run"
    spec = f"{tmp_path / 'mymod.py'}:MyTask"  # a file path works as well as a module name
    assert main(["fit", *TINY, "--task", spec, "--task.n_train", "16",
                 "--trainer.run_dir", str(run_dir)]) == 0
    assert sorted(losses(run_dir)) == [1]  # 16 examples, batch 16: one step


def test_ckpt_path_last_continues_the_run_and_predict_saves_arrays(tmp_path, capsys):
    base = (*TINY, "--plugins.checkpoint", "{}")
    assert main(["fit", *base, "--trainer.max_steps", "6",
                 "--trainer.run_dir", str(tmp_path / "whole")]) == 0
    assert main(["fit", *base, "--trainer.max_steps", "3",
                 "--trainer.run_dir", str(tmp_path / "part")]) == 0
    config = str(tmp_path / "part" / "config.yaml")
    assert main(["fit", "--config", config, "--ckpt_path", "last",
                 "--trainer.max_steps", "6"]) == 0
    assert losses(tmp_path / "part") == losses(tmp_path / "whole")

    capsys.readouterr()
    assert main(["predict", "--config", config, "--ckpt_path", "last"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["arrays"] == {
        "predictions": [20, 3]}
    assert np.load(tmp_path / "part" / "predictions.npz")["predictions"].shape == (20, 3)
    assert main(["validate", "--config", config]) == 2  # no weights named
    assert "--ckpt_path last" in capsys.readouterr().err


def test_plugin_options_replace_the_default_instance(tmp_path):
    assert main(["fit", *TINY, "--trainer.max_steps", "2", "--trainer.run_dir", str(tmp_path),
                 "--plugins.checkpoint.every_n_steps", "1",
                 "--plugins.checkpoint.save_on_end", "false",
                 "--plugins.checkpoint.keep_last", "5"]) == 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]


def test_the_installed_console_script(tmp_path):
    # The script beside this interpreter: a venv's bin/ need not be on PATH.
    beside = Path(sys.executable).with_name("nnx-trainer")
    script = str(beside) if beside.is_file() else shutil.which("nnx-trainer")
    assert script is not None, "reinstall: pip install -e ."
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path]),
           "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([script, "fit", *TINY, "--trainer.max_steps", "2",
                           "--trainer.run_dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(losses(tmp_path)) == [1, 2] and (tmp_path / "config.yaml").is_file()
    proc = subprocess.run([script, "fit", "--task", "tiny_task:TinyTask", "--trainer.seeed", "1"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "did you mean 'trainer.seed'?" in proc.stderr
    assert "Traceback" not in proc.stderr


def _cli_guide_yaml_blocks() -> list[str]:
    import re

    # The command-line guide's example configs (they were the README's before docs/).
    page = (TESTS.parent / "docs" / "cli.md").read_text()
    section = page.split("## Example configs", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```yaml\n(.*?)```", section, re.S)


@pytest.mark.parametrize("index", [0, 1])
def test_the_cli_guide_configs_parse_and_round_trip(tmp_path, capsys, index):
    blocks = _cli_guide_yaml_blocks()
    assert len(blocks) == 2  # CIFAR-10 ResNet-18 and ImageNet ResNet-50
    path = tmp_path / "run.yaml"
    path.write_text(blocks[index])
    resolved = printed_config(capsys, "--config", str(path))
    assert resolved["task"]["class_path"].endswith("ResNetTask")
    assert resolved["trainer"]["max_epochs"] == 90
    (tmp_path / "resolved.yaml").write_text(yaml.safe_dump(resolved))
    assert printed_config(capsys, "--config", str(tmp_path / "resolved.yaml")) == resolved
