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
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.batcher import Batcher
from service.cache import ByteLRU

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

    def watch(self, cache: ByteLRU, n_tasks: Callable[[], int], batcher: Batcher) -> None:
        """Report these at every scrape (once the service is loaded)."""
        self._state.sources = (cache, n_tasks, batcher)

    def render(self) -> bytes:
        if self._shared is None:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        if self._state.sources is not None:
            self._shared.publish(*self._state.sources, scrape=True)  # this process's figures: current
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
                self._shared.publish(*self._state.sources)
            await asyncio.sleep(seconds)


class _StateCollector(Collector):
    """Gauges and counters read from the live objects at scrape time, so they never drift."""

    def __init__(self) -> None:
        self.sources: tuple[ByteLRU, Callable[[], int], Batcher] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        if self.sources is None:
            return
        cache, n_tasks, batcher = self.sources
        yield GaugeMetricFamily("metanet_server_processes", "Server processes running", value=1)
        yield GaugeMetricFamily("metanet_tasks", "Tasks in the store", value=n_tasks())
        yield GaugeMetricFamily("metanet_cache_bytes", "Bytes of task memories cached", value=cache.nbytes)
        yield GaugeMetricFamily("metanet_cache_budget_bytes", "Cache budget in bytes", value=cache.budget)
        yield GaugeMetricFamily("metanet_cache_entries", "Task memories cached", value=len(cache))
        yield CounterMetricFamily("metanet_cache_hits", "Memory cache hits", value=cache.hits)
        yield CounterMetricFamily("metanet_cache_misses", "Memory cache misses (memory rebuilt)",
                                  value=cache.misses)
        yield CounterMetricFamily("metanet_cache_evictions", "Memories evicted for space",
                                  value=cache.evictions)
        yield GaugeMetricFamily("metanet_model_pending", "Model calls running or queued",
                                value=batcher.pending)
        yield GaugeMetricFamily("metanet_queue_images", "Query images queued for the model",
                                value=batcher.queued_images)
        stats = batcher.stats
        yield CounterMetricFamily("metanet_batches", "Batched forwards run", value=stats.batches)
        yield CounterMetricFamily("metanet_batched_images", "Query images run in batched forwards",
                                  value=stats.batched_images)
        yield CounterMetricFamily("metanet_rejected", "Model jobs refused with 429: the queue was full",
                                  value=stats.rejected)
        dropped = CounterMetricFamily("metanet_dropped", "Queued model jobs dropped before compute",
                                      labels=["reason"])
        for reason, count in stats.dropped.items():
            dropped.add_metric([reason], count)
        yield dropped


class _SharedState:
    """What _StateCollector reports, as multiprocess metrics: gauges summed over the live processes,
    counters that take each process's increase since it last published, and the tasks gauge set
    only by a scrape (from the store's count, read just before: the latest one wins)."""

    _GAUGES = (
        ("metanet_cache_bytes", "Bytes of task memories cached", "livesum"),
        ("metanet_cache_budget_bytes", "Cache budget in bytes", "livesum"),
        ("metanet_cache_entries", "Task memories cached", "livesum"),
        ("metanet_model_pending", "Model calls running or queued", "livesum"),
        ("metanet_queue_images", "Query images queued for the model", "livesum"),
        ("metanet_server_processes", "Server processes running", "livesum"),
        ("metanet_tasks", "Tasks in the store", "mostrecent"),
    )
    _COUNTERS = (
        ("metanet_cache_hits", "Memory cache hits"),
        ("metanet_cache_misses", "Memory cache misses (memory rebuilt)"),
        ("metanet_cache_evictions", "Memories evicted for space"),
        ("metanet_batches", "Batched forwards run"),
        ("metanet_batched_images", "Query images run in batched forwards"),
        ("metanet_rejected", "Model jobs refused with 429: the queue was full"),
    )

    def __init__(self, registry: CollectorRegistry) -> None:
        self.gauges = {name: Gauge(name, text, registry=registry, multiprocess_mode=mode)
                       for name, text, mode in self._GAUGES}
        self.counters = {name: Counter(name, text, registry=registry) for name, text in self._COUNTERS}
        self.dropped = Counter("metanet_dropped", "Queued model jobs dropped before compute", ["reason"],
                               registry=registry)
        self._last: dict[Any, float] = {}
        self.gauges["metanet_server_processes"].set(1)

    def publish(
        self, cache: ByteLRU, n_tasks: Callable[[], int], batcher: Batcher, scrape: bool = False
    ) -> None:
        values = {
            "metanet_cache_bytes": cache.nbytes, "metanet_cache_budget_bytes": cache.budget,
            "metanet_cache_entries": len(cache), "metanet_model_pending": batcher.pending,
            "metanet_queue_images": batcher.queued_images,
        }
        if scrape:
            values["metanet_tasks"] = n_tasks()
        for name, value in values.items():
            self.gauges[name].set(value)
        stats = batcher.stats
        totals: dict[Any, float] = {
            "metanet_cache_hits": cache.hits, "metanet_cache_misses": cache.misses,
            "metanet_cache_evictions": cache.evictions, "metanet_batches": stats.batches,
            "metanet_batched_images": stats.batched_images, "metanet_rejected": stats.rejected,
        }
        totals.update({("dropped", reason): count for reason, count in stats.dropped.items()})
        for key, total in totals.items():
            increase = total - self._last.get(key, 0)
            if increase > 0:
                if isinstance(key, tuple):
                    self.dropped.labels(key[1]).inc(increase)
                else:
                    self.counters[key].inc(increase)
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
