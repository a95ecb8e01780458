"""A bounded in-memory cache of task memories: least recently used first out, sized in bytes.

A memory is only a cache of its task's support set (rebuilt deterministically on a miss), so
eviction loses time, never data. Used from the event loop only, hence no lock.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

V = TypeVar("V")


class ByteLRU(Generic[V]):
    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0  # read by the metrics collector at scrape time
        self._entries: OrderedDict[str, tuple[V, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def peek(self, key: str) -> V | None:
        """The value without counting a hit or a miss or refreshing its place."""
        entry = self._entries.get(key)
        return entry[0] if entry is not None else None

    def put(self, key: str, value: V, nbytes: int) -> None:
        self.pop(key)
        if nbytes > self.budget:
            return  # would evict everything and still not fit: serve it uncached
        while self.nbytes + nbytes > self.budget:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.nbytes -= evicted
            self.evictions += 1
        self._entries[key] = (value, nbytes)
        self.nbytes += nbytes

    def pop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry[1]
