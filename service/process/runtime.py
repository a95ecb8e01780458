"""The service's live parts and their life cycle: open the store, load and warm the model, serve.

Loading runs in the background so /healthz answers at once and /readyz says 503 until the model
is warm; a load that fails calls `on_fatal` (the CLI stops the server and exits non-zero).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool

from service.errors import NotReady
from service.http.tasks import TaskService
from service.http.tenants import KeyRing, RateLimiter, SharedBuckets
from service.inference.engine import Engine
from service.process.metrics import Metrics
from service.process.supervisor import Siblings
from service.settings import Settings
from service.storage import TaskStore, open_store

log = logging.getLogger("service.process.runtime")
_PUBLISH_S = 1.0  # how often a server process under a supervisor publishes its live metrics


class Runtime:
    def __init__(self, settings: Settings, store: TaskStore | None = None,
                 buckets: SharedBuckets | None = None, siblings: Siblings | None = None) -> None:
        self.settings = settings
        self.siblings = siblings  # the other server processes of a supervisor, if any
        # Under a supervisor (service/process/supervisor.py) the processes share /metrics and the buckets.
        self.metrics = Metrics(multiprocess=siblings is not None)
        self.keys = KeyRing(settings.api_keys)
        self.metrics_keys = KeyRing(settings.metrics_keys)
        self.limiter = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst, shared=buckets)
        self._publishing: asyncio.Task[None] | None = None
        self.store: TaskStore = store or open_store(settings)
        self.engine: Engine | None = None
        self.tasks: TaskService | None = None  # set once everything is loaded and warm
        self.failure: str | None = None
        self.on_fatal: Callable[[], None] = lambda: None

    async def start(self) -> None:
        try:
            await self.store.open()
            self.engine = await run_in_threadpool(Engine.load, self.settings, self.metrics.observe_model)
            await self.engine.warm_up()
            tasks = TaskService(self.store, self.engine, self.settings, await self.store.count())
        except Exception as exc:
            self.failure = f"startup failed: {type(exc).__name__}: {exc}"
            log.error("%s", self.failure, exc_info=exc)
            self.on_fatal()
            return
        self.metrics.watch(tasks.cache, lambda: tasks.n_tasks, self.engine.queue_state)
        self._publishing = asyncio.create_task(self.metrics.publish_every(_PUBLISH_S))
        # What is loaded by now (the model, the libraries' modules: some 200k objects) lives as
        # long as the process. Frozen out of the collector's sight, it is not walked again by
        # every full collection, each a pause of the event loop and the model thread alike.
        gc.collect()
        gc.freeze()
        self.tasks = tasks
        if self.siblings is not None:
            self.siblings.mark_ready()
        log.info("ready: model %s on %s, %d tasks in %s", self.engine.info.version,
                 self.engine.info.device, tasks.n_tasks, self.store)

    async def stop(self) -> None:
        """After the server has drained (or given up on) in-flight requests: stop the model, then
        close the store, so no write is cut off half way."""
        self.tasks = None
        if self.siblings is not None:
            self.siblings.mark_ready(False)
        if self._publishing is not None:
            self._publishing.cancel()
        if self.engine is not None:
            await self.engine.close()  # lets the model call in flight finish
        await self.store.close()
        log.info("stopped: model released, task store closed")

    async def render_metrics(self) -> bytes:
        """The /metrics page, its task count read from the store first (other processes and replicas
        add and delete tasks too)."""
        if self.tasks is not None:
            try:
                self.tasks.n_tasks = await self.store.count()
            except Exception as exc:  # the store is down: /metrics still answers, with the last count
                log.warning("could not count the tasks in the store: %s", exc)
        return self.metrics.render()

    async def check_ready(self) -> None:
        if self.tasks is None:
            raise NotReady(self.failure or "the model is still loading")
        if self.siblings is not None and not self.siblings.all_ready():
            raise NotReady(f"{self.siblings.ready()} of {self.siblings.processes} server processes are ready")
        try:
            await self.store.ping()
        except Exception as exc:
            raise NotReady(f"the task store is unreachable: {exc}") from exc
