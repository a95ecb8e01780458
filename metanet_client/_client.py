"""`MetaNetClient` and `AsyncMetaNetClient`: one method per endpoint of docs/api.md.

Each method builds a `_Call` (the request plus how to read its answer) with the shared functions
below; the two classes differ only in how they send it (and sleep before a retry), so the protocol
and the retry policy are written down once.
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import anyio.to_thread  # a dependency of httpx: runs image encoding off the event loop
import httpx

from metanet_client._errors import (
    APIConnectionError,
    APITimeoutError,
    NotReady,
    TooManyRequests,
    UnexpectedResponse,
    error_from_response,
)
from metanet_client._images import ImageInput, encode_examples, encode_images
from metanet_client._types import ClassifyResult, ModelInfo, Task, TaskPage

T = TypeVar("T")
Examples = Mapping[str, ImageInput | Iterable[ImageInput]] | Iterable[tuple[str, ImageInput]]

DEFAULT_URL = "http://127.0.0.1:8000"
# Registering a large support set or classifying a full batch on a busy CPU takes seconds, not ms;
# a dead host should still fail fast.
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=5.0)
PAGE_SIZE = 200  # the service's largest page
DEFAULT_MAX_RETRY_WAIT = 30.0  # seconds; a longer Retry-After is an outage to report, not to sit out
FIRST_BACKOFF = 0.5  # seconds before the first retry when the answer has no Retry-After; doubles after


@dataclass(frozen=True, slots=True)
class _Call(Generic[T]):
    """One request of the contract and how to read its success; errors become exceptions."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: Any = None
    params: Mapping[str, Any] | None = None
    raise_errors: bool = True  # False: `parse` sees every status (the probes)
    read_only: bool = False  # a POST that only reads (classify): as safe to resend as a GET

    def finish(self, response: httpx.Response) -> T:
        if self.raise_errors and response.is_error:
            raise error_from_response(response)
        try:
            return self.parse(response)
        except (KeyError, TypeError, ValueError) as exc:
            raise UnexpectedResponse(
                f"{self.method} {self.path} answered {response.status_code} with a body outside the "
                f"contract ({type(exc).__name__}: {exc}): {response.text[:200]!r}"
            ) from exc


def _body_as(model: Any) -> Callable[[httpx.Response], Any]:
    return lambda response: model.from_json(response.json())


def _task_path(task_id: str, suffix: str = "") -> str:
    if not isinstance(task_id, str) or task_id in ("", ".", ".."):
        raise ValueError(f"not a task id: {task_id!r}")
    return f"/v1/tasks/{quote(task_id, safe='')}{suffix}"


def _create_task(examples: Examples, name: str | None) -> _Call[Task]:
    body: dict[str, Any] = {"examples": encode_examples(examples)}
    if name is not None:
        body["name"] = name
    return _Call("POST", "/v1/tasks", _body_as(Task), json=body)


def _get_task(task_id: str) -> _Call[Task]:
    return _Call("GET", _task_path(task_id), _body_as(Task))


def _list_tasks(limit: int | None, cursor: str | None) -> _Call[TaskPage]:
    params = {k: v for k, v in (("limit", limit), ("cursor", cursor)) if v is not None}
    return _Call("GET", "/v1/tasks", _body_as(TaskPage), params=params)


def _delete_task(task_id: str) -> _Call[None]:
    return _Call("DELETE", _task_path(task_id), lambda response: None)


def _add_examples(task_id: str, examples: Examples) -> _Call[Task]:
    body = {"examples": encode_examples(examples)}
    return _Call("POST", _task_path(task_id, "/examples"), _body_as(Task), json=body)


def _classify(
    task_id: str, images: Any, top_k: int, explain: bool, min_confidence: float | None,
) -> _Call[ClassifyResult]:
    body = {"images": encode_images(images), "top_k": top_k, "explain": explain,
            **_min_confidence(min_confidence)}
    return _Call("POST", _task_path(task_id, "/classify"), _body_as(ClassifyResult), json=body,
                 read_only=True)


def _classify_once(
    support: Examples, images: Any, top_k: int, explain: bool, min_confidence: float | None,
) -> _Call[ClassifyResult]:
    body = {"support": encode_examples(support), "images": encode_images(images),
            "top_k": top_k, "explain": explain, **_min_confidence(min_confidence)}
    return _Call("POST", "/v1/classify", _body_as(ClassifyResult), json=body, read_only=True)


def _min_confidence(value: float | None) -> dict[str, float]:
    """The field only when given: a server that predates it refuses fields it does not know."""
    return {} if value is None else {"min_confidence": value}


def _model_info() -> _Call[ModelInfo]:
    return _Call("GET", "/v1/model", _body_as(ModelInfo))


