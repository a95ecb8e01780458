"""The idle heap trim gives freed memory back to the OS (glibc only)."""

from __future__ import annotations

import ctypes
import platform
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from service.inference import heap


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trim_returns_freed_small_allocations_to_the_os() -> None:
    assert heap.available()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    # 64 MiB in 16 KiB blocks: below the mmap threshold, so they live on the heap, and free()
    # alone keeps the pages (the last block pins the top of the heap until it goes too).
    blocks = [libc.malloc(16 * 1024) for _ in range(4096)]
    for b in blocks:
        ctypes.memset(b, 1, 16 * 1024)
    pin = libc.malloc(16 * 1024)
    ctypes.memset(pin, 1, 16 * 1024)
    for b in blocks:
        libc.free(b)
    before = rss()
    assert heap.trim()
    after = rss()
    libc.free(pin)
    assert before - after > 32 * 2**20, (before, after)


_FORWARDS = """
import ctypes, resource, sys
from service.inference import heap
if sys.argv[1] == "retain":
    assert heap.retain(256)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = []
for _ in range(6):  # a "forward": four 20 MB buffers in use together, then all freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffers = [libc.malloc(20 << 20) for _ in range(4)]
    for b in buffers:
        ctypes.memset(b, 1, 20 << 20)
    for b in buffers:
        libc.free(b)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(max(faults[2:]))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_retain_keeps_a_forwards_buffers_for_the_next_one() -> None:
    """Under glibc's defaults the freed buffers of a forward go back to the OS, and every forward
    faults in 80 MB of fresh pages again; with `retain` the second forward on reuses them."""
    def faults(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", _FORWARDS, mode], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[3], timeout=120)
        assert run.returncode == 0, run.stderr
        return int(run.stdout)

    pages = (80 << 20) // resource.getpagesize()
    assert faults("default") > pages // 2
    assert faults("retain") < pages // 100
    assert not heap.retain(0)  # 0: glibc's defaults stay
