"""JAX's persistent compilation cache, on by default, so a rerun skips most compilation.

JAX keeps compiled executables on disk when ``jax_compilation_cache_dir`` is set; the
second run of the same configuration then loads them instead of compiling (XLA:CPU
compiles a ResNet step in tens of seconds). The Trainer turns that on in a user cache
directory unless the user chose otherwise:

* ``Trainer(compilation_cache=...)``: ``True`` (the default directory), ``False`` (leave
  JAX as it is), or a directory;
* else ``NNX_TRAINER_COMPILATION_CACHE``: a directory, or ``0``/``off``/``false``;
* else ``$XDG_CACHE_HOME/nnx_trainer/jax`` (``~/.cache/nnx_trainer/jax``).

A cache directory the user already gave JAX (``JAX_COMPILATION_CACHE_DIR`` or
``jax.config.update``) is kept. JAX's own thresholds stay: only compilations over one
second are written.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

CACHE_ENV = "NNX_TRAINER_COMPILATION_CACHE"
_OFF = ("0", "off", "false", "no")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/nnx_trainer/jax``, or ``~/.cache/nnx_trainer/jax``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nnx_trainer" / "jax"


def enable_compilation_cache(setting: bool | str | os.PathLike | None = None) -> str | None:
    """Point JAX's persistent cache at the chosen directory; the directory in use, or None."""
    if setting is None:
        env = os.environ.get(CACHE_ENV)
        if env is not None and env.strip().lower() in _OFF:
            setting = False
        else:
            setting = env or True
    if setting is False:
        return jax.config.jax_compilation_cache_dir or None
    if jax.config.jax_compilation_cache_dir:  # the user's own choice wins
        return jax.config.jax_compilation_cache_dir
    directory = default_cache_dir() if setting is True else Path(setting).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(
            f"compilation cache directory '{directory}' cannot be created ({e}); pass "
            f"compilation_cache=False or set {CACHE_ENV} to a writable directory or 'off'"
        ) from e
    jax.config.update("jax_compilation_cache_dir", str(directory))
    return str(directory)
