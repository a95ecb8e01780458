"""The app factory: `create_app(settings)` wires routes, middleware, errors and the life cycle.
Nothing is loaded at import time; service/process/server.py runs the app under uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from service.errors import ServiceError
from service.http.demo import demo
from service.http.docs import docs
from service.http.errors import handle_error
from service.http.head import HeadAsGet
from service.http.openapi import document
from service.http.request_log import RequestLogMiddleware
from service.http.routes import probes, v1
from service.http.tenants import SharedBuckets
from service.http.v2 import v2
from service.process.metrics import MetricsMiddleware
from service.process.runtime import Runtime
from service.process.supervisor import Siblings
from service.settings import Settings


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

    # /docs and /redoc come from service/http/docs.py, from local files rather than a CDN.
    app = FastAPI(title="MetaNet few-shot classification", version="1", lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.runtime = runtime
    app.include_router(v1)
    app.include_router(probes)
    app.include_router(v2)  # the Open Inference Protocol (KServe v2 / Triton HTTP)
    app.include_router(demo)
    app.include_router(docs)
    for exc_type in (ServiceError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(exc_type, handle_error)
    app.add_middleware(HeadAsGet)  # innermost: the others see the request as HEAD
    app.add_middleware(MetricsMiddleware, metrics=runtime.metrics)
    app.add_middleware(RequestLogMiddleware)  # outermost: its line and X-Request-ID cover everything
    document(app, settings)
    return app
