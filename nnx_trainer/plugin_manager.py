"""Plugin loading: entry points of group ``nnx_trainer``, disable by name, replace by instance.

Built-in plugins and third-party ones load the same way: through the
``[project.entry-points.nnx_trainer]`` table of each installed distribution,
like pytest plugins. The rules:

- ``disable=["progress"]`` blocks a plugin by its entry-point name; an unknown name is
  an error listing the known ones.
- ``NNX_TRAINER_PLUGINS`` (comma-separated, like pytest's ``PYTEST_PLUGINS`` plus
  ``-p no:NAME``): ``no:NAME`` blocks ``NAME`` as ``disable=`` does; a bare ``NAME``
  requests it as ``plugins=["NAME"]`` does (loaded even with autoload off, and an
  opt-in plugin is registered with its defaults).
- ``NNX_TRAINER_DISABLE_PLUGIN_AUTOLOAD=1`` or ``Trainer(plugin_autoload=False)``
  loads no entry point except the essential ones and those requested by name.
- Opt-in plugins (EMA, early stopping, a timer, wandb) exist only when configured, as
  pytest registers ``stepwise`` only when its option is on: an entry-point class with a
  ``from_environment()`` classmethod is asked for an instance on autoload, and ``None``
  leaves it unregistered, with its ``activation`` sentence recorded as the reason. A
  configured instance in ``plugins=`` or a request by name registers it.
- A plugin instance passed in ``plugins=`` whose ``name`` attribute equals an entry
  point's name replaces that entry point's default.
- After loading, ``check_pending()`` makes a misspelled hook fail at start-up.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import pluggy

from nnx_trainer import hookspecs

ENTRY_POINT_GROUP = "nnx_trainer"
AUTOLOAD_ENV = "NNX_TRAINER_DISABLE_PLUGIN_AUTOLOAD"
PLUGINS_ENV = "NNX_TRAINER_PLUGINS"
TRACE_ENV = "NNX_TRAINER_TRACE_HOOKS"
# Plugins the engine's options rely on (``strategy=...`` names); like pytest's
# essential plugins they load even with autoload off and cannot be disabled.
ESSENTIAL_PLUGINS = frozenset({"strategies"})


class PluginError(ValueError):
    """A plugin could not be found, disabled or loaded as asked."""


class TrainerPluginManager(pluggy.PluginManager):
    """pluggy's manager plus where each plugin came from (distribution or "passed in")."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.origins: dict[str, str] = {}
        # Installed entry points that are not registered, with the reason (shown by
        # ``nnx-trainer-plugins``): disabled, autoload off, or an opt-in not configured.
        self.inactive: dict[str, str] = {}


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _instantiate(obj: Any, requested: bool) -> Any:
    """The object to register for a loaded entry point, or None (an opt-in left off).

    An entry point may name a module, a class (instantiated with its defaults) or a
    ready object; pluggy registers whatever object holds the hookimpls. A class with
    ``from_environment`` is opt-in: on autoload it decides from the environment.
    """
    if not inspect.isclass(obj):
        return obj
    if not requested and hasattr(obj, "from_environment"):
        return obj.from_environment()
    return obj()


def _env_plugin_names() -> tuple[list[str], list[str]]:
    """``(requested, blocked)`` names from ``NNX_TRAINER_PLUGINS``."""
    requested, blocked = [], []
    for item in os.environ.get(PLUGINS_ENV, "").split(","):
        item = item.strip()
        if item.startswith("no:"):
            blocked.append(item[3:].strip())
        elif item:
            requested.append(item)
    return requested, blocked


def plugin_name_of(plugin: Any) -> str | None:
    """The name a plugin instance registers under: its ``name`` attribute, if a string."""
    name = getattr(plugin, "name", None)
    return name if isinstance(name, str) and not inspect.ismodule(plugin) else None


