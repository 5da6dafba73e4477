"""RunView: the written plugin contract. A real Trainer satisfies it; hooks and the Task are
typed against it, so no engine module but the Trainer's own entry points imports the Trainer."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pluggy
import pytest
from tiny_task import TinyTask, make_trainer

import nnx_trainer
from nnx_trainer import hookspecs
from nnx_trainer.run_view import RunView

ENGINE = Path(nnx_trainer.__file__).parent
# The Trainer's module and what is built on it (the public API, the CLI, export).
MAY_IMPORT_TRAINER = {"trainer.py", "__init__.py", "cli.py", "export.py"}
SETTABLE = {"state", "should_stop", "stop_reason"}


def members() -> set[str]:
    """Every member of the protocol: properties, methods and annotated attributes."""
    names = {n for n in vars(RunView) if not n.startswith("_")}
    return names | set(RunView.__annotations__)


def test_the_protocol_is_small_and_each_member_is_documented():
    tree = ast.parse(inspect.getsource(RunView))
    body = tree.body[0].body
    documented = set()
    for i, node in enumerate(body):
        if isinstance(node, ast.FunctionDef) and ast.get_docstring(node):
            documented.add(node.name)
        if (isinstance(node, ast.AnnAssign) and i + 1 < len(body)
                and isinstance(body[i + 1], ast.Expr)
                and isinstance(body[i + 1].value, ast.Constant)):
            documented.add(node.target.id)
    assert documented == members()
    assert SETTABLE <= set(RunView.__annotations__)  # plain attributes: assignable
    assert "plugin_manager" not in members() and "fit" not in members()
    assert len(members()) <= 40


def test_a_fitted_trainer_satisfies_every_member(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=3, log_every_n_steps=1)
    trainer.fit(TinyTask(n_val=0))
    assert isinstance(trainer, RunView)
    for name in members():
        assert hasattr(trainer, name), name
    for name in ("checkpoint_state", "lower_train_step", "first_nonfinite_loss",
                 "first_nonfinite_state"):
        assert callable(getattr(trainer, name))
    assert isinstance(trainer.hook, pluggy.HookRelay)
    assert isinstance(trainer.run_dir, Path) and trainer.stage == "fit"
    assert (trainer.global_step, trainer.total_steps) == (3, 3)
    assert isinstance(trainer.task, TinyTask) and trainer.task.trainer is trainer
    assert trainer.first_nonfinite_loss() is None and trainer.first_nonfinite_state() is None
    assert "train" in trainer.compile_seconds and trainer.fit_seconds > 0
    assert "train/loss" in trainer.callback_metrics
    trainer.should_stop, trainer.stop_reason = False, None  # settable
    trainer.state = trainer.state  # settable (same structure)


def test_a_test_fake_need_not_be_a_trainer():
    assert not isinstance(object(), RunView)  # the check is structural, not nominal


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, TYPE_CHECKING blocks included (``from nnx_trainer
    import Trainer`` counts as importing ``nnx_trainer.trainer``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved inside the engine package
                base = "nnx_trainer" + (f".{base}" if base else "")
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
            if base == "nnx_trainer" and any(a.name == "Trainer" for a in node.names):
                found.add("nnx_trainer.trainer")
    return found


@pytest.mark.parametrize(
    "path", sorted(p for p in ENGINE.glob("*.py") if p.name not in MAY_IMPORT_TRAINER),
    ids=lambda p: p.name)
def test_no_engine_module_but_the_entry_points_imports_the_trainer(path):
    assert "nnx_trainer.trainer" not in _imports(path)


def test_every_hook_is_typed_against_the_view():
    specs = [f for _, f in inspect.getmembers(hookspecs, inspect.isfunction)
             if hasattr(f, "nnx_trainer_spec")]
    assert len(specs) > 20
    for spec in specs:
        parameters = inspect.signature(spec).parameters
        if "trainer" in parameters:
            assert parameters["trainer"].annotation == "RunView", spec.__name__
    assert inspect.get_annotations(nnx_trainer.Task)["trainer"] == "RunView | None"
