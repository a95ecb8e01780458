"""Give freed heap memory back to the operating system after a burst of work.

glibc's malloc keeps what a large batch or registration freed (the heap's high-water mark) and
reuses it; resident memory then reads as the largest burst so far, not as what the service holds,
which hides leaks and wastes a container's memory limit. `trim()` calls `malloc_trim(0)`, which
returns the free pages of every arena. The batcher calls it on the model thread once the queue has
been idle for `METANET_HEAP_TRIM_IDLE_S`. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Callable

log = logging.getLogger("service.heap")


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim with
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def available() -> bool:
    return _malloc_trim() is not None


def trim() -> bool:
    """Return free heap pages to the OS; True when some were."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False
