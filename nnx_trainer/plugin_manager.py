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
- An entry point whose library is not installed is not a crash: its import raises
  ``ModuleNotFoundError`` for a module other than its own (a plugin that imports its
  library lazily calls :func:`~nnx_trainer.plugin_libraries.require_modules`), and on
  autoload it is left unregistered with a reason naming the extra to install, read
  from its distribution's metadata (``pip install nnx-trainer[tensorboard]``);
  requested by name, that reason is an error.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import inspect
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pluggy

from nnx_trainer import hookspecs
from nnx_trainer.plugin_libraries import missing_library

ENTRY_POINT_GROUP = "nnx_trainer"
AUTOLOAD_ENV = "NNX_TRAINER_DISABLE_PLUGIN_AUTOLOAD"
PLUGINS_ENV = "NNX_TRAINER_PLUGINS"
TRACE_ENV = "NNX_TRAINER_TRACE_HOOKS"
# Plugins the engine's options rely on (``strategy=...`` names); like pytest's
# essential plugins they load even with autoload off and cannot be disabled.
ESSENTIAL_PLUGINS = frozenset({"strategies"})


class PluginError(ValueError):
    """A plugin could not be found, disabled or loaded as asked."""


class PluginHookError(PluginError, pluggy.PluginValidationError):
    """A plugin implements a hook that is not an nnx_trainer hook, or with wrong arguments.

    Also a ``pluggy.PluginValidationError``, as pluggy's own check raises.
    """

    def __init__(self, plugin: object, message: str) -> None:
        pluggy.PluginValidationError.__init__(self, plugin, message)


# The start of the note added to an exception raised inside a plugin's hook.
RAISED_IN = "raised in plugin"


def _before_hook_call(hook_name: str, methods: Sequence[Any],
                      kwargs: Mapping[str, object]) -> None:
    """Nothing before a hook call (pluggy's monitoring takes a pair)."""


class TrainerPluginManager(pluggy.PluginManager):
    """pluggy's manager plus where each plugin came from (distribution or "passed in").

    An exception raised inside a hook gets a note naming the plugin and the hook
    (``raised in plugin 'acme' (acme-plugin), hook on_train_batch_end``).
    """

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.origins: dict[str, str] = {}
        # Installed entry points that are not registered, with the reason (shown by
        # ``nnx-trainer-plugins``): disabled, autoload off, or an opt-in not configured.
        self.inactive: dict[str, str] = {}
        # pluggy's public per-call monitoring (what its enable_tracing uses) sees every hook
        # call's outcome; it adds a function call and a pluggy Result per hook call, and a
        # training step makes only a few hook calls.
        self.add_hookcall_monitoring(_before_hook_call, self._after_hook_call)

    def _after_hook_call(self, outcome: pluggy.Result, hook_name: str,
                         methods: Sequence[Any], kwargs: Mapping[str, object]) -> None:
        try:
            outcome.get_result()  # re-raises the hook call's exception, if any
        except Exception as exc:
            self._note_plugin(exc, hook_name, methods)

    def describe(self, name: str) -> str:
        """``'name' (distribution)`` or ``'name' (passed in)``: where a plugin came from."""
        return f"{name!r} ({self.origins.get(name, 'passed in')})"

    def _note_plugin(self, exc: Exception, hook_name: str, methods: Sequence[Any]) -> None:
        """Name the plugin whose hook implementation raised ``exc``, found in its traceback.

        The deepest frame that runs one of the hook's implementations is the raiser (a
        wrapper around it, or an outer hook call, is higher up); the innermost hook call
        notes it first, and outer ones leave it be.
        """
        if any(note.startswith(RAISED_IN) for note in getattr(exc, "__notes__", ())):
            return
        codes = {}
        for impl in methods:
            code = getattr(inspect.unwrap(getattr(impl.function, "__func__", impl.function)),
                           "__code__", None)
            if code is not None:
                codes[code] = impl
        raiser = None
        tb = exc.__traceback__
        while tb is not None:
            impl = codes.get(tb.tb_frame.f_code)
            if impl is not None and (raiser is None or not (impl.wrapper or impl.hookwrapper)):
                raiser = impl
            tb = tb.tb_next
        if raiser is not None:
            exc.add_note(f"{RAISED_IN} {self.describe(raiser.plugin_name)}, hook {hook_name}")


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
        _register(pm, plugin, name, "passed in")

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
            reason = missing_library(ep, exc)
            if reason is not None and name not in requested_names:
                pm.inactive[name] = reason  # listed with the extra to install; no crash
                continue
            raise PluginError(
                f"plugin {name!r} ({ep.value}) {reason}" if reason is not None else
                f"plugin {name!r} ({ep.value}) failed to load: {exc!r}; "
                f"disable it with disable=[{name!r}] or fix the installation"
            ) from exc
        if obj is None:  # an opt-in plugin nobody configured
            pm.inactive[name] = getattr(ep.load(), "activation", "off until configured")
            continue
        origin = ep.dist.name if ep.dist is not None else ep.value
        _register(pm, obj, name, f"entry point {name} = {ep.value} of distribution {origin}")
        pm.origins[name] = origin

    check_hook_names(pm)
    return pm


