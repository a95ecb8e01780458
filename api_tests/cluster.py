"""The scale-out layout of docker/compose.yaml on loopback: its Redis (same command line), replicas
of the service (same environment) and nginx (same nginx.conf), each a real process on a free port.

Only the addresses change: compose's service names become 127.0.0.1 and free ports.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from api_tests.helpers import REPO, Server, free_port

COMPOSE = REPO / "docker" / "compose.yaml"
NGINX_CONF = REPO / "docker" / "nginx.conf"
# Set per process here: where to listen, which store, and CPU only (the test machine has no GPU).
_OWN_SETTINGS = {"METANET_HOST", "METANET_PORT", "METANET_STORE_URL", "METANET_DEVICE"}


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def require(binary: str) -> str:
    path = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")  # nginx: /usr/sbin
    if path is None:
        pytest.skip(f"{binary} is not installed (.ci/run installs it with apt-get)")
    return path


class RedisServer:
    """compose's `redis` service: its command, on a free port, its files in `data_dir`."""

    def __init__(self, data_dir: Path) -> None:
        self.binary = require("redis-server")
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        command = compose()["services"]["redis"]["command"]
        assert command[0] == "redis-server", command
        self.args = [*command[1:], "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(data_dir)]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / "redis.log", "ab") as log:
            self.process = subprocess.Popen([self.binary, *self.args], stdout=log, stderr=subprocess.STDOUT)
        _wait_for(lambda: _redis_ping(self.port), what=f"redis on {self.port}", process=self.process)
        return self

    def kill(self) -> None:
        """SIGKILL: Redis gets no chance to flush anything."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)


class Nginx:
    """docker/nginx.conf with the replicas' loopback addresses, as a foreground process."""

    def __init__(self, work_dir: Path, upstreams: list[Server], replica_port: int) -> None:
        self.binary = require("nginx")
        self.work_dir = work_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.conf = work_dir / "nginx.conf"
        self.access_log = work_dir / "access.log"
        self.error_log = work_dir / "error.log"
        self.upstreams = upstreams
        self.replica_port = replica_port
        self.process: subprocess.Popen[bytes] | None = None

    def render(self) -> str:
        text = NGINX_CONF.read_text()
        text, listens = re.subn(r"^(\s*)listen 8080;", rf"\1listen 127.0.0.1:{self.port};", text, flags=re.M)
        assert listens == 1, "docker/nginx.conf should listen on 8080, compose's published port"
        ports = iter(server.port for server in self.upstreams)

        def upstream(match: re.Match[str]) -> str:
            return f"server 127.0.0.1:{next(ports)}{match.group(2)};"  # `resolve` needs compose's DNS

        text, servers = re.subn(rf"server metanet-(\d+):{self.replica_port}(.*?) resolve;", upstream, text)
        assert servers == len(self.upstreams), "one upstream server line per compose replica"
        temp = "\n".join(f"    {kind}_temp_path {self.work_dir / kind};"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        return text.replace("http {\n", f"http {{\n{temp}\n", 1)

    def start(self) -> Nginx:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.render())
        # As root, nginx's workers would otherwise run as nobody, who cannot write its temp files here.
        user = "user root;" if os.geteuid() == 0 else ""
        globals_ = f"daemon off; pid {self.work_dir / 'nginx.pid'}; {user}"
        with open(self.access_log, "ab") as out, open(self.error_log, "ab") as err:
            self.process = subprocess.Popen(
                [self.binary, "-p", str(self.work_dir), "-c", str(self.conf), "-e", str(self.error_log),
                 "-g", globals_],
                stdout=out, stderr=err,
            )
        _wait_for(self._answers, what=f"nginx on {self.port}", process=self.process)
        return self

    def _answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def upstream_of(self, path_suffix: str) -> set[str]:
        """The replicas (host:port) that answered the logged requests whose path ends so (the last
        one tried, when nginx moved on from a failed one)."""
        seen = set()
        for line in self.access_log.read_text().splitlines():
            match = re.search(r'"\S+ (\S+) HTTP/[\d.]+" \d+ .* upstream=(.+?) upstream_status=', line)
            if match and match.group(1).endswith(path_suffix):
                seen.add(match.group(2).split(", ")[-1])
        return seen

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: finish the requests in flight
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def replica_settings() -> dict[str, str]:
    """The replicas' environment in compose (METANET_* only), less what each process sets itself."""
    service = compose()["services"]["metanet-1"]
    return {key.removeprefix("METANET_").lower(): str(value)
            for key, value in service["environment"].items()
            if key.startswith("METANET_") and key not in _OWN_SETTINGS}


def replica_port() -> int:
    return int(compose()["services"]["metanet-1"]["environment"]["METANET_PORT"])


def _redis_ping(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _wait_for(ready, what: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what}: exited with {process.returncode}")
        if ready():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not ready after {timeout} s")
