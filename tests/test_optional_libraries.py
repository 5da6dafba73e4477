"""A plugin whose library is not installed is listed as installed, not active, never a crash.

The base install leaves out the libraries only some plugins need (tensorboardX for
``tensorboard``, matplotlib for ``curves_plot``, each with its extra). Here they are
blocked for real in a subprocess (a ``None`` entry in ``sys.modules`` makes their import
fail as if they were not installed), as are the example task's Pillow and scikit-learn:
``nnx-trainer-plugins`` names the extra to install, and a fit of a Task that needs none
of them runs. A third-party plugin gets the same from its own distribution's metadata.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nnx_trainer.plugin_manager import AUTOLOAD_ENV, PluginError, create_plugin_manager

TESTS = Path(__file__).resolve().parent
BLOCKED = ("tensorboardX", "matplotlib", "PIL", "sklearn")
# Run before anything else in the child: the optional libraries cannot be imported.
PRELUDE = f"import sys\nfor name in {BLOCKED!r}:\n    sys.modules[name] = None\n"


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env_code = PRELUDE + textwrap.dedent(code)
    proc = subprocess.run(
        [sys.executable, "-c", env_code], cwd=cwd, capture_output=True, text=True,
        timeout=600, stdin=subprocess.DEVNULL,
        env={**_child_env(), "PYTHONPATH": str(TESTS)},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.pop(AUTOLOAD_ENV, None)  # the default plugins load, as for a user
    return {**env, "JAX_PLATFORMS": "cpu", "WANDB_MODE": "disabled"}


def test_the_plugin_list_names_the_extra_of_a_missing_library(tmp_path):
    proc = _run("""
        from nnx_trainer.plugin_manager import main
        raise SystemExit(main([]))
    """, tmp_path)
    active, inactive = proc.stdout.split("installed, not active:")
    assert "tensorboard  [" not in active and "curves_plot  [" not in active
    assert "progress  [nnx-trainer]" in active
    assert ("tensorboard: needs `pip install nnx-trainer[tensorboard]` "
            "(no module named 'tensorboardX')") in inactive
    assert ("curves_plot: needs `pip install nnx-trainer[plots]` "
            "(no module named 'matplotlib')") in inactive


def test_a_fit_runs_without_the_optional_libraries(tmp_path):
    proc = _run("""
        import nnx_trainer
        from tiny_task import TinyTask

        trainer = nnx_trainer.Trainer(max_epochs=2, batch_size=16, run_dir="run")
        trainer.fit(TinyTask())
        pm = trainer.plugin_manager
        print("active", sorted(name for name, plugin in pm.list_name_plugin() if plugin))
        print("inactive", sorted(pm.inactive))
        print("steps", trainer.global_step)
        print("still blocked", [n for n in sys.modules if n.split(".")[0] in
                                ("tensorboardX", "matplotlib", "PIL", "sklearn")
                                and sys.modules[n] is not None])
    """, tmp_path)
    assert "steps 8" in proc.stdout, proc.stdout
    assert "'checkpoint'" in proc.stdout and "'progress'" in proc.stdout
    assert "'curves_plot', " in proc.stdout.split("inactive")[1]
    assert "'tensorboard'" in proc.stdout.split("inactive")[1]
    assert "still blocked []" in proc.stdout
    assert (tmp_path / "run" / "checkpoints").is_dir()
    assert not (tmp_path / "run" / "tensorboard").exists()


@pytest.fixture
def third_party_site(tmp_path, monkeypatch):
    """Installed-looking distributions whose plugins need a library that is missing."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "acme_viz.py").write_text("import acmeplotlib  # not installed\n\n"
                                      "class Viz:\n    name = 'acmeviz'\n")
    dists = {
        # Declares the library under an extra: the reason names it.
        "acme_viz": ("Name: acme-viz\nRequires-Dist: pluggy\n"
                     'Requires-Dist: AcmePlotLib>=1; extra == "viz"\n',
                     "acmeviz = acme_viz:Viz"),
        # Declares nothing: the reason names the module.
        "acme_bare": ("Name: acme-bare\n", "acmebare = acme_viz:Viz"),
        # Its own module is missing: a broken installation, still an error.
        "acme_gone": ("Name: acme-gone\n", "acmegone = acme_gone_module:Viz"),
    }
    for folder, (metadata, entry) in dists.items():
        info = site / f"{folder}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\n{metadata}Version: 1.0\n")
        (info / "entry_points.txt").write_text(f"[nnx_trainer]\n{entry}\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    yield site
    sys.modules.pop("acme_viz", None)


def test_a_third_party_plugin_missing_its_library_gets_the_same(third_party_site):
    pm = create_plugin_manager(disable=["acmegone"])
    assert pm.get_plugin("acmeviz") is None
    assert pm.inactive["acmeviz"] == (
        "needs `pip install acme-viz[viz]` (no module named 'acmeplotlib')")
    assert pm.inactive["acmebare"] == "needs the module 'acmeplotlib', which is not installed"


def test_requested_by_name_a_missing_library_is_an_error(third_party_site):
    with pytest.raises(PluginError, match=r"'acmeviz' .*needs `pip install acme-viz\[viz\]`"):
        create_plugin_manager(plugins=["acmeviz"], disable=["acmegone"], autoload=False)


def test_a_plugin_whose_own_module_is_missing_is_still_an_error(third_party_site):
    with pytest.raises(PluginError, match="'acmegone' .*failed to load"):
        create_plugin_manager()
