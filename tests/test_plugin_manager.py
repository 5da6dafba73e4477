"""Plugin loading through real entry points: discovery, disabling, replacing, validation, CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pluggy
import pytest
from tiny_task import TinyTask

import nnx_trainer
from nnx_trainer.plugin_manager import (
    AUTOLOAD_ENV,
    PluginError,
    create_plugin_manager,
    describe_plugins,
    main,
)


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """A third-party distribution 'acme-plugin' installed as a real *.dist-info on sys.path."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "acme_plugin.py").write_text(textwrap.dedent('''
        from nnx_trainer import hookimpl

        CALLS = []

        class AcmeCounter:
            name = "acme"

            def __init__(self, tag="default"):
                self.tag = tag

            @hookimpl
            def on_train_batch_end(self, step):
                CALLS.append((self.tag, step))
    '''))
    (site / "acme_broken.py").write_text(textwrap.dedent('''
        from nnx_trainer import hookimpl

        @hookimpl
        def on_trian_batch_end(step):  # misspelled on purpose
            pass
    '''))
    dist = site / "acme_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[nnx_trainer]\nacme = acme_plugin:AcmeCounter\n"
    )
    broken = site / "acme_broken-1.0.dist-info"
    broken.mkdir()
    (broken / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-broken\nVersion: 1.0\n")
    (broken / "entry_points.txt").write_text("[nnx_trainer]\nacme_broken = acme_broken\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    import acme_plugin

    acme_plugin.CALLS.clear()
    yield acme_plugin
    sys.modules.pop("acme_plugin", None)
    sys.modules.pop("acme_broken", None)


def test_builtin_plugins_load_through_entry_points(monkeypatch):
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    pm = create_plugin_manager()
    rows = {name: origin for name, origin, _ in describe_plugins(pm)}
    assert rows["progress"] == "nnx-trainer"
    assert rows["metrics_jsonl"] == "nnx-trainer"


def test_third_party_plugin_is_found_called_and_disabled_by_name(third_party, tmp_path):
    trainer = nnx_trainer.Trainer(
        max_steps=2, batch_size=16, run_dir=tmp_path, disable_plugins=["acme_broken"]
    )
    assert trainer.plugin_manager.get_plugin("acme") is not None
    assert trainer.plugin_manager.origins["acme"] == "acme-plugin"
    trainer.fit(TinyTask(n_val=0))
    assert third_party.CALLS == [("default", 0), ("default", 1)]

    third_party.CALLS.clear()
    trainer = nnx_trainer.Trainer(
        max_steps=2, batch_size=16, run_dir=tmp_path,
        disable_plugins=["acme", "acme_broken"],
    )
    assert trainer.plugin_manager.get_plugin("acme") is None
    trainer.fit(TinyTask(n_val=0))
    assert third_party.CALLS == []


def test_a_configured_instance_replaces_the_default_of_the_same_name(third_party, tmp_path):
    trainer = nnx_trainer.Trainer(
        max_steps=1, batch_size=16, run_dir=tmp_path, disable_plugins=["acme_broken"],
        plugins=[third_party.AcmeCounter(tag="mine")],
    )
    trainer.fit(TinyTask(n_val=0))
    assert third_party.CALLS == [("mine", 0)]


def test_a_misspelled_hook_fails_at_start_up_naming_the_plugin(third_party):
    with pytest.raises(pluggy.PluginValidationError, match="acme_broken") as info:
        create_plugin_manager()
    assert "on_trian_batch_end" in str(info.value)


def test_unknown_name_in_the_disable_list_lists_the_known_names(third_party):
    with pytest.raises(PluginError, match="cannot disable unknown plugin 'acm'") as info:
        create_plugin_manager(disable=["acm"])
    for known in ("acme", "progress", "metrics_jsonl"):
        assert known in str(info.value)


def test_autoload_switch_by_option_and_environment(third_party, monkeypatch):
    pm = create_plugin_manager(autoload=False)
    assert pm.get_plugin("acme") is None and pm.get_plugin("progress") is None
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    pm = create_plugin_manager()
    assert pm.get_plugin("acme") is None
    # Named plugins still load with autoload off, like pytest's -p NAME.
    pm = create_plugin_manager(plugins=["acme"])
    assert pm.get_plugin("acme") is not None
    with pytest.raises(PluginError, match="unknown plugin 'nope'"):
        create_plugin_manager(plugins=["nope"])


def test_essential_plugins_cannot_be_disabled(monkeypatch):
    from nnx_trainer import plugin_manager

    monkeypatch.setattr(plugin_manager, "ESSENTIAL_PLUGINS", frozenset({"progress"}))
    with pytest.raises(PluginError, match="'progress' is essential"):
        create_plugin_manager(disable=["progress"])
    pm = create_plugin_manager(autoload=False)
    assert pm.get_plugin("progress") is not None


def test_hook_call_with_positional_arguments_is_refused(monkeypatch):
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    pm = create_plugin_manager()
    with pytest.raises(TypeError):
        pm.hook.on_fit_end(None, None)  # keyword-only, as pluggy enforces


def test_listing_command_shows_plugins_and_their_hooks(third_party, capsys):
    assert main(["--disable", "acme_broken"]) == 0
    out = capsys.readouterr().out
    assert "acme  [acme-plugin]" in out
    assert "    on_train_batch_end" in out
    assert "acme_broken: disabled" in out
    assert main([]) == 2  # the broken plugin: reported, not a traceback
    assert "on_trian_batch_end" in capsys.readouterr().err


def test_listing_command_is_installed_as_a_console_script(monkeypatch):
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    # The script beside this interpreter: a venv's bin/ need not be on PATH.
    beside = Path(sys.executable).with_name("nnx-trainer-plugins")
    script = str(beside) if beside.is_file() else "nnx-trainer-plugins"
    out = subprocess.run(
        [script], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert "progress  [nnx-trainer]" in out


def test_env_no_name_blocks_and_bare_name_requests(third_party, monkeypatch):
    monkeypatch.setenv("NNX_TRAINER_PLUGINS", "no:acme_broken, no:progress")
    pm = create_plugin_manager()
    names = {name for name, _, _ in describe_plugins(pm)}
    assert "progress" not in names and "acme" in names
    assert pm.inactive["progress"] == "disabled"
    monkeypatch.setenv("NNX_TRAINER_PLUGINS", "acme")
    pm = create_plugin_manager(autoload=False)
    names = {name for name, _, _ in describe_plugins(pm)}
    assert names == {"strategies", "acme"}
    assert "autoload is off" in pm.inactive["progress"]


def test_env_unknown_name_fails_naming_the_installed_ones(monkeypatch):
    monkeypatch.setenv("NNX_TRAINER_PLUGINS", "no:progres")
    with pytest.raises(PluginError, match="unknown plugin 'progres'.*progress"):
        create_plugin_manager()


def test_opt_in_plugins_are_not_registered_until_configured(monkeypatch):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "NNX_TRAINER_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    pm = create_plugin_manager()
    names = {name for name, _, _ in describe_plugins(pm)}
    for opt_in in ("ema", "early_stopping", "timer", "wandb"):
        assert opt_in not in names
        assert pm.inactive[opt_in] and pm.inactive[opt_in] != "disabled"
    pm = create_plugin_manager(plugins=["ema"])
    assert "ema" in {name for name, _, _ in describe_plugins(pm)}


def test_the_listing_shows_installed_versus_active_with_reasons(capsys, monkeypatch):
    monkeypatch.delenv("NNX_TRAINER_PLUGINS", raising=False)
    assert main(["--disable", "progress"]) == 0
    out = capsys.readouterr().out
    active, inactive = out.split("installed, not active:")
    assert "metrics_jsonl" in active and "progress" not in active
    assert "progress: disabled" in inactive and "ema:" in inactive


def test_the_suite_blocks_third_party_plugins_installed_beside_it(tmp_path):
    """conftest blocks every entry point of another distribution (here: one on PYTHONPATH)."""
    site = tmp_path / "site"
    dist = site / "stray-1.0.dist-info"
    dist.mkdir(parents=True)
    (site / "stray_plugin.py").write_text("")
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: stray\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[nnx_trainer]\nstray = stray_plugin\n")
    (tmp_path / "test_probe.py").write_text(
        "import os\ndef test_probe():\n"
        "    assert 'no:stray' in os.environ.get('NNX_TRAINER_PLUGINS', '')\n"
    )
    import os
    from pathlib import Path

    conftest = Path(__file__).with_name("conftest.py")
    (tmp_path / "conftest.py").write_text(conftest.read_text())
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
