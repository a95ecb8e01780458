"""Who is asking and how often: bearer API keys (one tenant each) and per-tenant token buckets.

A key is never stored or logged: a tenant is known by `owner`, a hash of its key, which is also
what the task store files its tasks under.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import math
import mmap
import os
import struct
import tempfile
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

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 shared: SharedBuckets | None = None) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._shared = shared  # the buckets of every server process of a supervisor, when set

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, client: str) -> float:
        if not self.enabled:
            return 0.0
        now = self._clock()
        if self._shared is not None:
            return self._shared.take(client, self.rate, self.burst, now)
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


class SharedBuckets:
    """Token buckets in a table of shared memory, for the server processes of one supervisor
    (service/process/supervisor.py), so a client's rate is one, whichever process its requests reach.

    A client's bucket is the slot its name hashes to (a stable hash: every process finds the same
    slot). Two clients in one slot would share a bucket; with 65,536 slots that is rare, and errs
    on the strict side. Each slot holds (tokens, when, used); an unused slot is a full bucket. The
    table is a file (in the system's temp directory) that every process maps, updated under an
    exclusive flock on it: the kernel releases that lock when its holder dies, so a process killed
    mid-update cannot leave the others waiting. A take is a few microseconds.
    """

    SLOTS = 1 << 16
    _SLOT = struct.Struct("ddd")

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "r+b")  # noqa: SIM115 - held open for the lock, closed in close()
        self._map = mmap.mmap(self._file.fileno(), self.SLOTS * self._SLOT.size)

    @classmethod
    def create(cls) -> SharedBuckets:
        """A new table of full buckets (in the supervisor, before the processes start)."""
        fd, path = tempfile.mkstemp(prefix="metanet-buckets-")
        with os.fdopen(fd, "wb") as f:
            f.truncate(cls.SLOTS * cls._SLOT.size)  # zeros: every slot unused
        return cls(path)

    def __getstate__(self) -> str:  # handed to a spawned process: it opens and maps the file
        return self.path

    def __setstate__(self, path: str) -> None:
        self.__init__(path)  # type: ignore[misc]

    def take(self, client: str, rate: float, burst: int, now: float) -> float:
        """As RateLimiter.take; `now` is time.monotonic(), one clock for every process."""
        slot = int.from_bytes(hashlib.blake2b(client.encode(), digest_size=8).digest(), "little")
        offset = (slot % self.SLOTS) * self._SLOT.size
        fcntl.flock(self._file, fcntl.LOCK_EX)
        try:
            tokens, at, used = self._SLOT.unpack_from(self._map, offset)
            if not used:
                tokens, at = float(burst), now
            # Another process may have read its clock just after ours: time never runs backwards.
            tokens = min(burst, tokens + max(0.0, now - at) * rate)
            wait = 0.0
            if tokens >= 1:
                tokens -= 1
            else:
                wait = (1 - tokens) / rate
            self._SLOT.pack_into(self._map, offset, tokens, max(now, at), 1.0)
        finally:
            fcntl.flock(self._file, fcntl.LOCK_UN)
        return wait

    def close(self, unlink: bool = False) -> None:
        self._map.close()
        self._file.close()
        if unlink:
            os.unlink(self.path)


def retry_after(seconds: float) -> str:
    """A Retry-After value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))
