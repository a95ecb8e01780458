"""Retries after 429 and 503 (`retries`, `max_retry_wait`): the wait the server asks for, the
requests that may be resent, and when the client gives up. Sleeps are recorded, never slept."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from metanet_client import (
    APIConnectionError,
    AsyncMetaNetClient,
    MetaNetAPIError,
    MetaNetClient,
    NotReady,
    Overloaded,
    RateLimited,
    TooManyRequests,
)

from .test_client import PIXELS, FakeService, error


class Refusing(FakeService):
    """Refuses the first `refusals` requests with the given answer, then answers as the service."""

    def __init__(self, *refusals: httpx.Response) -> None:
        super().__init__()
        self.refusals = list(refusals)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.refusals:
            self.requests.append(request)
            return self.refusals.pop(0)
        return super().__call__(request)


def busy(retry_after: str | None = "1", error_type: str = "overloaded") -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else None
    return error(429, error_type, "try later", headers=headers)


def not_ready(retry_after: str | None = "1") -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else None
    return error(503, "not_ready", "loading", headers=headers)


@pytest.fixture
def slept(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """Every wait either client asked for, in order."""
    waits: list[float] = []

    async def async_sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr("metanet_client._client.time.sleep", waits.append)
    monkeypatch.setattr("metanet_client._client.anyio.sleep", async_sleep)
    yield waits


def sync_call(fake: Callable, method: str, *args: Any, **options: Any) -> Any:
    with MetaNetClient("http://metanet.test", transport=httpx.MockTransport(fake), **options) as client:
        return getattr(client, method)(*args)


def async_call(fake: Callable, method: str, *args: Any, **options: Any) -> Any:
    async def run() -> Any:
        transport = httpx.MockTransport(fake)
        async with AsyncMetaNetClient("http://metanet.test", transport=transport, **options) as client:
            return await getattr(client, method)(*args)

    return asyncio.run(run())


@pytest.fixture(params=["sync", "async"])
def call(request: pytest.FixtureRequest) -> Callable[..., Any]:
    return sync_call if request.param == "sync" else async_call


def test_a_429_with_retry_after_is_waited_out_and_retried(call: Callable, slept: list[float]) -> None:
    fake = Refusing(busy("1"))
    assert call(fake, "get_task", "t1", retries=1).task_id == "t1"
    assert len(fake.requests) == 2
    assert len(slept) == 1 and 1.0 <= slept[0] <= 1.1  # Retry-After plus at most 10% jitter


def test_without_retries_the_429_raises_at_once(call: Callable, slept: list[float]) -> None:
    fake = Refusing(busy("1"))
    with pytest.raises(Overloaded) as caught:
        call(fake, "get_task", "t1")
    assert caught.value.retry_after == 1.0 and len(fake.requests) == 1 and slept == []


def test_retries_are_bounded_and_the_last_refusal_raises(call: Callable, slept: list[float]) -> None:
    fake = Refusing(*(busy("2", "rate_limited") for _ in range(4)))
    with pytest.raises(RateLimited):
        call(fake, "list_tasks", retries=2)
    assert len(fake.requests) == 3 and len(slept) == 2 and all(2.0 <= s <= 2.2 for s in slept)


def test_a_retry_after_above_max_retry_wait_raises_without_sleeping(call: Callable,
                                                                    slept: list[float]) -> None:
    fake = Refusing(busy("120"))
    with pytest.raises(Overloaded) as caught:
        call(fake, "get_task", "t1", retries=3, max_retry_wait=30)
    assert caught.value.retry_after == 120.0 and len(fake.requests) == 1 and slept == []


def test_the_jitter_never_takes_a_wait_past_max_retry_wait(call: Callable, slept: list[float]) -> None:
    fake = Refusing(busy("5"), busy("5"), busy("5"))
    call(fake, "get_task", "t1", retries=3, max_retry_wait=5)
    assert len(slept) == 3 and all(s == 5.0 for s in slept)


def test_without_retry_after_the_wait_backs_off_exponentially(call: Callable, slept: list[float]) -> None:
    fake = Refusing(*(busy(None, "too_many_requests") for _ in range(4)))
    assert call(fake, "model_info", retries=4, max_retry_wait=3).version == "m1"
    assert len(fake.requests) == 5
    for wait, base in zip(slept, [0.5, 1.0, 2.0, 3.0], strict=True):  # the last one capped
        assert base <= wait <= min(base * 1.1, 3.0)


@pytest.mark.parametrize(("method", "args"), [
    ("create_task", ({"a": [PIXELS], "b": [PIXELS]},)),
    ("add_examples", ("t1", [("c", PIXELS)])),
])
def test_posts_that_change_state_are_never_retried(call: Callable, slept: list[float], method: str,
                                                   args: tuple[Any, ...]) -> None:
    fake = Refusing(busy("1"), not_ready("1"))
    with pytest.raises(Overloaded):
        call(fake, method, *args, retries=5)
    assert len(fake.requests) == 1 and slept == []


def test_a_503_not_ready_is_retried(call: Callable, slept: list[float]) -> None:
    fake = Refusing(not_ready("1"), not_ready(None))
    assert call(fake, "delete_task", "t1", retries=2) is None
    assert [r.method for r in fake.requests] == ["DELETE"] * 3
    assert 1.0 <= slept[0] <= 1.1 and 1.0 <= slept[1] <= 1.1  # the second retry's backoff: 1 s


@pytest.mark.parametrize(("method", "args"), [
    ("classify", ("t1", [PIXELS])),
    ("classify_once", ({"a": [PIXELS], "b": [PIXELS]}, [PIXELS])),
])
def test_the_classify_posts_only_read_and_are_retried(call: Callable, slept: list[float], method: str,
                                                      args: tuple[Any, ...]) -> None:
    fake = Refusing(busy("1"))
    assert len(call(fake, method, *args, retries=1)) == 1
    assert len(fake.requests) == 2 and fake.requests[0].content == fake.requests[1].content


@pytest.mark.parametrize(("status", "error_type"), [
    (500, "internal_error"), (503, "internal_error"), (404, "task_not_found"),
])
def test_other_errors_are_not_retried(call: Callable, slept: list[float], status: int,
                                      error_type: str) -> None:
    fake = Refusing(error(status, error_type, "no", headers={"Retry-After": "1"}))
    with pytest.raises(MetaNetAPIError) as caught:
        call(fake, "get_task", "t1", retries=3)
    assert (caught.value.status, caught.value.type) == (status, error_type)
    assert not isinstance(caught.value, TooManyRequests | NotReady)
    assert len(fake.requests) == 1 and slept == []


def test_a_transport_failure_is_not_retried(call: Callable, slept: list[float]) -> None:
    attempts = []

    def fail(request: httpx.Request) -> httpx.Response:
        attempts.append(request)
        raise httpx.ConnectError("Connection refused")

    with pytest.raises(APIConnectionError, match="cannot reach"):
        call(fail, "get_task", "t1", retries=3)
    assert len(attempts) == 1 and slept == []


def test_the_readiness_probe_answers_false_instead_of_retrying(call: Callable, slept: list[float]) -> None:
    fake = Refusing(not_ready("1"))
    assert call(fake, "ready", retries=3) is False
    assert len(fake.requests) == 1 and slept == []


def test_a_proxys_429_without_the_contracts_body_is_retried(call: Callable, slept: list[float]) -> None:
    fake = Refusing(httpx.Response(429, text="<html>slow down</html>", headers={"Retry-After": "1"}))
    assert call(fake, "get_task", "t1", retries=1).task_id == "t1"
    assert len(slept) == 1


@pytest.mark.parametrize("client", [MetaNetClient, AsyncMetaNetClient])
@pytest.mark.parametrize(("options", "named"), [
    ({"retries": -1}, "retries"), ({"max_retry_wait": -0.5}, "max_retry_wait"),
    ({"max_retry_wait": float("nan")}, "max_retry_wait"),
])
def test_bad_retry_options_raise_value_error_naming_the_argument(client: type, options: dict[str, Any],
                                                                 named: str) -> None:
    with pytest.raises(ValueError, match=named):
        client("http://metanet.test", **options)


def test_the_options_are_kept_and_default_to_no_retries() -> None:
    with MetaNetClient("http://metanet.test") as client:
        assert (client.retries, client.max_retry_wait) == (0, 30.0)
    with MetaNetClient("http://metanet.test", retries=3, max_retry_wait=5) as client:
        assert (client.retries, client.max_retry_wait) == (3, 5.0)
