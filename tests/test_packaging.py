"""The built wheel, installed into a fresh venv, used from a project with its own `plugins/`."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERIC_NAMES = {"plugins", "utils", "tests", "examples", "common", "lib"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)]
    # Without isolation first (no download); an older setuptools here falls back to isolation.
    proc = subprocess.run([*build, "--no-build-isolation"], capture_output=True, text=True)
    if proc.returncode != 0:
        proc = subprocess.run(build, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = out.glob("nnx_trainer-*.whl")
    return whl


def test_the_wheel_installs_no_generic_top_level_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"nnx_trainer", "resnet_task", "nnx_trainer_plugins"}, tops
    assert not tops & GENERIC_NAMES
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "= plugins." not in text and "nnx_trainer_plugins.orbax_checkpoint" in text


USER_TASK = '''
    """A user's project: its own `plugins` package and `utils` module beside its task."""
    import grain, numpy as np, optax
    from flax import nnx
    import nnx_trainer, nnx_trainer_plugins
    import plugins.timer, utils

    class Regression(nnx_trainer.Task):
        def configure_model(self, rngs):
            return nnx.Linear(4, 1, rngs=rngs)
        def configure_optimizer(self, total_steps):
            return optax.sgd(0.05)
        def train_data(self):
            rng = np.random.default_rng(0)
            x = rng.normal(size=(64, 4)).astype(np.float32)
            y = (x @ np.arange(1, 5, dtype=np.float32))[:, None]
            return grain.MapDataset.source([{"x": x[i], "y": y[i]} for i in range(64)])
        def val_data(self):
            return self.train_data()
        def training_step(self, model, batch):
            loss = ((model(batch["x"]) - batch["y"]) ** 2).mean()
            return loss, {}
        def validation_step(self, model, batch):
            return {"loss": ((model(batch["x"]) - batch["y"]) ** 2).mean(axis=-1)}

    trainer = nnx_trainer.Trainer(max_epochs=3, batch_size=16, run_dir="run")
    trainer.fit(Regression())
    print("plugins from", nnx_trainer_plugins.__file__)
    print("user plugins", plugins.timer.WHO, utils.WHO)
    print("active", sorted(n for n, p in trainer.plugin_manager.list_name_plugin() if p))
    print("val loss", trainer.validate(Regression())["val/loss"])
'''


def test_a_fit_from_a_project_with_its_own_plugins_package(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    # The running environment's site-packages give the dependencies (no download): a
    # .pth file lists them after the new venv's own, so the wheel installed there comes
    # first and the run checks it used that. (``system_site_packages`` would give the
    # base interpreter's, not the active virtualenv's, where most users install.)
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    inner_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    outer = [p for p in dict.fromkeys(site.getsitepackages()) if Path(p).is_dir()]
    (Path(inner_site) / "outer_environment.pth").write_text("\n".join(outer) + "\n")
    install = [sys.executable, "-m", "pip", "--python", str(python)]
    install = [*install, "install", "-q", "--no-deps", "--force-reinstall", str(wheel)]
    proc = subprocess.run(install, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]

    project = tmp_path / "project"
    (project / "plugins").mkdir(parents=True)
    (project / "plugins" / "__init__.py").write_text("")
    (project / "plugins" / "timer.py").write_text("WHO = 'user-timer'\n")
    (project / "utils.py").write_text("WHO = 'user-utils'\n")
    (project / "train.py").write_text(textwrap.dedent(USER_TASK))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(WANDB_MODE="disabled")
    proc = subprocess.run(
        [str(python), "train.py"], cwd=project, capture_output=True, text=True, env=env,
        timeout=600, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"plugins from {env_dir}" in proc.stdout, proc.stdout
    assert "user plugins user-timer user-utils" in proc.stdout
    assert "'checkpoint'" in proc.stdout and "'progress'" in proc.stdout
    assert (project / "run" / "checkpoints").is_dir()
