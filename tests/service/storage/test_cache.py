"""The memory cache: least recently used out first, never over its byte budget."""

from __future__ import annotations

from service.storage.cache import ByteLRU


def test_least_recently_used_entries_are_evicted_to_stay_within_budget() -> None:
    cache: ByteLRU[str] = ByteLRU(budget=10)
    cache.put("a", "A", 4)
    cache.put("b", "B", 4)
    assert cache.get("a") == "A"  # a is now the most recent
    cache.put("c", "C", 4)
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.nbytes == 8 and cache.evictions == 1


def test_hits_and_misses_are_counted_and_peek_counts_nothing() -> None:
    cache: ByteLRU[str] = ByteLRU(budget=10)
    assert cache.get("a") is None
    cache.put("a", "A", 1)
    assert cache.get("a") == "A"
    assert cache.peek("a") == "A" and cache.peek("b") is None
    assert (cache.hits, cache.misses) == (1, 1)


def test_an_entry_larger_than_the_budget_is_not_cached_and_evicts_nothing() -> None:
    cache: ByteLRU[str] = ByteLRU(budget=10)
    cache.put("a", "A", 5)
    cache.put("huge", "H", 11)
    assert "huge" not in cache and "a" in cache and cache.nbytes == 5


def test_replacing_and_popping_keep_the_byte_count_right() -> None:
    cache: ByteLRU[str] = ByteLRU(budget=10)
    cache.put("a", "A", 5)
    cache.put("a", "A2", 3)
    assert cache.nbytes == 3 and cache.get("a") == "A2"
    cache.pop("a")
    cache.pop("missing")
    assert cache.nbytes == 0 and len(cache) == 0
