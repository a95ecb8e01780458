"""API keys (constant-time lookup, never echoed), the keys file, and the per-key token bucket."""

from __future__ import annotations

import asyncio
import multiprocessing
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from service.http.tenants import KeyRing, RateLimiter, SharedBuckets, owner_of, retry_after
from service.process.app import create_app
from service.settings import Settings


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_bearer_key_maps_to_its_owner_hash_and_anything_else_to_none() -> None:
    ring = KeyRing(["alice-key", "bob-key"])
    assert ring.owner("Bearer alice-key") == owner_of("alice-key")
    assert ring.owner("bearer bob-key") == owner_of("bob-key")  # the scheme is case-insensitive
    assert owner_of("alice-key") != owner_of("bob-key")
    assert "alice-key" not in owner_of("alice-key")
    for header in (None, "", "Bearer", "Bearer ", "Basic alice-key", "alice-key", "Bearer alice-ke",
                   "Bearer alice-key2", "Bearer ALICE-KEY"):
        assert ring.owner(header) is None, header


def test_the_key_lookup_compares_with_every_key_even_after_a_match(monkeypatch) -> None:
    calls = []
    import service.http.tenants as tenants

    real = tenants.hmac.compare_digest
    monkeypatch.setattr(tenants.hmac, "compare_digest", lambda a, b: calls.append(len(b)) or real(a, b))
    ring = KeyRing(["k1", "k2", "k3"])
    for header in ("Bearer k1", "Bearer k3", "Bearer nope"):
        calls.clear()
        ring.owner(header)
        assert calls == [32, 32, 32]  # one equal-length digest comparison per key, whatever the outcome


def test_an_empty_key_ring_is_falsy() -> None:
    assert not KeyRing([])
    assert KeyRing(["k"])


def test_keys_come_from_the_environment_and_a_keys_file(tmp_path: Path, monkeypatch) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# tenants\ncarol-key\n\n  dave-key   # the second\nalice-key\n")
    monkeypatch.setenv("METANET_API_KEYS", "alice-key,bob-key")
    monkeypatch.setenv("METANET_API_KEYS_FILE", str(keys_file))
    assert Settings().api_keys == ("alice-key", "bob-key", "carol-key", "dave-key")


def test_a_missing_keys_file_is_a_settings_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="cannot read the API keys file .*nowhere"):
        Settings(api_keys_file=tmp_path / "nowhere")


def test_a_malformed_key_is_refused_without_echoing_any_key() -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(api_keys=("good-secret-1", "bad secret 2"))
    assert "secret" not in str(caught.value)


def test_the_bucket_allows_a_burst_then_refills_at_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.take("a") for _ in range(3)] == [0, 0, 0]
    assert limiter.take("a") == pytest.approx(0.5)  # one token comes back after 1 / rate seconds
    clock.now += 0.25
    assert limiter.take("a") == pytest.approx(0.25)
    clock.now += 0.25
    assert limiter.take("a") == 0
    clock.now += 100  # a long pause saves up no more than the burst
    assert [limiter.take("a") for _ in range(4)][-1] > 0


def test_each_client_has_its_own_bucket() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=1.0, burst=1, clock=clock)
    assert limiter.take("alice") == 0
    assert limiter.take("alice") > 0
    assert limiter.take("bob") == 0


def test_a_zero_rate_turns_the_limiter_off() -> None:
    limiter = RateLimiter(rate=0.0, burst=1)
    assert not limiter.enabled
    assert all(limiter.take("a") == 0 for _ in range(1000))


def test_full_buckets_are_pruned_so_per_address_buckets_cannot_pile_up(monkeypatch) -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=1.0, burst=2, clock=clock)
    monkeypatch.setattr(RateLimiter, "_PRUNE_ABOVE", 10)
    for i in range(10):
        limiter.take(f"10.0.0.{i}")
    clock.now += 10  # every bucket is full again
    limiter.take("10.0.1.1")
    assert len(limiter._buckets) == 1


@pytest.mark.parametrize(("seconds", "header"), [(0.01, "1"), (1.0, "1"), (1.2, "2"), (30.0, "30")])
def test_retry_after_is_whole_seconds_rounded_up(seconds: float, header: str) -> None:
    assert retry_after(seconds) == header


def test_without_keys_the_bucket_is_per_client_address(tmp_path: Path) -> None:
    """/v1 is limited before anything else is looked at (here the model never loads: 503)."""
    app = create_app(Settings(data_dir=tmp_path, rate_limit_per_s=0.001, rate_limit_burst=2))

    async def statuses(client_address: str) -> list[int]:
        transport = httpx.ASGITransport(app, client=(client_address, 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return [(await client.get("/v1/model")).status_code for _ in range(3)]

    assert asyncio.run(statuses("10.0.0.1")) == [503, 503, 429]
    assert asyncio.run(statuses("10.0.0.2")) == [503, 503, 429]


def _take_in_another_process(buckets: SharedBuckets, takes: list[tuple[str, int]], out) -> None:
    limiter = RateLimiter(rate=0.001, burst=5, shared=buckets)
    out.put([[limiter.take(client) for _ in range(n)] for client, n in takes])


def test_shared_buckets_are_one_limit_for_every_process() -> None:
    ctx = multiprocessing.get_context("spawn")
    buckets = SharedBuckets.create()
    try:
        here = RateLimiter(rate=0.001, burst=5, shared=buckets)  # the real clock: one for both
        assert [here.take("alice") for _ in range(3)] == [0, 0, 0]
        out = ctx.Queue()
        other = ctx.Process(target=_take_in_another_process, args=(buckets, [("alice", 4), ("bob", 1)], out))
        other.start()
        there, bob = out.get(timeout=60)
        other.join(60)
        assert other.exitcode == 0
        # alice had 2 tokens left: the other process got them, then waits; bob has his own bucket
        assert there[:2] == [0, 0] and all(wait > 0 for wait in there[2:]), there
        assert bob == [0]
        assert here.take("alice") > 0
    finally:
        buckets.close(unlink=True)


def test_a_shared_bucket_refills_at_the_rate_and_saves_no_more_than_the_burst() -> None:
    buckets = SharedBuckets.create()
    try:
        clock = FakeClock()
        limiter = RateLimiter(rate=2.0, burst=3, clock=clock, shared=buckets)
        assert [limiter.take("a") for _ in range(3)] == [0, 0, 0]
        assert limiter.take("a") == pytest.approx(0.5)
        clock.now += 0.5
        assert limiter.take("a") == 0
        clock.now += 100
        assert [limiter.take("a") for _ in range(4)] == [0, 0, 0, pytest.approx(0.5)]
    finally:
        buckets.close(unlink=True)
