"""Keep a CPU training process's host memory down: XLA's memory-frugal schedule, and freed
memory given back to the operating system after the big one-off allocations.

**Schedule.** XLA:CPU orders a program's operations breadth-first by default ("optimized
for concurrency"), which keeps many intermediate buffers alive at once. Its depth-first
memory scheduler shrinks a ResNet training step's temporary buffers
(``memory_analysis()``) by an eighth to a half at the same step time (the figures and their command:
benchmarks/README.md, "XLA's CPU scheduler").
The flag is process-wide and read once, when JAX starts its CPU backend, so
:func:`prefer_memory_frugal_cpu_schedule` adds it to ``XLA_FLAGS`` when ``nnx_trainer``
is imported; per-compilation ``compiler_options`` were measured to leave the schedule
unchanged (jaxlib 0.10.2). Accelerator backends ignore it.

**Freed memory.** XLA:CPU compiles a ResNet-50 training step with a few hundred MiB of short-lived
allocations (LLVM's code generation), and building a model eagerly compiles one small
program per operation. glibc's allocator keeps that freed memory in its arenas, so the
process carries it through the whole run and the training step's own buffers come on
top (the figures, per phase: benchmarks/README.md, "Peak memory by phase").
``malloc_trim(0)`` returns every free page of every arena; it costs milliseconds and
changes no numbers. Elsewhere than glibc it does nothing.

**The compile's own peak.** XLA:CPU's fusion emitters keep every fused loop's LLVM
module until the last is emitted: compiling a ResNet-50 training step (~1,500 fusions)
takes ~550 MiB on top of what is live, the peak of its whole CPU fit at 64x64 inputs. Its
older per-fusion emitters take ~160 MiB, for up to ~5% of a float32 ResNet-50 step's speed
(their bfloat16 code is much slower; the figures: benchmarks/README.md, "XLA's fusion
emitters and the compile's peak"). :func:`step_compiler_options` asks for
them in the Trainer's own float32 steps of large states only (per program, through
``jax.jit(compiler_options=...)``), where the installed XLA knows the option and the
user's ``XLA_FLAGS`` has not chosen.

**One-off programs.** Each program XLA:CPU compiles stays resident while JAX's in-memory
caches hold it (over 1 MiB for even a one-operation program), and an eager model build
compiles one per initialiser and shape (ResNet-50 with its optimizer: 88, never run
again). :func:`releasing_eager_build_memory` drops JAX's in-memory
compilation caches after a build that compiled at least :data:`MANY_PROGRAMS`: the
process-wide cost is that functions jitted before it compile again at their next call
(the persistent compilation cache, where enabled, keeps them). Smaller builds (the
example's, a test's) keep the caches, where recompiling would cost more than it frees.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import sys
from collections.abc import Iterator, MutableMapping
from typing import Any

__all__ = ["CPU_SCHEDULE_FLAG", "FUSION_EMITTERS_OPTION", "MANY_PROGRAMS", "MANY_STATE_ARRAYS",
           "prefer_memory_frugal_cpu_schedule", "release_free_host_memory",
           "releasing_eager_build_memory", "step_compiler_options"]

#: The ``XLA_FLAGS`` entry that selects XLA:CPU's depth-first memory scheduler.
CPU_SCHEDULE_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"

#: XLA's debug option that selects its fusion emitters (true by default in jaxlib 0.10.2).
FUSION_EMITTERS_OPTION = "xla_cpu_use_fusion_emitters"

#: Training-state arrays from which :func:`step_compiler_options` picks the per-fusion
#: emitters (ResNet-50 with SGD's momentum: 430; ResNet-18: 166).
MANY_STATE_ARRAYS = 300

#: Programs compiled during an eager build from which :func:`releasing_eager_build_memory`
#: drops JAX's in-memory caches (the example's model and optimizer compile 46, ResNet-50's 88).
MANY_PROGRAMS = 64

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = 0  # backend compilations seen by _count_compile since it was registered


def prefer_memory_frugal_cpu_schedule(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Add :data:`CPU_SCHEDULE_FLAG` to ``XLA_FLAGS``; True when it was added.

    Left alone when ``XLA_FLAGS`` already sets that option (either way: the user's
    choice; ``--xla_cpu_enable_concurrency_optimized_scheduler=true`` restores XLA's
    default). Effective only when it runs before JAX's first computation starts the CPU
    backend, which importing ``nnx_trainer`` first ensures; child processes inherit it.
    """
    flags = environ.get("XLA_FLAGS", "")
    if "xla_cpu_enable_concurrency_optimized_scheduler" in flags:
        return False
    environ["XLA_FLAGS"] = f"{flags} {CPU_SCHEDULE_FLAG}".strip()
    return True


