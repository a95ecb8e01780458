"""Who is asking and how often: bearer API keys (one tenant each) and per-tenant token buckets.

A key is never stored or logged: a tenant is known by `owner`, a hash of its key, which is also
what the task store files its tasks under.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass


def owner_of(key: str) -> str:
    """The stable, non-reversible name of the tenant holding `key` (the store's owner column)."""
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class KeyRing:
    """The configured keys, checked in constant time.

    The presented token is hashed first, so every comparison is between equal-length digests, and
    it is compared with every key, without stopping at a match: neither how much of a key matched
    nor which key it was shows in the time taken.
    """

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [(hashlib.sha256(k.encode()).digest(), owner_of(k)) for k in dict.fromkeys(keys)]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def owner(self, authorization: str | None) -> str | None:
        """The owner of the key in an `Authorization: Bearer <key>` header, or None."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        presented = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for digest, owner in self._digests:
            if hmac.compare_digest(presented, digest):
                found = owner
        return found


@dataclass
class _Bucket:
    tokens: float
    at: float  # when `tokens` was last brought up to date


class RateLimiter:
    """One token bucket per client: `rate` tokens a second, at most `burst` saved up.

    `take(client)` returns 0 when the request may go ahead, else the seconds until a token will be
    there (the Retry-After). Used from the event loop only, hence no lock. A full bucket is the
    same as none, so full ones are dropped now and then: per-address buckets cannot pile up.
    """

    _PRUNE_ABOVE = 10_000

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, client: str) -> float:
        if not self.enabled:
            return 0.0
        now = self._clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self._PRUNE_ABOVE:
                self._prune(now)
            bucket = self._buckets[client] = _Bucket(float(self.burst), now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self.rate

    def _prune(self, now: float) -> None:
        self._buckets = {
            client: b for client, b in self._buckets.items()
            if b.tokens + (now - b.at) * self.rate < self.burst
        }


def retry_after(seconds: float) -> str:
    """A Retry-After value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))
