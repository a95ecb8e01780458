"""Prometheus metrics: HTTP traffic by route template, model timings, tasks and the memory cache.

Each app gets its own registry, so several apps (tests) can live in one process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.batcher import Batcher
from service.cache import ByteLRU

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
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
        self.registry.register(self._state)

    def observe_model(self, operation: str, seconds: float) -> None:
        self.model_seconds.labels(operation).observe(seconds)

    def watch(self, cache: ByteLRU, n_tasks: Callable[[], int], batcher: Batcher) -> None:
        """Report these at every scrape (once the service is loaded)."""
        self._state.sources = (cache, n_tasks, batcher)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Gauges and counters read from the live objects at scrape time, so they never drift."""

    def __init__(self) -> None:
        self.sources: tuple[ByteLRU, Callable[[], int], Batcher] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        if self.sources is None:
            return
        cache, n_tasks, batcher = self.sources
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
