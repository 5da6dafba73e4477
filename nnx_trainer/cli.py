"""``nnx-trainer fit|validate|test|predict``: run a Task from YAML configs and dotted flags.

Built on jsonargparse, as Lightning's ``LightningCLI`` is: every option comes from a
signature and its docstring, never from a hand-kept list of flags.

- ``trainer.*``: the parameters of :class:`~nnx_trainer.Trainer` (``--trainer.max_epochs 90``).
- ``task.class_path``: the Task class (``--task pkg.mod.Class``, ``pkg.mod:Class`` or
  ``path/to/mod.py:Class``); ``task.*``: its constructor's parameters, or the fields of
  its dataclass ``config`` parameter (``--task.model resnet50`` for ResNetTask).
- ``plugins.<entry point>.*``: the constructor of that plugin (``--plugins.ema.decay 0.999``);
  a configured plugin is passed in ``Trainer(plugins=[...])`` and replaces the default
  registered under the same name. ``--plugins.ema EMA`` (or ``{}``) enables one with defaults.
- the subcommand's own parameters, from ``Trainer.fit`` etc. (``--ckpt_path last``).

``--config run.yaml`` (repeatable, later files win, flags win over files) and
``--print_config`` come from jsonargparse. ``fit`` saves the resolved config as
``run_dir/config.yaml`` once the fit has started (an earlier, different one is kept as
``config.N.yaml``: :mod:`nnx_trainer.config_file`); ``nnx-trainer fit --config
run_dir/config.yaml`` repeats the run and adding ``--ckpt_path last`` continues it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
from jsonargparse import ArgumentParser, Namespace

from nnx_trainer.cli_config import (
    CLIError,
    absolute_task_spec,
    add_task_arguments,
    build_task,
    check_keys,
    expand_task_config,
    load_task_class,
    plugin_classes,
    task_spec_from,
)
from nnx_trainer.config_file import ConfigFile
from nnx_trainer.plugin_manager import PluginError
from nnx_trainer.run_lock import RunDirInUse
from nnx_trainer.trainer import Trainer
from nnx_trainer.write_errors import RunDirWriteError

PROG = "nnx-trainer"
COMMANDS = {
    "fit": "Train the task (resume with --ckpt_path last).",
    "validate": "Evaluate on the task's validation data; print the metrics as JSON.",
    "test": "Evaluate on the task's test data; print the metrics as JSON.",
    "predict": "Run predict_step on the task's predict data; save run_dir/predictions.npz.",
}
# Trainer(plugins=...) is filled from the `plugins.*` section instead.
TRAINER_SKIP = {"plugins"}
PREDICTIONS_NAME = "predictions.npz"


def build_parser(command: str, task_cls: type | None,
                 plugins: dict[str, type]) -> ArgumentParser:
    """The parser of one subcommand: config files, trainer, task, plugins, method options."""
    parser = ArgumentParser(prog=f"{PROG} {command}", description=COMMANDS[command],
                            exit_on_error=False, allow_abbrev=False)
    parser.add_argument("--config", action="config",
                        help="a YAML config file (repeatable: later files override earlier "
                             "ones; flags override files, wherever they stand)")
    parser.add_class_arguments(Trainer, "trainer", skip=TRAINER_SKIP, fail_untyped=False)
    parser.add_argument("--task.class_path", type=str,
                        help="the Task class: pkg.mod.Class, pkg.mod:Class or path/mod.py:Class;"
                             " its options show with --help after --task")
    if task_cls is not None:
        add_task_arguments(parser, task_cls)
    for name, cls in sorted(plugins.items()):
        parser.add_argument(
            f"--plugins.{name}", type=Optional[cls], default=None,  # noqa: UP045 (runtime type)
            help=f"options of the {name!r} plugin ({cls.__module__}.{cls.__qualname__}); "
                 "unset: the default from the entry point, if it loads by itself",
        )
    parser.add_method_arguments(Trainer, command, skip={"task"}, fail_untyped=False)
    return parser


def _top_parser() -> argparse.ArgumentParser:
    # Only for `nnx-trainer --help` and a missing or unknown command: each command's
    # parser depends on the Task named after it, so it is built once that is known.
    parser = argparse.ArgumentParser(
        prog=PROG, description="Train and evaluate an nnx_trainer Task from configs and flags.",
        epilog=f"Run '{PROG} COMMAND --help' (add --task X for that Task's options). "
               f"'{PROG} export --help': a run's checkpoint to StableHLO or ONNX.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def _fail(prog: str, message: str) -> int:
    sys.stderr.write(f"{prog}: error: {message.strip()}\nSee '{prog} --help'.\n")
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``nnx-trainer``; returns the exit status (2 for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":  # not a Trainer method: its own parser
        return export_main(argv[1:])
    if not argv or argv[0] not in COMMANDS:
        try:
            _top_parser().parse_args(argv)
        except SystemExit as exc:
            return int(exc.code or 0)
        return 2
    command, args = argv[0], argv[1:]
    prog = f"{PROG} {command}"
    try:
        plugins = plugin_classes()
        args = _canonical(args)
        spec = task_spec_from(args)
        task_cls = load_task_class(spec) if spec else None
        if task_cls is not None:
            args = expand_task_config(args, task_cls)
        parser = build_parser(command, task_cls, plugins)
        if task_cls is None and not {"-h", "--help"} & set(args):
            raise CLIError("no Task given: pass --task pkg.module.Class (or task.class_path "
                           "in a --config file)")
        check_keys(args, set(parser.get_defaults().keys()), plugins)
        cfg = parser.parse_args(args)
        if cfg.get("task.class_path"):  # a file path: absolute, for the saved config
            cfg["task.class_path"] = absolute_task_spec(cfg["task.class_path"])
    except SystemExit as exc:  # --help, --print_config
        return int(exc.code or 0)
    except CLIError as exc:
        return _fail(prog, str(exc))
    except argparse.ArgumentError as exc:
        return _fail(prog, concise(str(exc)))
    return run(command, parser, cfg, task_cls, prog)


def export_main(argv: Sequence[str]) -> int:
    """``nnx-trainer export``: a run's checkpoint to a StableHLO or ONNX file
    (:mod:`nnx_trainer.export`), its Task and Trainer built from the run's config."""
    from nnx_trainer import export  # jax.export and ONNX: only for this subcommand

    prog = f"{PROG} export"
    parser = argparse.ArgumentParser(prog=prog, description=export.__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the file to write")
    parser.add_argument("--config", required=True, action="append",
                        help="the run's config.yaml (repeatable, as for fit)")
    parser.add_argument("--ckpt_path", default="best",
                        help="'best' (default), 'last' or a checkpoint directory")
    parser.add_argument("--format", choices=export.FORMATS, default="stablehlo")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="a fixed batch size (default: symbolic, any batch)")
    parser.add_argument("--input_key", default="image",
                        help="the key of the examples that is the model's input; several, "
                        "comma-separated, for a model of several inputs, in the order of its "
                        "__call__ (tokens,mask)")
    parser.add_argument("--input_dtype", default=None,
                        help="the input's dtype, e.g. int32 (default: the examples' if "
                        "float; else float32, or theirs where the model refuses floats); "
                        "one per --input_key, comma-separated")
    parser.add_argument("--platforms", default=None,
                        help="StableHLO: comma-separated platforms, e.g. cpu,cuda")
    # float32 by default, as Lightning exports a bf16-mixed model: onnxruntime's CPU
    # kernels refuse bfloat16 einsums and convolutions, and a server wants full precision.
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="the exported model's compute precision (default fp32, "
                        "whatever the run trained in; the weights are float32 either way)")
    args = parser.parse_args(argv)
    try:
        config_args = [a for path in args.config for a in ("--config", path)]
        spec = task_spec_from(config_args)
        if not spec:
            raise CLIError(f"{args.config}: no task.class_path in the config")
        task_cls = load_task_class(spec)
        command_parser = build_parser("predict", task_cls, plugin_classes())
        trainer, task = build_objects(command_parser.parse_args(
            [*config_args, "--trainer.precision", args.precision]), task_cls)
        path = export.export_run(
            trainer, task, args.out, ckpt_path=args.ckpt_path, format=args.format,
            batch_size=args.batch_size, input_key=args.input_key, input_dtype=args.input_dtype,
            platforms=args.platforms.split(",") if args.platforms else None)
    except (CLIError, FileNotFoundError, ValueError, ImportError) as exc:
        return _fail(prog, str(exc))
    print(f"{path} ({path.stat().st_size} bytes, {args.format})")
    return 0