def create_plugin_manager(
    plugins: Sequence[Any] = (),
    disable: Iterable[str] = (),
    autoload: bool | None = None,
) -> TrainerPluginManager:
    """Build a validated plugin manager.

    :param plugins: plugin objects (modules, instances) to register, or entry-point
        names (strings) to load even when autoload is off.
    :param disable: entry-point names to block.
    :param autoload: load every installed entry point; ``None`` reads the environment.
    """
    pm = TrainerPluginManager()
    pm.add_hookspecs(hookspecs)
    if os.environ.get(TRACE_ENV):
        pm.trace.root.setwriter(lambda msg: sys.stderr.write(msg))
        pm.enable_tracing()

    available = _entry_points()
    env_requested, env_blocked = _env_plugin_names()
    for name in [*disable, *env_blocked]:
        if name in ESSENTIAL_PLUGINS:
            raise PluginError(f"plugin {name!r} is essential and cannot be disabled")
        if name not in available:
            known = ", ".join(sorted(available)) or "(none installed)"
            raise PluginError(
                f"cannot disable unknown plugin {name!r}; installed plugins: {known}"
            )
        pm.set_blocked(name)
        pm.inactive[name] = "disabled"

    if autoload is None:
        autoload = not os.environ.get(AUTOLOAD_ENV)

    requested_names: list[str] = []
    for plugin in [*plugins, *env_requested]:
        if isinstance(plugin, str):
            if plugin not in available:
                known = ", ".join(sorted(available)) or "(none installed)"
                raise PluginError(f"unknown plugin {plugin!r}; installed plugins: {known}")
            if not pm.is_blocked(plugin):
                requested_names.append(plugin)
            continue
        # Registered before entry points load, so a configured instance takes the
        # slot of the default with the same name (pluggy skips names already taken).
        name = plugin_name_of(plugin)
        if name is not None and pm.is_blocked(name):
            continue
        pm.register(plugin, name=name)

    to_load = set(available) if autoload else ESSENTIAL_PLUGINS | set(requested_names)
    for name in sorted(set(available) - to_load - set(pm.inactive)):
        if pm.get_plugin(name) is None:
            pm.inactive[name] = f"autoload is off ({AUTOLOAD_ENV}); request it by name"
    for name in sorted(to_load & set(available)):
        if pm.get_plugin(name) is not None or pm.is_blocked(name):
            continue
        ep = available[name]
        try:
            obj = _instantiate(ep.load(), requested=name in requested_names)
        except Exception as exc:
            raise PluginError(
                f"plugin {name!r} ({ep.value}) failed to load: {exc!r}; "
                f"disable it with disable=[{name!r}] or fix the installation"
            ) from exc
        if obj is None:  # an opt-in plugin nobody configured
            pm.inactive[name] = getattr(ep.load(), "activation", "off until configured")
            continue
        pm.register(obj, name=name)
        pm.origins[name] = ep.dist.name if ep.dist is not None else ep.value

    pm.check_pending()
    return pm


def describe_plugins(pm: TrainerPluginManager) -> list[tuple[str, str, list[str]]]:
    """``(name, where it comes from, hooks it implements)`` for every registered plugin."""
    rows = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:  # blocked
            continue
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or [])
        rows.append((name, pm.origins.get(name, "passed in"), hooks))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """``nnx-trainer-plugins``: list the active plugins and the hooks each implements."""
    parser = argparse.ArgumentParser(
        prog="nnx-trainer-plugins",
        description="List the nnx_trainer plugins that would load, and their hooks.",
    )
    parser.add_argument(
        "-p", "--disable", action="append", default=[], metavar="NAME",
        help="pretend this plugin is disabled (repeatable)",
    )
    parser.add_argument(
        "--no-autoload", action="store_true",
        help=f"as with {AUTOLOAD_ENV}=1: only essential plugins",
    )
    args = parser.parse_args(argv)
    try:
        autoload = False if args.no_autoload else None
        pm = create_plugin_manager(disable=args.disable, autoload=autoload)
    except (PluginError, pluggy.PluginValidationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("active:")
    for name, origin, hooks in describe_plugins(pm):
        print(f"  {name}  [{origin}]")
        for hook in hooks:
            print(f"      {hook}")
    if pm.inactive:
        print("installed, not active:")
        for name, reason in sorted(pm.inactive.items()):
            print(f"  {name}: {reason}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
