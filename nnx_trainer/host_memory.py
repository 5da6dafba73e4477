"""Give freed host memory back to the operating system after the big one-off allocations.

XLA:CPU compiles a ResNet-50 training step with a few hundred MiB of short-lived
allocations (LLVM's code generation), and building a model eagerly compiles one small
program per operation. glibc's allocator keeps that freed memory in its arenas, so the
process carries it through the whole run and the training step's own buffers come on
top (the figures, per phase: benchmarks/README.md, "Peak memory by phase").
``malloc_trim(0)`` returns every free page of every arena; it costs milliseconds and
changes no numbers. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

__all__ = ["release_free_host_memory"]


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
    buffers).
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