def concise(message: str) -> str:
    """jsonargparse's type error in one line: the key, the expected types, the value."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    if not keys:
        return message
    inner = message[message.rindex("Parser key"):]  # the innermost (a plugin's own) key
    listed = re.search(r"Subtypes: \[(.*?)\]", inner)
    types = re.findall(r"<class '([\w.]+)'>", listed[1] if listed else inner.split("Got")[0])
    value = re.search(r"(?:Given|Got) value: (.*)", inner)
    if not types or not value or (len(keys) == 1 and "class_path" in inner):
        return message  # a class-typed option: the details are the useful part
    names = " or ".join(dict.fromkeys("None" if t == "NoneType" else t for t in types))
    return f"option {'.'.join(keys)!r}: expected {names}, got {value[1].strip()!r}"


def _canonical(args: list[str]) -> list[str]:
    """``--task X`` spelled as the key it sets, and every ``--config`` file moved first.

    jsonargparse applies arguments in order, so a file after a flag would override it;
    with the files first (in their order), later files override earlier ones and flags
    override files wherever they stand, as ``--help`` says.
    """
    args = ["--task.class_path" if a == "--task" else
            "--task.class_path=" + a[7:] if a.startswith("--task=") else a for a in args]
    files: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        if args[i] == "--config" and i + 1 < len(args):
            files += args[i:i + 2]
            i += 2
            continue
        (files if args[i].startswith("--config=") else rest).append(args[i])
        i += 1
    return files + rest


def build_objects(cfg: Namespace, task_cls: type) -> tuple[Trainer, Any]:
    """Plugins, then the Trainer, then the Task (which may load data): cheap checks first."""
    plugins = []
    section = cfg.get("plugins") or Namespace()
    for name in section.keys(branches=True, nested=False):
        spec = section[name]
        if spec is None:
            continue
        cls = load_object(spec.class_path)
        init_args = spec.get("init_args")
        try:
            plugins.append(cls(**(init_args.as_dict() if init_args else {})))
        except (TypeError, ValueError) as exc:
            raise CLIError(f"--plugins.{name}: {exc}") from exc
    try:
        trainer = Trainer(plugins=plugins, **cfg.trainer.as_dict())
    except (TypeError, ValueError, PluginError) as exc:
        raise CLIError(f"--trainer: {exc}") from exc
    try:
        task = build_task(task_cls, cfg.task.as_dict())
    except (TypeError, ValueError) as exc:
        raise CLIError(f"--task ({task_cls.__name__}): {exc}") from exc
    return trainer, task


def load_object(path: str) -> Any:
    """The object at a dotted import path, as jsonargparse writes ``class_path``."""
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def run(command: str, parser: ArgumentParser, cfg: Namespace, task_cls: type,
        prog: str = PROG) -> int:
    """Build the objects of a parsed config and run ``command`` on them."""
    method_kwargs = {k: cfg[k] for k in _method_keys(command) if k in cfg}
    ckpt_path = method_kwargs.get("ckpt_path")
    if ckpt_path not in (None, "last", "best", "auto") and not Path(ckpt_path).is_dir():
        return _fail(prog, f"--ckpt_path {ckpt_path!r}: not 'last', 'best', 'auto' or a directory")
    if command != "fit" and not ckpt_path and not method_kwargs.get("untrained"):
        # A fresh process has no fitted state: say so before data and model are built.
        return _fail(prog, f"{command} needs weights: pass --ckpt_path last (or best, or a "
                           "checkpoint directory), or --untrained true for the initial ones")
    try:
        trainer, task = build_objects(cfg, task_cls)
    except CLIError as exc:
        return _fail(prog, str(exc))
    if command == "fit":
        # Written once the fit has really started, never over another config: a start
        # that fails leaves the config of the run it meant to continue as it was.
        trainer.plugin_manager.register(
            ConfigFile(lambda run_dir: config_text(parser, cfg, run_dir)))
        try:
            trainer.fit(task, **method_kwargs)
        except RunDirInUse as exc:  # another live run: nothing was written
            return _fail(prog, str(exc))
        except Exception as exc:
            return _run_failed(prog, exc)
        return 0
    try:
        # The metrics printed below are the command's output (`> m.json`): progress bars,
        # tables and anything else printed while evaluating go to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            result = getattr(trainer, command)(task, **method_kwargs)
    except Exception as exc:  # e.g. no checkpoint, another model's
        return _run_failed(prog, exc)
    if command == "predict":
        path = Path(trainer.run_dir) / PREDICTIONS_NAME
        if trainer.is_main_process:
            arrays = save_predictions(result, path)
            shapes = {k: list(v.shape) for k, v in arrays.items()}
            print(json.dumps({"predictions": str(path), "arrays": shapes}))
        return 0
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def failure_status(exc: BaseException) -> int | None:
    """The exit status for an error a run reports in one line instead of a traceback.

    2 (the input must change): a ``ValueError`` or missing file, which the Trainer, the
    Task and the plugins raise for bad options, data or checkpoints, including those
    found only once the data is counted (a batch larger than the dataset, a batch that
    does not divide over the devices); and a non-finite loss at step 0, before any
    update, which only the data, the initial weights or the loss can cause. 1 (the
    training failed): a non-finite loss at a later step, or a file of the run that could
    not be written (``RunDirWriteError``: disk full, read-only). ``None``: anything else,
    left to raise with its traceback.
    """
    if isinstance(exc, RunDirWriteError):
        return 1
    if isinstance(exc, FloatingPointError):  # nonfinite_guard's NonFiniteLossError
        return 2 if getattr(exc, "step", None) == 0 else 1
    if isinstance(exc, (ValueError, FileNotFoundError)):
        return 2
    return None


def error_message(exc: BaseException) -> str:
    """The exception's message and its notes (e.g. which plugin raised it), one per line."""
    return "\n".join([str(exc).strip(), *getattr(exc, "__notes__", ())])


