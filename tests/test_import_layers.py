"""The import layers of pyproject.toml's ``[tool.importlinter]`` hold (import-linter).

The engine (``nnx_trainer``) imports no plugin and no task; the built-in plugins
(``plugins/``, installed as ``nnx_trainer_plugins``) and the example task
(``resnet_task``) import the engine only; no plugin imports another plugin; and no
package's modules import each other in a circle. ``lint-imports`` is run as a user or CI
would run it, from this interpreter's environment; it reads the installed packages
(the editable install maps ``plugins/`` to ``nnx_trainer_plugins``).
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def test_the_import_contracts_are_kept():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    assert lint_imports.exists(), (
        f"{lint_imports} is missing: import-linter comes with `pip install -e '.[dev]'`")
    proc = subprocess.run(
        [str(lint_imports), "--no-cache", "--config", str(PYPROJECT)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert "0 broken" in proc.stdout, proc.stdout[-3000:]


def test_every_plugin_entry_point_is_in_the_independence_contract():
    config = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    entry_points = config["project"]["entry-points"]["nnx_trainer"].values()
    plugin_modules = {value.partition(":")[0] for value in entry_points}
    (independence,) = [contract for contract in config["tool"]["importlinter"]["contracts"]
                       if contract["type"] == "independence"]
    assert plugin_modules == set(independence["modules"])