def _probe(path: str) -> _Call[bool]:
    return _Call("GET", path, lambda response: response.status_code == 200, raise_errors=False)


class _BaseClient:
    def __init__(
        self, base_url: str, api_key: str | None, timeout: float | httpx.Timeout | None,
        headers: Mapping[str, str] | None, retries: int, max_retry_wait: float,
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries must be 0 or more, not {retries!r}")
        if not max_retry_wait >= 0:  # NaN too
            raise ValueError(f"max_retry_wait must be 0 or more seconds, not {max_retry_wait!r}")
        self.retries = retries
        self.max_retry_wait = float(max_retry_wait)
        self.base_url = str(base_url).rstrip("/")
        merged = {"Accept": "application/json", "User-Agent": "metanet-client", **(headers or {})}
        if api_key:
            merged["Authorization"] = f"Bearer {api_key}"
        self._http_options: dict[str, Any] = {
            "base_url": self.base_url, "headers": merged, "timeout": timeout}

    def __repr__(self) -> str:  # never the API key
        return f"{type(self).__name__}({self.base_url!r})"

    @contextlib.contextmanager
    def _reaching(self) -> Iterator[None]:
        """httpx's transport failures as the client's own exceptions, naming the service."""
        try:
            yield
        except httpx.TimeoutException as exc:
            raise APITimeoutError(f"no answer from {self.base_url} in time ({type(exc).__name__})") from exc
        except httpx.RequestError as exc:
            raise APIConnectionError(f"cannot reach {self.base_url}: {exc}") from exc

    def _retry_wait(self, call: _Call[Any], response: httpx.Response, attempt: int) -> float | None:
        """Seconds to sleep before sending `call` again after `response` (its `attempt`-th retry,
        from 0), or None to take this answer. Only a 429 or 503 is worth waiting out: the service
        refused the request before doing anything, so a safe request loses nothing by coming back."""
        if (attempt >= self.retries or response.status_code not in (429, 503) or not call.raise_errors
                or not (call.read_only or call.method in ("GET", "DELETE"))):
            return None
        error = error_from_response(response)
        if not isinstance(error, TooManyRequests | NotReady):
            return None
        wait = error.retry_after
        if wait is None:
            wait = min(FIRST_BACKOFF * 2**attempt, self.max_retry_wait)
        elif wait > self.max_retry_wait:  # the caller hears now rather than after a long stall
            return None
        # Up to 10% more, so clients refused together do not all come back in the same instant.
        return min(wait * (1 + random.uniform(0, 0.1)), self.max_retry_wait)


class MetaNetClient(_BaseClient):
    """A blocking client for the MetaNet service; use it as a context manager (or call close()).

    Images may be paths, encoded file bytes, PIL images or 2-D arrays of grey levels; see
    `encode_image`. Errors raise `MetaNetAPIError` subclasses carrying the API's type and message.

    `retries` resends a call refused with 429 (`too_many_requests`, `overloaded`, `rate_limited`)
    or 503 (`not_ready`) up to that many times, first sleeping for the answer's `Retry-After`
    (without one: 0.5 s, 1 s, 2 s, ...), plus up to 10% random jitter, never more than
    `max_retry_wait` seconds; a longer `Retry-After` raises at once. Only GETs, DELETEs and the
    classify calls (pure reads) are resent: `create_task` and `add_examples` change state and
    always raise, so the caller decides. Other errors and transport failures are never retried.
    """

    def __init__(
        self, base_url: str = DEFAULT_URL, api_key: str | None = None, *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT, headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None, retries: int = 0,
        max_retry_wait: float = DEFAULT_MAX_RETRY_WAIT,
    ) -> None:
        super().__init__(base_url, api_key, timeout, headers, retries, max_retry_wait)
        self._http = httpx.Client(transport=transport, **self._http_options)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MetaNetClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self, call: _Call[T]) -> T:
        attempt = 0
        while True:
            with self._reaching():
                response = self._http.request(
                    call.method, call.path, json=call.json, params=call.params)
            if (wait := self._retry_wait(call, response, attempt)) is None:
                return call.finish(response)
            time.sleep(wait)
            attempt += 1

    def create_task(self, examples: Examples, name: str | None = None) -> Task:
        """Register a task from a mapping label -> images, or from (label, image) pairs; its
        `warnings` say what the model found wrong with them (the task is registered either way).
        Never retried (a resent POST could register the task twice): a 429 or 503 raises at once."""
        return self._run(_create_task(examples, name))

    def get_task(self, task_id: str) -> Task:
        return self._run(_get_task(task_id))

    def list_tasks(self, limit: int | None = None, cursor: str | None = None) -> TaskPage:
        """One page of tasks, oldest first; pass `page.next_cursor` for the next one."""
        return self._run(_list_tasks(limit, cursor))

    def iter_tasks(self, page_size: int = PAGE_SIZE) -> Iterator[Task]:
        """Every task, fetching pages as the iteration goes."""
        cursor = None
        while True:
            page = self.list_tasks(page_size, cursor)
            yield from page.data
            if (cursor := page.next_cursor) is None:
                return

    def delete_task(self, task_id: str) -> None:
        self._run(_delete_task(task_id))

    def add_examples(self, task_id: str, examples: Examples) -> Task:
        """Add support examples (new labels allowed within the limits); returns the updated task.
        Never retried (a resent POST could add them twice): a 429 or 503 raises at once."""
        return self._run(_add_examples(task_id, examples))

    def classify(
        self, task_id: str, images: Any, top_k: int = 1, explain: bool = False,
        min_confidence: float | None = None,
    ) -> ClassifyResult:
        """Classify images (one, or an iterable of them) against a registered task. A prediction
        whose confidence is below `min_confidence` (0..1) has label None: none of the task's labels."""
        return self._run(_classify(task_id, images, top_k, explain, min_confidence))

    def classify_once(
        self, support: Examples, images: Any, top_k: int = 1, explain: bool = False,
        min_confidence: float | None = None,
    ) -> ClassifyResult:
        """A one-off episode: classify `images` against `support`; nothing is stored."""
        return self._run(_classify_once(support, images, top_k, explain, min_confidence))

    def model_info(self) -> ModelInfo:
        return self._run(_model_info())

    def health(self) -> bool:
        """True while the process answers /healthz; raises APIConnectionError if unreachable."""
        return self._run(_probe("/healthz"))

    def ready(self) -> bool:
        """True once the model is loaded and the store reachable (/readyz answers 200)."""
        return self._run(_probe("/readyz"))