def _run_failed(prog: str, exc: Exception) -> int:
    status = failure_status(exc)
    if status is None:
        raise exc
    sys.stderr.write(f"{prog}: error: {error_message(exc)}\n")
    return status


def _method_keys(command: str) -> list[str]:
    params = inspect.signature(getattr(Trainer, command)).parameters
    return [n for n in params if n not in ("self", "task")]


def config_text(parser: ArgumentParser, cfg: Namespace, run_dir: Path) -> str:
    """The resolved config as YAML for ``--config``, as ``fit`` saves it (``config.yaml``).

    The run directory is written out (a default one is a timestamp, which a rerun would
    not find again), and ``ckpt_path`` is dropped: the file describes the run, and
    ``--ckpt_path last`` on top of it continues it.
    """
    cfg = cfg.clone()
    cfg["trainer.run_dir"] = str(run_dir)
    for key in _method_keys("fit"):
        if key in cfg:
            cfg[key] = None
            if key not in _method_keys("validate"):  # fit-only (init_from): other commands
                del cfg[key]                        # read this file too
    return parser.dump(cfg, skip_unset=False)


def save_predictions(outputs: Any, path: Path) -> dict[str, np.ndarray]:
    """Save a pytree of per-example arrays as ``.npz``; keys are the tree paths."""
    leaves = jax.tree_util.tree_flatten_with_path(outputs)[0]
    arrays = {(jax.tree_util.keystr(p, simple=True, separator="/") or "predictions"):
              np.asarray(x) for p, x in leaves}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


if __name__ == "__main__":
    sys.exit(main())
