"""Sphinx extension: the hook reference, generated from the hook-spec module itself.

``.. hookspec-reference:: nnx_trainer.hookspecs`` documents every function that module
marks with its ``hookspec`` marker, in source order, one section per banner comment
(``# ----`` / ``# Phase`` / ``# ----``), through autodoc; so the reference cannot drift from
the specs. Each spec's pluggy options (``firstresult``, ``historic``) are stated in its entry.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from types import ModuleType
from typing import Any

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

_BANNER_RULE = re.compile(r"^# -{10,}\s*$")
_OPTION_TEXT = {
    "firstresult": "*firstresult*: the first implementation that returns a value other "
    "than None answers; the others are not called.",
    "historic": "*historic*: a plugin registered after the call still receives it.",
}


def _spec_options(obj: Any) -> dict[str, Any] | None:
    """The pluggy spec options of a hook-spec function (any project's marker), or None."""
    for name, value in vars(obj).items() if hasattr(obj, "__dict__") else ():
        if name.endswith("_spec") and isinstance(value, dict) and "firstresult" in value:
            return value
    return None


def hook_specs(module: ModuleType) -> list[tuple[str, list[str]]]:
    """``[(phase title, [spec names in source order]), ...]`` of a hook-spec module."""
    source = inspect.getsource(module)
    lines = source.splitlines()
    banners = {}  # line number (1-based) of a banner's title -> title
    for i in range(1, len(lines) - 1):
        if _BANNER_RULE.match(lines[i - 1]) and _BANNER_RULE.match(lines[i + 1]):
            banners[i + 1] = lines[i].lstrip("#").strip()
    events: list[tuple[int, str, str]] = [(n, "phase", t) for n, t in banners.items()]
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and _spec_options(getattr(module, node.name)):
            events.append((node.lineno, "spec", node.name))
    groups: list[tuple[str, list[str]]] = []
    for _, kind, value in sorted(events):
        if kind == "phase":
            groups.append((value, []))
        else:
            if not groups:
                groups.append(("Hooks", []))
            groups[-1][1].append(value)
    return [(title, names) for title, names in groups if names]


class HookspecReference(SphinxDirective):
    """Autodoc entries for every hook spec of a module, grouped by its banner comments."""

    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        module_name = self.arguments[0]
        module = importlib.import_module(module_name)
        self.env.note_dependency(inspect.getsourcefile(module))
        rst: list[str] = []
        for title, names in hook_specs(module):
            rst += [title, "-" * len(title), ""]
            for name in names:
                rst += [f".. autofunction:: {module_name}.{name}", ""]
        container = nodes.section()
        container.document = self.state.document
        nested_parse_with_titles(self.state, StringList(rst, source=module_name), container)
        return container.children


def _state_spec_options(app: Sphinx, what: str, name: str, obj: Any, options: Any,
                        lines: list[str]) -> None:
    options_of_spec = _spec_options(obj) if what == "function" else None
    if not options_of_spec:
        return
    notes = [text for key, text in _OPTION_TEXT.items() if options_of_spec.get(key)]
    if not notes:
        return
    # After the summary paragraph, before the details and the parameters.
    end = lines.index("") if "" in lines else len(lines)
    lines[end:end] = ["", *notes]


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("hookspec-reference", HookspecReference)
    app.connect("autodoc-process-docstring", _state_spec_options)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
