"""The real service as a subprocess, for the black-box tests and the load commands in bench/: start
it on a free port with its own data directory, wait for /readyz, read its memory and processes, stop
it; and `LeanClient`, a load generator's HTTP/1.1 connection.

Nothing here imports `service` or `model`: the server is reached over HTTP only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
# What a caller's METANET_* environment may still set on a hermetic server: weights (so candidate
# weights can be judged before they ship) and the thread count (so a busy machine can keep the
# servers to fewer cores).
PASSED_THROUGH = ("METANET_CHECKPOINT", "METANET_TORCH_THREADS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """`python -m service` on a free port with its own data directory.

    `settings` become METANET_* variables (None values are left out). A hermetic server takes no
    other METANET_* variable from the caller's environment than PASSED_THROUGH; otherwise they
    all reach it. Unless set either way, the server runs on the CPU, logs warnings and up, and
    with MALLOC_ARENA_MAX=2 as the container does, so resident-memory readings are about the
    service (see bench/README.md, the soak section).
    """

    def __init__(self, data_dir: Path, log_path: Path, settings: Mapping[str, Any] | None = None,
                 *, hermetic: bool = True) -> None:
        self.data_dir, self.log_path = data_dir, log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items()
               if not hermetic or not k.startswith("METANET_") or k in PASSED_THROUGH}
        env.setdefault("METANET_DEVICE", "cpu")
        env.setdefault("METANET_LOG_LEVEL", "warning")
        env.setdefault("MALLOC_ARENA_MAX", "2")
        env.update({f"METANET_{k.upper()}": str(v) for k, v in (settings or {}).items() if v is not None})
        env["METANET_DATA_DIR"] = str(data_dir)
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.statuses_before_ready: list[int] = []

    @property
    def settings(self) -> dict[str, str]:
        """The METANET_* variables it runs with, but for its data directory."""
        return {k: v for k, v in self.env.items() if k.startswith("METANET_") and k != "METANET_DATA_DIR"}

    @property
    def pid(self) -> int:
        assert self.process is not None, "the server was never started"
        return self.process.pid

    def start(self, wait: bool = True, timeout: float = 300) -> ServiceProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 300) -> None:
        """Poll /readyz until 200, noting every other status seen on the way."""
        assert self.process is not None, "the server was never started"
        wait_ready(self.url, self.process, timeout, self.log_tail, self.statuses_before_ready.append)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (a clean stop); SIGKILL only if it hangs. Returns the exit status."""
        assert self.process is not None, "the server was never started"
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash or an OOM kill."""
        assert self.process is not None, "the server was never started"
        self.process.kill()
        self.process.wait()

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def log_tail(self, n: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def wait_ready(url: str, process: subprocess.Popen[Any], timeout: float, log_tail: Callable[[], str],
               on_status: Callable[[int], object] = lambda status: None, interval: float = 0.2) -> None:
    """Poll url/readyz until 200 while `process` (the server, or what runs it) lives; other
    statuses go to on_status. RuntimeError, with the log's tail, if it exits or times out."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=5) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}:\n{log_tail()}")
            try:
                status = client.get("/readyz").status_code
            except httpx.TransportError:
                time.sleep(interval)
                continue
            if status == 200:
                return
            on_status(status)
            time.sleep(interval)
    raise RuntimeError(f"the server was not ready after {timeout} s:\n{log_tail()}")


def parent_of(pid: int) -> int:
    """A process's parent pid from /proc (0 once it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except OSError:
        return 0


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, theirs, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            children.setdefault(parent_of(int(entry.name)), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def parse_metrics(text: str) -> dict[str, float]:
    """The metanet_* samples of a /metrics page by name, labels included as written
    (`metanet_dropped_total{reason="deadline"}`); counters under their _total names."""
    return {name: float(value) for line in text.splitlines()
            if line.startswith("metanet_") for name, value in [line.rsplit(" ", 1)]}


class LeanClient:
    """One keep-alive HTTP/1.1 connection over asyncio streams, for load generators.

    httpx spends about a millisecond of CPU on each request, CPU that a server sharing the
    machine's cores then lacks. This client writes each
    request in one piece and reads the status line, the headers and a Content-Length or chunked
    body, nothing more. Plain http only; it reconnects after an error or a `Connection: close`.
    """

    def __init__(self, url: str, timeout: float) -> None:
        parts = httpx.URL(url)
        if parts.scheme != "http":
            raise ValueError(f"LeanClient speaks plain http only, not {parts.scheme}")
        self.host, self.port = parts.host, parts.port or 80
        self.timeout = timeout
        self._reader: Any = None
        self._writer: Any = None

    async def post(self, path: str, body: bytes,
                   content_type: str = "application/json") -> tuple[int, dict[str, str], bytes]:
        """(status, headers with lower-case names, body). Raises OSError, EOFError-like
        asyncio.IncompleteReadError or TimeoutError; the connection is then dropped."""
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
        try:
            async with asyncio.timeout(self.timeout):
                if self._writer is not None and self._reader.at_eof():  # the server closed it while idle
                    await self.close()
                if self._writer is None:
                    self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
                self._writer.write(head + body)
                status, headers, data = await self._read_response()
        except BaseException:
            await self.close()
            raise
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, headers, data

    async def _read_response(self) -> tuple[int, dict[str, str], bytes]:
        line = await self._reader.readuntil(b"\r\n")
        version, _, rest = line.decode("latin-1").partition(" ")
        if not version.startswith("HTTP/1."):
            raise ConnectionError(f"not an HTTP/1.x status line: {line[:80]!r}")
        status = int(rest.split(" ", 1)[0])
        headers: dict[str, str] = {}
        while (line := await self._reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            chunks = []
            while size := int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16):
                chunks.append(await self._reader.readexactly(size + 2))  # the chunk and its CRLF
            while await self._reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return status, headers, b"".join(chunk[:-2] for chunk in chunks)
        return status, headers, await self._reader.readexactly(int(headers.get("content-length", 0)))

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def __aenter__(self) -> LeanClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
