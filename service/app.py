"""The app factory: `create_app(settings)` wires routes, middleware, errors and the life cycle,
and `serve(settings)` runs it under uvicorn. Nothing is loaded at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from service.demo import demo
from service.errors import ServiceError, handle_error
from service.logs import RequestLogMiddleware, configure_logging
from service.metrics import MetricsMiddleware
from service.openapi import document
from service.routes import probes, v1
from service.runtime import Runtime
from service.settings import Settings
from service.supervisor import Siblings, serve_processes, server_processes
from service.tenants import SharedBuckets
from service.v2 import v2

log = logging.getLogger("service")


def create_app(settings: Settings | None = None, buckets: SharedBuckets | None = None,
               siblings: Siblings | None = None, load_first: bool = False) -> FastAPI:
    """The app; `buckets` and `siblings`: what a supervisor's server processes share. The model
    loads in the background while the server already answers (503 until ready), or, with
    `load_first` (a replacement server process), before the server starts listening."""
    settings = settings or Settings()
    runtime = Runtime(settings, buckets=buckets, siblings=siblings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(runtime.start())
        try:
            if load_first:
                await loading
                if runtime.failure is not None:  # uvicorn then exits without listening
                    raise RuntimeError(runtime.failure)
            yield
        finally:
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            await runtime.stop()

    app = FastAPI(title="MetaNet few-shot classification", version="1", lifespan=lifespan)
    app.state.runtime = runtime
    app.include_router(v1)
    app.include_router(probes)
    app.include_router(v2)  # the Open Inference Protocol (KServe v2 / Triton HTTP)
    app.include_router(demo)
    for exc_type in (ServiceError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(exc_type, handle_error)
    app.add_middleware(MetricsMiddleware, metrics=runtime.metrics)
    app.add_middleware(RequestLogMiddleware)  # outermost: its line and X-Request-ID cover everything
    document(app, settings)
    return app


def serve(settings: Settings, sock: socket.socket | None = None, buckets: SharedBuckets | None = None,
          siblings: Siblings | None = None, load_first: bool = False) -> int:
    """Run the service until SIGINT/SIGTERM. Returns 1 if startup failed.

    With Settings.processes above 1 (or 0, by device, meaning more than one) this process
    supervises that many servers on one port (service/supervisor.py); each of them calls this
    with its socket, the shared rate-limit buckets and what it needs to know of the others, and
    (a replacement of a process that died) `load_first`.

    On SIGTERM uvicorn stops accepting connections, lets the requests in flight finish (for at most
    `shutdown_timeout_s`, then cancels them), and only then runs the lifespan's shutdown, which
    stops the model and closes the store. It then re-raises the signal: the exit status is the
    signal's."""
    import uvicorn

    from service.wire import OneSendHttpProtocol

    configure_logging(settings)
    if sock is None:
        processes = server_processes(settings)
        if processes > 1:
            # Each process caches memories on its share of the budget: the setting is the total.
            shared = settings.model_copy(update={"processes": processes,
                                                 "cache_bytes": settings.cache_bytes // processes})
            return serve_processes(shared, processes)
    # The model thread needs the GIL between torch ops (hundreds per forward) while the event loop
    # thread runs Python for every request; with the default 5 ms switch interval a busy loop made
    # each of those hand-overs wait up to 5 ms. A shorter interval lets the model thread back in.
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
    app = create_app(settings, buckets, siblings, load_first)
    # log_config=None: keep our handlers; access_log=False: RequestLogMiddleware writes that line;
    # http: each response in one send (service/wire.py).
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            log_config=None, access_log=False, http=OneSendHttpProtocol,
                            timeout_graceful_shutdown=settings.shutdown_timeout_s,
                            timeout_keep_alive=settings.keep_alive_s)
    server = uvicorn.Server(config)
    runtime: Runtime = app.state.runtime

    def stop() -> None:
        server.should_exit = True

    runtime.on_fatal = stop
    server.run(sockets=None if sock is None else [sock])
    if runtime.failure is not None:
        log.error("%s", runtime.failure)
        return 1
    return 0