def call_each(pm: TrainerPluginManager, hook_name: str, **kwargs: Any) -> None:
    """Call every implementation of a hook even if some raise, then raise the first error.

    pluggy stops a hook call at the first exception; a teardown hook (``on_run_end``)
    must still reach every plugin. The order is pluggy's (the last registered first,
    ``tryfirst``/``trylast`` respected); later errors are logged as notes on the first.
    """
    first: Exception | None = None
    plugins = pm.get_plugins()
    for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):
        only_this = pm.subset_hook_caller(hook_name, plugins - {impl.plugin})
        try:
            only_this(**kwargs)
        except Exception as exc:  # the note names the plugin (see _after_hook_call)
            if first is None:
                first = exc
            else:
                first.add_note(f"also raised in {hook_name}: {exc!r} "
                               f"(plugin {pm.describe(impl.plugin_name)})")
    if first is not None:
        raise first


def _class_path(plugin: Any) -> str:
    """``module.Class`` of a plugin instance (a module's own name), not its repr."""
    if inspect.ismodule(plugin):
        return plugin.__name__
    cls = plugin if inspect.isclass(plugin) else type(plugin)
    return f"{cls.__module__}.{cls.__qualname__}"


def _register(pm: TrainerPluginManager, plugin: Any, name: str | None, where: str) -> None:
    """``pm.register``, with a hook that fails pluggy's checks named with ``where``."""
    try:
        pm.register(plugin, name=name)
    except pluggy.PluginValidationError as exc:
        label = repr(name) if name else _class_path(plugin)  # unnamed: pluggy uses id()
        raise PluginHookError(plugin, f"plugin {label} ({where}): {exc}") from exc


def check_hook_names(pm: TrainerPluginManager) -> None:
    """pluggy's ``check_pending`` with a message a user can act on: which plugin (entry
    point and distribution), which unknown hook, and the nearest real hook name."""
    known = sorted(n for n in vars(pm.hook) if not n.startswith("_")
                   and getattr(pm.hook, n).has_spec())
    for hook_name in sorted(vars(pm.hook)):
        caller = getattr(pm.hook, hook_name)
        if hook_name.startswith("_") or caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            if impl.optionalhook:
                continue
            name = impl.plugin_name
            entry = _entry_points().get(name) if name in pm.origins else None
            if entry is not None:
                plugin = (f"plugin {name!r} (entry point {name} = {entry.value} of "
                          f"distribution {pm.origins[name]})")
                fix = f"; or disable the plugin with disable_plugins=[{name!r}]"
            else:  # passed in; pluggy names an unnamed instance by its id()
                named = f"{name!r}, " if name != str(id(impl.plugin)) else ""
                plugin = f"plugin {named}passed in: {_class_path(impl.plugin)}"
                fix = ""
            near = difflib.get_close_matches(hook_name, known, n=1, cutoff=0.6)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise PluginHookError(
                impl.plugin,
                f"{plugin} implements {hook_name!r}, which is not an nnx_trainer hook; "
                f"{hint}Rename it, or mark an extra hook @hookimpl(optionalhook=True){fix}",
            )


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
