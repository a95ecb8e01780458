"""Running the service: `serve(settings)` runs the app under uvicorn in this process, or, with
Settings.processes above 1, supervises that many server processes on one port.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any

import uvicorn

from service.http.tenants import SharedBuckets
from service.inference.devices import runs_on_gpu
from service.process.app import create_app
from service.process.logs import configure_logging, log_listening
from service.process.runtime import Runtime
from service.process.supervisor import Siblings, serve_processes
from service.process.wire import OneSendHttpProtocol
from service.settings import Settings

log = logging.getLogger("service")


def serve(settings: Settings, sock: socket.socket | None = None, buckets: SharedBuckets | None = None,
          siblings: Siblings | None = None, load_first: bool = False) -> int:
    """Run the service until SIGINT/SIGTERM. Returns 1 if startup failed.

    With Settings.processes above 1 (or 0, by device, meaning more than one) this process
    supervises that many servers on one port (service/process/supervisor.py); each of them calls this
    with its socket, the shared rate-limit buckets and what it needs to know of the others, and
    (a replacement of a process that died) `load_first`.

    On SIGTERM uvicorn stops accepting connections, lets the requests in flight finish (for at most
    `shutdown_timeout_s`, then cancels them), and only then runs the lifespan's shutdown, which
    stops the model and closes the store. It then re-raises the signal: the exit status is the
    signal's."""
    configure_logging(settings)
    if sock is None:
        processes = server_processes(settings)
        if processes > 1:
            # Each process caches memories on its share of the budget: the setting is the total.
            shared = settings.model_copy(update={"processes": processes,
                                                 "cache_bytes": settings.cache_bytes // processes})
            return serve_processes(shared, processes, serve)
    # The model thread needs the GIL between torch ops (hundreds per forward) while the event loop
    # thread runs Python for every request; with the default 5 ms switch interval a busy loop made
    # each of those hand-overs wait up to 5 ms. A shorter interval lets the model thread back in.
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
    app = create_app(settings, buckets, siblings, load_first)
    # log_config=None: keep our handlers; access_log=False: RequestLogMiddleware writes that line;
    # http: each response in one send (service/process/wire.py).
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            log_config=None, access_log=False, http=OneSendHttpProtocol,
                            timeout_graceful_shutdown=settings.shutdown_timeout_s,
                            timeout_keep_alive=settings.keep_alive_s)
    server = _Server(config, announce=sock is None)  # a supervisor announces its processes itself
    runtime: Runtime = app.state.runtime

    def stop() -> None:
        server.should_exit = True

    runtime.on_fatal = stop
    server.run(sockets=None if sock is None else [sock])
    if runtime.failure is not None:
        log.error("%s", runtime.failure)
        return 1
    return 0


def server_processes(settings: Settings) -> int:
    """Settings.processes, or what 0 means: 1 on a GPU, else 2 when this process may use 2 or more
    cores."""
    if settings.processes:
        return settings.processes
    if runs_on_gpu(settings):
        return 1
    return 2 if len(os.sched_getaffinity(0)) >= 2 else 1


class _Server(uvicorn.Server):
    """uvicorn's server, which also says where it listens once its socket is bound."""

    def __init__(self, config: uvicorn.Config, announce: bool) -> None:
        super().__init__(config)
        self._announce = announce

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self._announce and self.servers and self.servers[0].sockets:
            address: Any = self.servers[0].sockets[0].getsockname()
            log_listening(address[0], address[1])
