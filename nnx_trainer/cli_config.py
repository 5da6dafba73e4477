"""What ``nnx-trainer``'s options are made of: the Task class, its keys, the plugins' keys.

Nothing here lists flags by hand: the keys come from signatures (``Trainer.__init__``,
the Task's ``__init__`` or its config dataclass, each plugin class's ``__init__``), so a
new parameter anywhere is a new option everywhere.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.metadata
import inspect
import json
import os
import sys
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from nnx_trainer.plugin_manager import ENTRY_POINT_GROUP
from nnx_trainer.task import Task


class CLIError(ValueError):
    """Bad command-line or config input; reported as ``error: ...`` with exit status 2."""


def load_task_class(spec: str) -> type[Task]:
    """The Task class named by ``pkg.mod.Class``, ``pkg.mod:Class`` or ``path/mod.py:Class``."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise CLIError(f"--task {spec!r}: give pkg.module.Class, pkg.module:Class or "
                       "path/to/module.py:Class")
    try:
        if is_file_spec(spec):
            module = _module_from_file(Path(module_name))
        else:
            # A console script does not have the working directory on sys.path, unlike
            # `python -m`; a user's own module next to their config should still import.
            if os.getcwd() not in sys.path:
                sys.path.append(os.getcwd())
            module = importlib.import_module(module_name)
    except (ImportError, OSError) as exc:
        raise CLIError(f"--task {spec!r}: cannot import {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            # dir(), not vars(): a package may export its classes lazily (resnet_task does).
            names = [n for n in dir(module) if inspect.isclass(getattr(module, n, None))]
            near = difflib.get_close_matches(part, names, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise CLIError(f"--task {spec!r}: {module_name!r} has no {part!r}{hint}")
        obj = getattr(obj, part)
    if not (inspect.isclass(obj) and issubclass(obj, Task)):
        raise CLIError(f"--task {spec!r} is not a subclass of nnx_trainer.Task")
    return obj


def _module_from_file(path: Path) -> types.ModuleType:
    """Import ``path`` under its own name with its folder first on ``sys.path``.

    Then the file imports its sibling modules, and its classes pickle by reference: Grain
    starts its worker processes with multiprocessing's "spawn", which hands the parent's
    ``sys.path`` to each child, so a worker unpickling a transform imports the same file.
    """
    path = path.resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    folder, name = str(path.parent), path.stem
    if not name.isidentifier():
        raise CLIError(f"--task {str(path)!r}: {path.name!r} is not importable as a module "
                       "(the name must be a Python identifier); rename the file")
    if folder in sys.path:
        sys.path.remove(folder)
    sys.path.insert(0, folder)
    importlib.invalidate_caches()
    module = importlib.import_module(name)
    found = getattr(module, "__file__", None)
    if found is None or Path(found).resolve() != path:
        raise CLIError(
            f"--task {str(path)!r}: the module name {name!r} is already taken by "
            f"{found or 'a built-in module'}; rename the file (e.g. my_{name}.py)"
        )
    return module


def is_file_spec(spec: str) -> bool:
    """Whether a ``--task`` value names a file (``path/to/mod.py:Class``)."""
    module_name = spec.rpartition(":")[0]
    return module_name.endswith(".py") or os.sep in module_name or "/" in module_name


def absolute_task_spec(spec: str) -> str:
    """``spec`` with a file path made absolute, so a saved config runs from any folder."""
    if not is_file_spec(spec):
        return spec
    module_name, _, attr = spec.rpartition(":")
    return f"{Path(module_name).resolve()}:{attr}"


def config_parameter(cls: type) -> tuple[str, type] | None:
    """``(name, dataclass)`` when ``cls.__init__`` takes a dataclass config, else None.

    Such a Task (e.g. ``ResNetTask(config: ResNetConfig | None = None, **overrides)``)
    gets the dataclass's fields as its keys instead of one opaque ``config`` value.
    """
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: fall back to the plain signature
        return None
    for name, hint in hints.items():
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        options = typing.get_args(hint) if union else (hint,)
        classes = [t for t in options if t is not type(None)]
        if len(classes) == 1 and dataclasses.is_dataclass(classes[0]):
            return name, classes[0]
    return None


def add_task_arguments(parser: Any, cls: type[Task]) -> None:
    """The Task's constructor arguments (or its config dataclass's fields) as ``task.*``."""
    config = config_parameter(cls)
    if config is None:
        parser.add_class_arguments(cls, "task", fail_untyped=False, sub_configs=True)
        return
    name, config_cls = config
    parser.add_class_arguments(config_cls, "task", fail_untyped=False)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    others = [p for p in inspect.signature(cls.__init__).parameters.values()
              if p.name not in ("self", name) and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    if any(p.name in fields for p in others):
        raise CLIError(f"{cls.__name__}.__init__ repeats a field of {config_cls.__name__}")
    if others:
        # In the same "task" group as the fields: a second group of that name is refused.
        parser.add_class_arguments(cls, "task", as_group=False, fail_untyped=False,
                                   skip={name} | fields)


def expand_task_config(argv: Sequence[str], cls: type[Task]) -> list[str]:
    """``--task.config '{"image_size": 32}'`` as one ``--task.<field>`` flag per field.

    A Task taking a dataclass ``config`` has that dataclass's fields as its keys; the
    whole mapping is accepted too, in place, so later flags still override it.
    """
    config = config_parameter(cls)
    if config is None:
        return list(argv)
    name, config_cls = config
    key = f"--task.{name}"
    fields = {f.name for f in dataclasses.fields(config_cls)}
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == key or token.startswith(key + "="):
            if token == key:
                if i + 1 >= len(argv):
                    raise CLIError(f"{key} needs a value, e.g. {key} '{{\"{min(fields)}\": ...}}'")
                text, i = argv[i + 1], i + 2
            else:
                text, i = token[len(key) + 1:], i + 1
            try:
                values = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise CLIError(f"{key}: not a JSON/YAML mapping: {exc}") from exc
            if not isinstance(values, Mapping):
                raise CLIError(f"{key}: expected a mapping of {config_cls.__name__} fields, "
                               f"got {text!r}")
            for field, value in values.items():
                if field not in fields:
                    near = difflib.get_close_matches(str(field), sorted(fields), n=1)
                    hint = f"; did you mean {near[0]!r}?" if near else ""
                    raise CLIError(f"{key}: {config_cls.__name__} has no field {field!r}{hint}")
                text = value if isinstance(value, str) else json.dumps(value)
                out += [f"--task.{field}", text]
            continue
        out.append(token)
        i += 1
    return out


def build_task(cls: type[Task], options: Mapping[str, Any]) -> Task:
    """Instantiate the Task from its parsed ``task.*`` options (``class_path`` excluded)."""
    kwargs = {k: v for k, v in options.items() if k != "class_path"}
    config = config_parameter(cls)
    if config is not None:
        name, config_cls = config
        fields = {f.name for f in dataclasses.fields(config_cls)}
        kwargs[name] = config_cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in fields})
    return cls(**kwargs)


def plugin_classes() -> dict[str, type]:
    """Installed entry points of group ``nnx_trainer`` that are classes, by name.

    Module entry points (e.g. ``strategies``) have no constructor, so no options; one
    that fails to import is left out here and reported by the Trainer when it loads.
    """
    classes = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception:
            continue
        if inspect.isclass(obj):
            classes[ep.name] = obj
    return classes


def task_spec_from(argv: Sequence[str]) -> str | None:
    """The Task class path from ``--task.class_path`` or the ``--config`` files; last wins.

    Read before the parser is built, since the Task's options depend on its class.
    """
    spec = None
    for key, value in _options(argv):
        if key == "task.class_path":
            spec = value
        elif key == "config" and value is not None:
            task = (_load_yaml(value) or {}).get("task")
            if isinstance(task, Mapping) and task.get("class_path"):
                spec = str(task["class_path"])
    return spec


def _options(argv: Sequence[str]) -> Iterator[tuple[str, str | None]]:
    """``(key, value)`` for each ``--key value`` / ``--key=value`` in ``argv``."""
    for i, token in enumerate(argv):
        if not token.startswith("--") or token == "--":
            continue
        key, eq, value = token[2:].partition("=")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            value = nxt if nxt is not None and not nxt.startswith("--") else None
        yield key, value


def _load_yaml(source: str) -> Mapping[str, Any] | None:
    """A ``--config`` value's options: a file's, or inline YAML (as jsonargparse takes)."""
    path = Path(source)
    try:
        config = yaml.safe_load(path.read_text() if path.is_file() else source)
    except (OSError, yaml.YAMLError) as exc:
        raise CLIError(f"--config {source!r}: {exc}") from exc
    if config is None or isinstance(config, Mapping):
        return config
    if not path.is_file():  # a mistyped file name reads as a YAML string
        raise CLIError(f"--config {source!r}: no such file (from {Path.cwd()}); give the path "
                       "of a YAML file, e.g. a run directory's config.yaml")
    raise CLIError(f"--config {source!r}: holds a {type(config).__name__}, not a mapping of "
                   "options such as 'trainer: {max_epochs: 3}'")


def check_keys(argv: Sequence[str], valid: set[str], plugins: Mapping[str, type]) -> None:
    """Fail on an unknown key (command line or config file), naming the nearest valid one.

    jsonargparse rejects them too, but in several formats and without a suggestion.
    """
    known = set(valid)
    for name, cls in plugins.items():
        params = inspect.signature(cls).parameters.values()
        known.update(f"plugins.{name}.{p.name}" for p in params
                     if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
    given: list[tuple[str, str]] = []
    for key, value in _options(argv):
        if key == "config" and value is not None:
            given += [(k, f"in {value}") for k in _flat_keys(_load_yaml(value), "", valid)]
        elif key not in ("help", "print_config") and not key.endswith(".help"):
            given.append((key.replace(".init_args.", "."), "on the command line"))
    for key, where in given:
        if key in known:
            continue
        near = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise CLIError(f"unknown option {key!r} {where}{hint}")


def _flat_keys(config: Any, prefix: str, valid: set[str]) -> Iterator[str]:
    if not isinstance(config, Mapping):
        return
    for key, value in config.items():
        full = f"{prefix}{key}"
        if full in valid and not full.startswith("plugins."):
            yield full  # a leaf, even when its value is a mapping (e.g. a class_path)
        elif full.startswith("plugins.") and full.count(".") == 1 and isinstance(value, Mapping):
            if "class_path" in value:
                continue  # another class: jsonargparse checks its own parameters
            yield from _flat_keys(value.get("init_args", value), f"{full}.", valid)
        elif isinstance(value, Mapping):  # a group (an empty one, e.g. `plugins: {}`, is fine)
            yield from _flat_keys(value, f"{full}.", valid)
        else:
            yield full
