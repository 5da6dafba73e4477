"""Plugins whose library is not installed: fail at load, and name the extra to install.

A plugin that needs an optional library (tensorboardX, matplotlib) is installed with
the engine but only works with that library, which comes with an extra of its
distribution (``pip install nnx-trainer[tensorboard]``). When its entry point cannot
be imported for that reason, the plugin manager lists it as installed but not active
with the sentence :func:`missing_library` builds from the distribution's metadata,
instead of failing the run. A third-party plugin gets the same by declaring its
library under an extra named as the library's distribution, and either importing it
at module level or calling :func:`require_modules` there.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re


def require_modules(*names: str) -> None:
    """Raise ``ModuleNotFoundError`` now if a module a plugin imports later is missing.

    For a plugin module that imports its library lazily (on first use, to keep start-up
    fast): called at the plugin module's top level, it makes a missing library fail
    when the entry point loads, where the plugin manager reports the plugin as
    installed but not active and names the extra to install. Nothing is imported.
    """
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def _normalized(name: str) -> str:
    """A distribution or module name as PEP 503 compares them (``Scikit_Learn`` is
    ``scikit-learn``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_extras(dist: importlib.metadata.Distribution) -> list[tuple[str, str]]:
    """``(requirement name, extra)`` for each requirement of ``dist`` under an extra."""
    pairs = []
    for requirement in dist.requires or []:
        name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", requirement)
        if name and extra:
            pairs.append((name.group(1), extra.group(1)))
    return pairs


def missing_library(ep: importlib.metadata.EntryPoint, exc: BaseException) -> str | None:
    """Why an entry point is not active when its import failed for a missing library.

    ``needs `pip install DIST[EXTRA]` (no module named 'M')`` when the distribution
    declares an extra whose requirement is named like the missing module; ``needs the
    module 'M', which is not installed`` otherwise. None when the error is not a
    missing module, or when the missing module is the entry point's own package (a
    broken installation: still an error).
    """
    missing = getattr(exc, "name", None)
    if not isinstance(exc, ModuleNotFoundError) or not missing:
        return None
    top = missing.partition(".")[0]
    if top == re.split(r"[.:]", ep.value.strip(), maxsplit=1)[0]:
        return None
    if ep.dist is not None:
        for requirement, extra in _requirement_extras(ep.dist):
            if _normalized(requirement) == _normalized(top):
                return (f"needs `pip install {ep.dist.name}[{extra}]` "
                        f"(no module named {top!r})")
    return f"needs the module {top!r}, which is not installed"
