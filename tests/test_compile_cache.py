"""JAX's persistent compilation cache: on by default in a user directory, off or moved."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

_RUN = """
import json, sys
sys.path.insert(0, {tests!r})
import jax
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # tiny steps compile fast
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
import nnx_trainer
from tiny_task import TinyTask
kwargs = json.loads(sys.argv[1])
trainer = nnx_trainer.Trainer(max_steps=2, batch_size=8, plugin_autoload=False,
                              run_dir=sys.argv[2], **kwargs)
trainer.fit(TinyTask(n_train=32))
print(json.dumps({{"dir": trainer.compilation_cache_dir, "hits": len(hits),
                  "config": jax.config.jax_compilation_cache_dir}}))
"""


def _fit(tmp_path: Path, name: str, env_value: str | None, **kwargs) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.pop("NNX_TRAINER_COMPILATION_CACHE", None)
    env["JAX_PLATFORMS"] = "cpu"
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")  # the default directory, kept in tmp
    if env_value is not None:
        env["NNX_TRAINER_COMPILATION_CACHE"] = env_value
    proc = subprocess.run(
        [sys.executable, "-c", _RUN.format(tests=str(TESTS)), json.dumps(kwargs),
         str(tmp_path / name)], env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_second_run_loads_compiled_steps_from_the_default_user_cache(tmp_path):
    default = tmp_path / "xdg" / "nnx_trainer" / "jax"
    first = _fit(tmp_path, "a", None)
    assert first["dir"] == first["config"] == str(default)
    assert any(default.iterdir())  # the compiled steps were written
    second = _fit(tmp_path, "b", None)
    assert second["hits"] > 0 and second["hits"] >= first["hits"]


def test_the_cache_can_be_moved_or_turned_off(tmp_path):
    moved = _fit(tmp_path, "a", None, compilation_cache=str(tmp_path / "mine"))
    assert moved["dir"] == str(tmp_path / "mine") and any((tmp_path / "mine").iterdir())
    off = _fit(tmp_path, "b", "off")
    assert off["dir"] is None and off["config"] is None and off["hits"] == 0
    assert not (tmp_path / "xdg").exists()
    by_env = _fit(tmp_path, "c", str(tmp_path / "env-dir"))
    assert by_env["dir"] == str(tmp_path / "env-dir")
    explicit_off = _fit(tmp_path, "d", None, compilation_cache=False)
    assert explicit_off["dir"] is None
