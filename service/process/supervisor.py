"""Several server processes on one port (Settings.processes > 1).

Within one process the event loop and the model threads share one GIL: every torch op of a forward
hands it back and forth with the loop's Python, and under load part of the CPU goes idle waiting
for it. Processes share nothing of that: the
supervisor reserves the port, starts `processes` copies of the service (spawned: each loads the
model itself), each listening on that port with a socket of its own (SO_REUSEPORT), and the kernel
spreads new connections over the listening ones by a hash of the client's address and port (one
socket shared by all, accepted by whichever process came first, let one process hold most clients).

What the processes share: the task store (SQLite in WAL mode or Redis, as replicas do), the rate
limiter's buckets (`SharedBuckets`, one table in shared memory), and the metrics (prometheus_client's
multiprocess mode: every process writes its samples to files in one directory and /metrics, in any
process, adds them up). Each keeps its own cache of task memories and its own model queue.

The first processes listen at once (so /healthz answers while they load, as a single server's
does), and /readyz says ready once all of them are. A process that dies later (killed, crashed)
is replaced by one that listens only once it is loaded and warm, so no connection meets a cold
process. One of the first that fails to start stops them all (exit status 1, as a single server);
so do deaths that keep coming (more than _RESTARTS a minute). SIGTERM, SIGINT or SIGHUP reach each
process once as SIGTERM (each drains its requests as a single server does); the supervisor then
ends by the signal it got.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from typing import Any

from service.http.tenants import SharedBuckets
from service.process.logs import log_listening
from service.settings import Settings

log = logging.getLogger("service.process.supervisor")
# What a server process runs: service.process.server.serve, handed in so this module need not import it.
Serve = Callable[..., int]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client when it is imported
STARTUP_FAILED = 78  # a server process's exit status when it could not start (EX_CONFIG)
_RESTARTS = 5  # more deaths than this within _RESTART_WINDOW_S: give up and stop
_RESTART_WINDOW_S = 60.0
_POLL_S = 0.2
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Siblings:
    """What a server process knows of the others: how many there are, and whether all of them
    have been ready (a file per ready process in a directory of the supervisor's, and a marker
    once they all were), so /readyz does not say ready while some of the first are still loading.
    A replacement listens only once it is ready, so a restart does not make the others unready."""

    _ALL = "all"

    def __init__(self, directory: str, processes: int) -> None:
        self.directory, self.processes = directory, processes

    def mark_ready(self, ready: bool = True) -> None:
        path = os.path.join(self.directory, str(os.getpid()))
        if not ready:
            self.forget(os.getpid())
            return
        with open(path, "w"):
            pass
        if len(os.listdir(self.directory)) >= self.processes:
            with open(os.path.join(self.directory, self._ALL), "w"):
                pass

    def forget(self, pid: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.directory, str(pid)))

    def all_ready(self) -> bool:
        return os.path.exists(os.path.join(self.directory, self._ALL))

    def ready(self) -> int:
        return len([name for name in os.listdir(self.directory) if name != self._ALL])


def serve_processes(settings: Settings, processes: int, serve: Serve) -> int:
    """Run `processes` servers (each `serve(settings, sock=..., ...)`) on one port until
    SIGTERM/SIGINT/SIGHUP; 1 if they could not start (or kept dying)."""
    try:
        family, address = _address(settings.host, settings.port)
        reserved = _reserve(family, address)  # a taken port fails here, once
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc.strerror or exc)
        return 1
    address = reserved.getsockname()  # the port the kernel chose, when it was 0
    metrics_dir = tempfile.mkdtemp(prefix="metanet-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir  # inherited by the spawned processes
    ctx = multiprocessing.get_context("spawn")
    siblings = Siblings(os.path.join(metrics_dir, "ready"), processes)
    os.mkdir(siblings.directory)
    buckets = SharedBuckets.create() if settings.rate_limit_per_s > 0 else None
    children: list[BaseProcess | None] = [None] * processes
    deaths: deque[float] = deque()
    stopping: list[int] = []  # the signal that asked us to stop

    def start(slot: int, first: bool) -> None:
        child = ctx.Process(target=_child, name=f"metanet-server-{slot}",
                            args=(serve, settings, family, address, first, buckets, siblings, os.getpid()))
        child.start()
        children[slot] = child

    def on_signal(signum: int, _frame: Any) -> None:
        if not stopping:
            stopping.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in _STOP_SIGNALS}
    status = 0
    try:
        for slot in range(processes):
            start(slot, first=True)
        log_listening(address[0], address[1], processes)
        log.info("server processes: pids %s", ", ".join(str(c.pid) for c in children if c is not None))
        while not stopping:
            time.sleep(_POLL_S)
            for slot, child in enumerate(children):
                if child is None or child.is_alive() or stopping:
                    continue
                _forget(child)
                siblings.forget(child.pid)  # type: ignore[arg-type]
                if child.exitcode == STARTUP_FAILED and not siblings.all_ready():
                    log.error("server process %d failed to start; stopping", child.pid)
                    status = 1
                    break
                now = time.monotonic()
                deaths.append(now)
                while deaths and deaths[0] < now - _RESTART_WINDOW_S:
                    deaths.popleft()
                if len(deaths) > _RESTARTS:
                    log.error("server processes ended %d times within %.0f s; stopping", len(deaths),
                              _RESTART_WINDOW_S)
                    status = 1
                    break
                log.warning("server process %d ended (exit status %s); starting another",
                            child.pid, child.exitcode)
                start(slot, first=False)
            if status:
                break
    finally:
        _stop(children, settings.shutdown_timeout_s)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        reserved.close()
        if buckets is not None:
            buckets.close(unlink=True)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    if status == 0 and stopping:
        # As a single server does: the exit status says which signal ended it (for SIGINT too,
        # not Python's KeyboardInterrupt).
        signal.signal(stopping[0], signal.SIG_DFL)
        signal.raise_signal(stopping[0])
    return status


def _address(host: str, port: int) -> tuple[socket.AddressFamily, Any]:
    """(family, socket address) of host:port, resolved once, here: every process binds the same."""
    family, _, _, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)[0]
    return family, address


def _reserve(family: socket.AddressFamily, address: Any) -> socket.socket:
    """The supervisor's hold on the port. A plain bind first: it fails when anyone holds the port,
    a server of this kind (which allows SO_REUSEPORT) included. Then a bind with SO_REUSEPORT that
    never listens: the kernel spreads connections over the listening sockets only."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        if address[1] == 0:
            address = probe.getsockname()
    return _bind(family, address)


