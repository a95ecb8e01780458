"""The idle heap trim gives freed memory back to the OS (glibc only)."""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path

import pytest

from service import heap


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