def step_compiler_options(platforms: set[str], compute_dtype: Any = "float32",
                          state_arrays: int = MANY_STATE_ARRAYS) -> dict[str, Any]:
    """``compiler_options`` for the Trainer's jitted steps on devices of ``platforms``,
    computing in ``compute_dtype`` (the Trainer's precision), for a training state of
    ``state_arrays`` arrays.

    XLA's per-fusion emitters (:data:`FUSION_EMITTERS_OPTION` false) on a CPU, in float32,
    for a state of at least :data:`MANY_STATE_ARRAYS` arrays: the fusion emitters' share
    of a compile grows with the step's fusions, about three per state array (ResNet-50's
    430 arrays: ~1,500 fusions, ~410 MiB), and the older emitters cut it to ~25%. Below
    that the share is small and their code's speed counts more (at ResNet-18, 166
    arrays, their steps measured 0.92-1.04x the fusion emitters' speed); in bfloat16
    their code measured ~1.45x the CPU time. Empty elsewhere, where ``XLA_FLAGS`` names
    the option (the user's choice, either way), and where the installed XLA does not know
    it (a later jaxlib may drop it; an unknown option fails the compile).
    """
    import jax.numpy as jnp  # not at module level: see _compile_counter_registered

    if (platforms != {"cpu"} or jnp.dtype(compute_dtype) != jnp.float32
            or state_arrays < MANY_STATE_ARRAYS
            or FUSION_EMITTERS_OPTION in os.environ.get("XLA_FLAGS", "")):
        return {}
    return {FUSION_EMITTERS_OPTION: False} if _option_known(FUSION_EMITTERS_OPTION) else {}


@functools.cache
def _option_known(option: str) -> bool:
    """Whether the CPU backend compiles a one-operation program with ``option`` set false."""
    import jax

    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    probe = jax.jit(lambda x: x + 1, compiler_options={option: False})
    try:
        probe.lower(jax.ShapeDtypeStruct((), "float32", sharding=cpu)).compile()
    except jax.errors.JaxRuntimeError:  # "INVALID_ARGUMENT: No such compile option"
        return False
    return True


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim  # glibc only: musl and others have no such symbol
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_host_memory() -> bool:
    """Return the allocator's free pages to the OS; True when something could be asked.

    Safe to call at any time (it frees nothing that is in use); called by the Trainer
    after it builds the model, after it compiles the training step, and before each
    checkpoint save (whose host copies would otherwise come on top of the steps' freed
    buffers), and by the checkpoint plugin once each save is over (what its write
    threads freed).
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def _count_compile(event: str, duration_secs: float, **kwargs: Any) -> None:
    global _compiles
    if event == _BACKEND_COMPILE_EVENT:
        _compiles += 1


@functools.cache
def _compile_counter_registered() -> bool:
    import jax  # not at module level: nnx_trainer sets XLA_FLAGS from here before importing jax

    # jax.monitoring has no public way to remove a listener: register once per process.
    jax.monitoring.register_event_duration_secs_listener(_count_compile)
    return True


@contextlib.contextmanager
def releasing_eager_build_memory() -> Iterator[None]:
    """Around an eager model (and optimizer) build: afterwards, drop JAX's in-memory
    compilation caches when the build compiled at least :data:`MANY_PROGRAMS` programs,
    then return the freed memory to the OS.

    Not on an exception: a failed build changes nothing.
    """
    import jax

    _compile_counter_registered()
    start = _compiles
    yield
    if _compiles - start >= MANY_PROGRAMS:
        jax.clear_caches()
    release_free_host_memory()
