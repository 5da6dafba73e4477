"""Host memory: glibc's free pages go back to the OS (real RSS, in a subprocess),
importing nnx_trainer picks XLA's memory-frugal CPU schedule (real compiled programs), and
a build that compiled many one-off programs drops JAX's caches (real compilations)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from processes import clean_env

from nnx_trainer import host_memory
from nnx_trainer.host_memory import (
    CPU_SCHEDULE_FLAG,
    FUSION_EMITTERS_OPTION,
    MANY_STATE_ARRAYS,
    prefer_memory_frugal_cpu_schedule,
    release_free_host_memory,
    releasing_eager_build_memory,
    step_compiler_options,
)

PROBE = textwrap.dedent("""
    from pathlib import Path
    from nnx_trainer.host_memory import release_free_host_memory

    def rss_mib():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    # ~200 MiB of small heap blocks (below mmap's threshold), the last one kept so the
    # heap's top stays in use: only a trim of the whole heap can return the rest.
    blocks = [bytearray(4000) for _ in range(50_000)]
    pinned = blocks[-1]
    del blocks
    before = rss_mib()
    asked = release_free_host_memory()
    print(asked, before, rss_mib())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_free_heap_pages_go_back_to_the_os():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    asked, before, after = out[0] == "True", float(out[1]), float(out[2])
    assert asked
    assert before - after > 100, (before, after)


def test_calling_it_twice_is_harmless():
    release_free_host_memory()
    assert release_free_host_memory() in (True, False)


SCHEDULE_PROBE = textwrap.dedent("""
    import os
    import nnx_trainer  # first: it chooses XLA's CPU schedule before JAX starts
    import jax
    import jax.numpy as jnp

    def norm(y):  # batch norm's training-mode statistics, as in a ResNet
        mean = jnp.mean(y, axis=(0, 1, 2))
        return (y - mean) * jax.lax.rsqrt(jnp.var(y, axis=(0, 1, 2)) + 1e-5)

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def net(ws, x):
        for w1, w2 in ws:  # residual blocks
            x = jax.nn.relu(x + norm(conv(jax.nn.relu(norm(conv(x, w1))), w2)))
        return jnp.sum(x * x)

    ws = [(jnp.full((3, 3, 32, 32), 0.01), jnp.full((3, 3, 32, 32), 0.02))] * 4
    x = jnp.ones((8, 16, 16, 32))
    compiled = jax.jit(jax.grad(net)).lower(ws, x).compile()
    print(compiled.memory_analysis().temp_size_in_bytes, os.environ["XLA_FLAGS"])
""")


def _temp_bytes_and_flags(xla_flags: str | None) -> tuple[int, str]:
    env = clean_env()
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    out = subprocess.run([sys.executable, "-c", SCHEDULE_PROBE], capture_output=True,
                         text=True, check=True, timeout=300, env=env).stdout.split(maxsplit=1)
    return int(out[0]), out[1].strip()


def test_importing_nnx_trainer_picks_the_memory_frugal_cpu_schedule():
    frugal, flags = _temp_bytes_and_flags("--xla_force_host_platform_device_count=2")
    assert flags == f"--xla_force_host_platform_device_count=2 {CPU_SCHEDULE_FLAG}"
    # The user's explicit choice is kept: XLA's default breadth-first schedule.
    default_flag = "--xla_cpu_enable_concurrency_optimized_scheduler=true"
    concurrent, flags = _temp_bytes_and_flags(default_flag)
    assert flags == default_flag
    assert frugal < 0.8 * concurrent, (frugal, concurrent)  # 4.7 vs 6.8 MB on jaxlib 0.10.2


def test_the_schedule_flag_is_added_once_and_never_over_the_users():
    environ: dict[str, str] = {}
    assert prefer_memory_frugal_cpu_schedule(environ)
    assert environ == {"XLA_FLAGS": CPU_SCHEDULE_FLAG}
    assert not prefer_memory_frugal_cpu_schedule(environ)
    assert environ == {"XLA_FLAGS": CPU_SCHEDULE_FLAG}
    mine = {"XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=true"}
    assert not prefer_memory_frugal_cpu_schedule(mine)
    assert mine == {"XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=true"}


def test_each_finished_checkpoint_save_returns_its_buffers(tmp_path, monkeypatch):
    # The save's host copy is freed in Orbax's worker threads: trimmed once it is over.
    from tiny_task import TinyTask, make_trainer

    from nnx_trainer_plugins import checkpoint_writes
    from nnx_trainer_plugins.orbax_checkpoint import OrbaxCheckpoint

    trims: list[int] = []
    monkeypatch.setattr(checkpoint_writes, "release_free_host_memory",
                        lambda: trims.append(1) or True)
    checkpoint = OrbaxCheckpoint(every_n_steps=2, keep_last=5)
    make_trainer(tmp_path, checkpoint, max_steps=6).fit(TinyTask())
    assert checkpoint.saved_steps == [2, 4, 6]
    assert len(trims) == 3  # one per save, when its outcome was collected


