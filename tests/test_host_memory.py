"""release_free_host_memory gives glibc's free pages back to the OS (real RSS, in a subprocess)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from nnx_trainer.host_memory import release_free_host_memory

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