class AsyncMetaNetClient(_BaseClient):
    """The asyncio (or trio) twin of `MetaNetClient`: the same methods, awaited; use it with
    `async with`. Images are encoded in a worker thread, so large batches do not stall the loop;
    retries (`retries`, `max_retry_wait`) work as in `MetaNetClient` and sleep without blocking it."""

    def __init__(
        self, base_url: str = DEFAULT_URL, api_key: str | None = None, *,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT, headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None, retries: int = 0,
        max_retry_wait: float = DEFAULT_MAX_RETRY_WAIT,
    ) -> None:
        super().__init__(base_url, api_key, timeout, headers, retries, max_retry_wait)
        self._http = httpx.AsyncClient(transport=transport, **self._http_options)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncMetaNetClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _run(self, call: _Call[T]) -> T:
        attempt = 0
        while True:
            with self._reaching():
                response = await self._http.request(
                    call.method, call.path, json=call.json, params=call.params)
            if (wait := self._retry_wait(call, response, attempt)) is None:
                return call.finish(response)
            await anyio.sleep(wait)  # asyncio.sleep under asyncio; works under trio as well
            attempt += 1

    @staticmethod
    async def _build(build: Callable[..., _Call[T]], *args: Any) -> _Call[T]:
        return await anyio.to_thread.run_sync(functools.partial(build, *args))

    async def create_task(self, examples: Examples, name: str | None = None) -> Task:
        return await self._run(await self._build(_create_task, examples, name))

    async def get_task(self, task_id: str) -> Task:
        return await self._run(_get_task(task_id))

    async def list_tasks(self, limit: int | None = None, cursor: str | None = None) -> TaskPage:
        return await self._run(_list_tasks(limit, cursor))

    async def iter_tasks(self, page_size: int = PAGE_SIZE) -> AsyncIterator[Task]:
        cursor = None
        while True:
            page = await self.list_tasks(page_size, cursor)
            for task in page.data:
                yield task
            if (cursor := page.next_cursor) is None:
                return

    async def delete_task(self, task_id: str) -> None:
        await self._run(_delete_task(task_id))

    async def add_examples(self, task_id: str, examples: Examples) -> Task:
        return await self._run(await self._build(_add_examples, task_id, examples))

    async def classify(
        self, task_id: str, images: Any, top_k: int = 1, explain: bool = False,
        min_confidence: float | None = None,
    ) -> ClassifyResult:
        return await self._run(await self._build(_classify, task_id, images, top_k, explain, min_confidence))

    async def classify_once(
        self, support: Examples, images: Any, top_k: int = 1, explain: bool = False,
        min_confidence: float | None = None,
    ) -> ClassifyResult:
        return await self._run(
            await self._build(_classify_once, support, images, top_k, explain, min_confidence))

    async def model_info(self) -> ModelInfo:
        return await self._run(_model_info())

    async def health(self) -> bool:
        return await self._run(_probe("/healthz"))

    async def ready(self) -> bool:
        return await self._run(_probe("/readyz"))