def _bind(family: socket.AddressFamily, address: Any) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _stop(children: list[BaseProcess | None], grace_s: float) -> None:
    """SIGTERM to each process once (each drains like a single server), then wait; SIGKILL to
    whatever outlives the grace period."""
    live = [c for c in children if c is not None and c.is_alive()]
    for child in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGTERM)  # type: ignore[arg-type]
    deadline = time.monotonic() + grace_s + 10
    for child in live:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            log.error("server process %d did not stop in time; killing it", child.pid)
            child.kill()
            child.join()
        _forget(child)


def _forget(child: BaseProcess) -> None:
    """A dead process's live gauges leave the sums /metrics reports (its counters stay)."""
    from prometheus_client import multiprocess

    if child.pid is not None:
        multiprocess.mark_process_dead(child.pid)


def _child(serve: Serve, settings: Settings, family: socket.AddressFamily, address: Any, first: bool,
           buckets: SharedBuckets | None, siblings: Siblings, parent: int) -> None:
    """One server process. It ends with the supervisor, and in a process group of its own, so a
    terminal's Ctrl-C reaches the supervisor alone, which stops each process once, by SIGTERM."""
    _die_with_parent()
    os.setpgid(0, 0)
    if os.getppid() != parent:  # the supervisor died before the line above took effect
        os._exit(1)
    sock = _bind(family, address)
    if first:
        sock.listen(2048)  # at once: /healthz answers while the model loads; else once it is warm
    code = serve(settings, sock=sock, buckets=buckets, siblings=siblings, load_first=not first)
    raise SystemExit(STARTUP_FAILED if code == 1 else code)


def _die_with_parent() -> None:
    """SIGTERM this process when the supervisor exits, however it exits (Linux prctl)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
