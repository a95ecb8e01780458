"""Give freed heap memory back to the operating system after a burst of work.

glibc's malloc keeps what a large batch or registration freed (the heap's high-water mark) and
reuses it; resident memory then reads as the largest burst so far, not as what the service holds,
which hides leaks and wastes a container's memory limit. `trim()` calls `malloc_trim(0)`, which
returns the free pages of every arena. The batcher calls it on the model thread once the queue has
been idle for `METANET_HEAP_TRIM_IDLE_S`. Elsewhere than glibc it does nothing.

Under load the opposite holds: a forward's large buffers (a 32-image batch allocates tens of MB:
im2col columns, per-query fast weights) must not go back to the OS after every call, or each
forward pays for fresh zeroed pages again. `retain(mb)` has glibc serve allocations of up to 32 MB
from the heap (M_MMAP_THRESHOLD) and keep up to `mb` MB of freed heap (M_TRIM_THRESHOLD) until the
idle `trim()`. Setting them also turns off glibc's own threshold adjustment, which adapts to some
allocation orders and not others. Both are needed: the mmap threshold alone still returns the
heap's top after each forward, and the trim threshold alone leaves every allocation over 128 KB
to mmap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Callable

log = logging.getLogger("service.inference.heap")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    fn = getattr(_libc(), "malloc_trim", None)  # not glibc (musl, macOS): nothing to trim with
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit


@functools.cache
def _mallopt() -> Callable[[int, int], int] | None:
    fn = getattr(_libc(), "mallopt", None)
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def retain(mb: int) -> bool:
    """Keep up to `mb` MB of freed heap between calls (see above); False where it cannot."""
    fn = _mallopt()
    if fn is None or mb <= 0:
        return False
    ok = bool(fn(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(fn(_M_TRIM_THRESHOLD, mb << 20))
    if not ok:
        log.warning("mallopt refused the heap thresholds; glibc's defaults stay")
    return ok


def available() -> bool:
    return _malloc_trim() is not None


def trim() -> bool:
    """Return free heap pages to the OS; True when some were."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False
