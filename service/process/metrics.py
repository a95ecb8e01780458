"""Prometheus metrics: HTTP traffic by route template, model timings, tasks and the memory cache.

Each app gets its own registry, so several apps (tests) can live in one process. Under a
supervisor (Settings.processes > 1) prometheus_client runs in its multiprocess mode: each server
process writes its samples to files in one directory, and /metrics, whichever process answers it,
adds up every process's counters and live gauges (`multiprocess=True`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.inference.engine import QueueState
from service.storage.cache import ByteLRU

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self, multiprocess: bool = False) -> None:
        self.multiprocess = multiprocess
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "metanet_http_requests", "HTTP requests by route template and status",
            ["method", "route", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "metanet_http_request_duration_seconds", "HTTP request latency by route template",
            ["method", "route"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.model_seconds = Histogram(
            "metanet_model_seconds",
            "Model calls (register, classify: queueing included; batch: one forward's compute)",
            ["operation"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self._state = _StateCollector()
        self._shared = _SharedState(self.registry) if multiprocess else None
        if self._shared is None:
            self.registry.register(self._state)

    def observe_model(self, operation: str, seconds: float) -> None:
        self.model_seconds.labels(operation).observe(seconds)

    def watch(self, cache: ByteLRU, n_tasks: Callable[[], int], queue: Callable[[], QueueState]) -> None:
        """Report these at every scrape (once the service is loaded): the cache, the task count and
        the model queue (`Engine.queue_state`)."""
        self._state.sources = (cache, n_tasks, queue)

    def render(self) -> bytes:
        if self._shared is None:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        if self._state.sources is not None:
            self._shared.publish(self._state.sources, scrape=True)  # this process's figures: current
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

    async def publish_every(self, seconds: float) -> None:
        """Multiprocess mode: write this process's live figures to its files every `seconds`, so
        a scrape answered by another process sees them (at most that old). Runs until cancelled."""
        if self._shared is None:
            return
        while True:
            if self._state.sources is not None:
                self._shared.publish(self._state.sources)
            await asyncio.sleep(seconds)


# The cache, the task count and the model queue, as `watch` was given them.
_Sources = tuple[ByteLRU, Callable[[], int], Callable[[], QueueState]]
_Reading = tuple[ByteLRU, QueueState]  # what the values below are read from at one scrape

# The live state both modes report: (name, help, value from a reading). Gauges are summed over
# the live processes in multiprocess mode; counters are monotonic in each process.
_GAUGES: tuple[tuple[str, str, Callable[[_Reading], float]], ...] = (
    ("metanet_cache_bytes", "Bytes of task memories cached", lambda r: r[0].nbytes),
    ("metanet_cache_budget_bytes", "Cache budget in bytes", lambda r: r[0].budget),
    ("metanet_cache_entries", "Task memories cached", lambda r: len(r[0])),
    ("metanet_model_pending", "Model calls running or queued", lambda r: r[1].pending),
    ("metanet_queue_images", "Query images queued for the model", lambda r: r[1].queued_images),
    ("metanet_overloaded", "Server processes in overload mode (small forwards, a short queue)",
     lambda r: float(r[1].overloaded)),
)
_COUNTERS: tuple[tuple[str, str, Callable[[_Reading], float]], ...] = (
    ("metanet_cache_hits", "Memory cache hits", lambda r: r[0].hits),
    ("metanet_cache_misses", "Memory cache misses (memory rebuilt)", lambda r: r[0].misses),
    ("metanet_cache_evictions", "Memories evicted for space", lambda r: r[0].evictions),
    ("metanet_batches", "Batched forwards run", lambda r: r[1].batches),
    ("metanet_batched_images", "Query images run in batched forwards", lambda r: r[1].batched_images),
    ("metanet_rejected", "Model jobs refused with 429: the queue was full", lambda r: r[1].rejected),
    ("metanet_lingers", "Forwards whose start waited for the clients of the last forward (lingering)",
     lambda r: r[1].lingers),
    ("metanet_linger_seconds", "Seconds free model workers waited for the clients of their last forward",
     lambda r: r[1].linger_seconds),
)
_PROCESSES = ("metanet_server_processes", "Server processes running")
_TASKS = ("metanet_tasks", "Tasks in the store")
_DROPPED = ("metanet_dropped", "Queued model jobs dropped before compute")


class _StateCollector(Collector):
    """Gauges and counters read from the live objects at scrape time, so they never drift."""

    def __init__(self) -> None:
        self.sources: _Sources | None = None

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        if self.sources is None:
            return
        cache, n_tasks, queue = self.sources
        reading = (cache, queue())
        yield GaugeMetricFamily(*_PROCESSES, value=1)
        yield GaugeMetricFamily(*_TASKS, value=n_tasks())
        for name, text, value in _GAUGES:
            yield GaugeMetricFamily(name, text, value=value(reading))
        for name, text, value in _COUNTERS:
            yield CounterMetricFamily(name, text, value=value(reading))
        dropped = CounterMetricFamily(*_DROPPED, labels=["reason"])
        for reason, count in reading[1].dropped.items():
            dropped.add_metric([reason], count)
        yield dropped


class _SharedState:
    """What _StateCollector reports, as multiprocess metrics: gauges summed over the live processes,
    counters that take each process's increase since it last published, and the tasks gauge set
    only by a scrape (from the store's count, read just before: the latest one wins)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.gauges = {name: Gauge(name, text, registry=registry, multiprocess_mode="livesum")
                       for name, text, _ in _GAUGES}
        self.counters = {name: Counter(name, text, registry=registry) for name, text, _ in _COUNTERS}
        self.dropped = Counter(*_DROPPED, ["reason"], registry=registry)
        self.tasks = Gauge(*_TASKS, registry=registry, multiprocess_mode="mostrecent")
        Gauge(*_PROCESSES, registry=registry, multiprocess_mode="livesum").set(1)
        self._last: dict[str, float] = {}

    def publish(self, sources: _Sources, scrape: bool = False) -> None:
        cache, n_tasks, queue = sources
        reading = (cache, queue())
        if scrape:
            self.tasks.set(n_tasks())
        for name, _, value in _GAUGES:
            self.gauges[name].set(value(reading))
        totals = {name: value(reading) for name, _, value in _COUNTERS}
        totals.update({f"dropped:{reason}": count for reason, count in reading[1].dropped.items()})
        for key, total in totals.items():
            increase = total - self._last.get(key, 0)
            if increase > 0:
                counter = self.counters.get(key) or self.dropped.labels(key.partition(":")[2])
                counter.inc(increase)
            self._last[key] = total


class MetricsMiddleware:
    """Counts and times every HTTP request under its route template, never its raw path."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = _route_template(scope)
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - start)


def _route_template(scope: Scope) -> str:
    route = scope.get("route")  # set by the router once a route matched
    return getattr(route, "path", "unmatched")