_backend_compiles: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **kwargs: _backend_compiles.append(event)
    if event == "/jax/core/compile/backend_compile_duration" else None)


def _compiles_of_call(function, *args) -> int:
    start = len(_backend_compiles)
    jax.block_until_ready(function(*args))
    return len(_backend_compiles) - start


@pytest.mark.parametrize("many_programs, compiles_again", [(3, True), (1000, False)])
def test_a_build_that_compiled_many_programs_drops_the_caches(
        monkeypatch, many_programs, compiles_again):
    monkeypatch.setattr(host_memory, "MANY_PROGRAMS", many_programs)
    jitted_before = jax.jit(lambda x: x * 3 + 1)
    x = np.ones(5, np.float32)
    assert _compiles_of_call(jitted_before, x) == 1
    with releasing_eager_build_memory():
        for n in range(3):  # eager operations: one program per shape
            jnp.arange(n + 11, dtype=jnp.float32) * 2.5
    assert _compiles_of_call(jitted_before, x) == int(compiles_again)


@pytest.mark.parametrize("many_programs, compiles_again", [(1, True), (None, False)])
def test_the_trainer_drops_the_caches_only_after_a_big_build(
        tmp_path, monkeypatch, many_programs, compiles_again):
    # TinyTask's build compiles a few programs, far below MANY_PROGRAMS.
    from tiny_task import TinyTask, make_trainer

    if many_programs is not None:
        monkeypatch.setattr(host_memory, "MANY_PROGRAMS", many_programs)
    jitted_before = jax.jit(lambda x: x - 7)
    x = np.ones(3, np.float32)
    _compiles_of_call(jitted_before, x)
    make_trainer(tmp_path, max_steps=1).fit(TinyTask())
    assert _compiles_of_call(jitted_before, x) == int(compiles_again)


def test_large_float32_states_compile_without_the_fusion_emitters_on_cpu_alone(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", CPU_SCHEDULE_FLAG)
    off = {FUSION_EMITTERS_OPTION: False}
    assert step_compiler_options({"cpu"}) == off
    assert step_compiler_options({"cpu"}, jnp.dtype("float32"), MANY_STATE_ARRAYS) == off
    assert step_compiler_options({"cpu"}, jnp.dtype("float32"), MANY_STATE_ARRAYS - 1) == {}
    assert step_compiler_options({"cpu"}, jnp.float32) == off  # a type works as well
    assert step_compiler_options({"cpu"}, jnp.dtype("bfloat16")) == {}  # slower code there
    assert step_compiler_options({"gpu"}) == {}
    assert step_compiler_options({"cpu", "tpu"}) == {}
    for choice in ("true", "false"):  # the user's XLA_FLAGS decide, either way
        monkeypatch.setenv("XLA_FLAGS", f"--{FUSION_EMITTERS_OPTION}={choice}")
        assert step_compiler_options({"cpu"}) == {}


def test_an_option_the_installed_xla_does_not_know_is_left_out(monkeypatch):
    # A real compile with the option: jaxlib 0.10.2 knows it, and refuses a made-up one
    # (a later jaxlib that drops it must not fail every fit).
    host_memory._option_known.cache_clear()
    assert host_memory._option_known(FUSION_EMITTERS_OPTION)
    monkeypatch.setattr(host_memory, "FUSION_EMITTERS_OPTION", "xla_cpu_no_such_option")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert step_compiler_options({"cpu"}) == {}


def test_the_trainer_compiles_its_steps_with_those_options(tmp_path, monkeypatch):
    # An option XLA refuses, taken as known: the fit's first step fails on it, so the
    # Trainer's train step was compiled with step_compiler_options' answer.
    from tiny_task import TinyTask, make_trainer

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setattr(host_memory, "FUSION_EMITTERS_OPTION", "xla_cpu_no_such_option")
    monkeypatch.setattr(host_memory, "_option_known", lambda option: True)
    monkeypatch.setattr(host_memory, "MANY_STATE_ARRAYS", 1)  # TinyTask's state is small
    with pytest.raises(jax.errors.JaxRuntimeError, match="xla_cpu_no_such_option"):
        make_trainer(tmp_path, max_steps=1).fit(TinyTask())


@pytest.mark.parametrize("precision, many_arrays", [("bf16", 1), ("fp32", 10_000)])
def test_bfloat16_and_small_states_keep_the_fusion_emitters(
        tmp_path, monkeypatch, precision, many_arrays):
    # The same refused option: these fits never ask for it, so they train.
    from tiny_task import TinyTask, make_trainer

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setattr(host_memory, "FUSION_EMITTERS_OPTION", "xla_cpu_no_such_option")
    monkeypatch.setattr(host_memory, "_option_known", lambda option: True)
    monkeypatch.setattr(host_memory, "MANY_STATE_ARRAYS", many_arrays)
    trainer = make_trainer(tmp_path, max_steps=1, precision=precision).fit(TinyTask())
    assert trainer.global_step == 1
