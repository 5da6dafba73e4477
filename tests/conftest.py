"""Suite-wide isolation: only this project's own plugins take part in the tests.

A third-party nnx_trainer plugin installed in the same environment would otherwise
load into every Trainer here (as pytest plugins load into pytest) and its hooks would
run inside these tests. Each one is blocked through ``NNX_TRAINER_PLUGINS=no:NAME``,
which subprocesses inherit too. Plugins the tests install themselves come later and
are not affected.

The tests share their helpers through modules beside this file, never by importing another
test file: ``tiny_task`` (the tiny Tasks, :func:`~tiny_task.make_trainer`, the one factory of
the tests' Trainers, and ``CrashAfter``), ``hook_recorder`` (:class:`HookRecorder`, the one
recorder of hook calls: ``getcalls("log_metrics")``), ``fake_clock`` (:class:`FakeClock`, the
one fake clock, for plugins' ``clock`` arguments and Orbax's save decisions), ``fake_cifar``
(CIFAR trees on disk), ``processes`` (environments and ports for test subprocesses) and
``wine_snippet`` (runs a documented example).
"""

from __future__ import annotations

import importlib.metadata
import os
import tempfile

from nnx_trainer.plugin_manager import ENTRY_POINT_GROUP, PLUGINS_ENV

OWN_DISTRIBUTION = "nnx-trainer"


def _foreign_plugin_names() -> list[str]:
    names = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else ""
        if dist.replace("_", "-").lower() != OWN_DISTRIBUTION:
            names.append(ep.name)
    return sorted(names)


def pytest_configure(config) -> None:
    # JAX's compilation cache (on by default) goes to a directory of this session, not
    # the user's ~/.cache; subprocesses inherit it.
    os.environ.setdefault("NNX_TRAINER_COMPILATION_CACHE",
                          tempfile.mkdtemp(prefix="nnx-trainer-test-jax-cache-"))
    blocked = [f"no:{name}" for name in _foreign_plugin_names()]
    if blocked:
        existing = [x for x in os.environ.get(PLUGINS_ENV, "").split(",") if x]
        os.environ[PLUGINS_ENV] = ",".join([*existing, *blocked])
