"""Plugins share through hooks, never by name: a third-party plugin contributes to the fit
summary and learns of saves like a built-in; no plugin looks another up or imports one."""

from __future__ import annotations

import ast
import io
import re
import tomllib
from pathlib import Path

from rich.console import Console
from tiny_task import TinyTask, make_trainer

import nnx_trainer
from nnx_trainer_plugins.orbax_checkpoint import OrbaxCheckpoint
from nnx_trainer_plugins.rich_progress import RichProgress
from nnx_trainer_plugins.throughput import Throughput

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = ROOT / "plugins"


class AcmeReport:
    """A third-party plugin: rows for the summary, the saves it is told about."""

    name = "acme_report"

    def __init__(self) -> None:
        self.saved: list[int] = []

    @nnx_trainer.hookimpl
    def on_checkpoint_saved(self, step):
        self.saved.append(step)

    @nnx_trainer.hookimpl
    def fit_summary_rows(self, trainer, exception):
        return [("acme saves", f"{len(self.saved)} (last step {trainer.global_step})")]


def test_a_third_party_plugin_adds_summary_rows_and_hears_of_every_save(tmp_path):
    buf = io.StringIO()
    report = AcmeReport()
    trainer = make_trainer(tmp_path, RichProgress(console=Console(file=buf, width=120)),
                           OrbaxCheckpoint(every_n_steps=2), Throughput(), report,
                           max_steps=4, log_every_n_steps=2)
    trainer.fit(TinyTask(n_val=0))
    assert report.saved == [2, 4]
    summary = buf.getvalue()[buf.getvalue().index("fit summary"):]
    assert re.search(r"\n  acme saves +2 \(last step 4\)\n", summary)
    assert f"checkpoints: {tmp_path / 'checkpoints'}" in buf.getvalue()  # checkpoint_dir hook


def test_the_summary_rates_come_from_the_training_time_hook(tmp_path):
    class Clocked:
        @nnx_trainer.hookimpl
        def training_time(self):
            return {"train_steps": 4, "train_seconds": 2.0, "val_seconds": 0.5,
                    "checkpoint_seconds": 0.0}

    buf = io.StringIO()
    make_trainer(tmp_path, RichProgress(console=Console(file=buf, width=120)), Clocked(),
                 max_steps=4).fit(TinyTask(n_val=0))
    assert re.search(r"\n  steps/s +2\.00\n", buf.getvalue())
    assert re.search(r"\n  wall time +[\d.]+ s \(validation 0\.5 s, checkpoints 0\.0 s\)\n",
                     buf.getvalue())


def _plugin_modules() -> dict[str, Path]:
    return {p.stem: p for p in PLUGIN_DIR.glob("*.py")}


def test_no_plugin_looks_another_up_by_name():
    offenders = [p.name for p in _plugin_modules().values() if "get_plugin(" in p.read_text()]
    assert offenders == []


def test_no_plugin_imports_another_registered_plugin():
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())
    registered = {value.split(":")[0].rsplit(".", 1)[-1]
                  for value in table["project"]["entry-points"]["nnx_trainer"].values()}
    for name, path in _plugin_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = (node.module or "").rsplit(".", 1)[-1]
                imported = {module} | {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                imported = {a.name.rsplit(".", 1)[-1] for a in node.names}
            else:
                continue
            assert not (imported & registered) - {name}, (path.name, imported & registered)
