"""Several server processes on one port (METANET_PROCESSES, service/process/supervisor.py), started for
real: one task store, one rate limit, one /metrics, whichever process a connection reaches; a
process that dies is replaced; SIGTERM, a failed start and a taken port end them all.

Each request here goes on a connection of its own, so the kernel spreads them over the processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from api_tests.harness import descendants, parent_of
from api_tests.helpers import QUERIES, REPO, Server, as_matrix, assert_error, examples, metrics, png, running

FRESH = 24  # requests on fresh connections: all 24 reach one of 2 processes with p = 2 ** -23


def server_children(server: Server) -> list[int]:
    """The server processes (the supervisor's other child is multiprocessing's resource tracker)."""
    def cmdline(pid: int) -> bytes:
        with contextlib.suppress(OSError):
            return Path(f"/proc/{pid}/cmdline").read_bytes()
        return b""

    return [p for p in descendants(server.pid)
            if parent_of(p) == server.pid and b"resource_tracker" not in cmdline(p)]


def state(pid: int) -> str:
    """A process's state letter from /proc (Z: a zombie, its sockets closed)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def listening_inodes(server: Server) -> set[str]:
    """The sockets in LISTEN state on the server's port (the supervisor's own never listens)."""
    port = f":{server.port:04X}"
    return {line.split()[9] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
            if line.split()[1].endswith(port) and line.split()[3] == "0A"}  # 0A: LISTEN


def all_listening(server: Server) -> bool:
    """Do two server processes hold a listening socket on the server's port?"""
    inodes = listening_inodes(server)
    holders = 0
    for pid in server_children(server):
        fds = Path(f"/proc/{pid}/fd")
        with contextlib.suppress(OSError):
            links = {os.readlink(fd) for fd in fds.iterdir()}
            holders += any(f"socket:[{inode}]" in links for inode in inodes)
    return holders == 2


def fresh(server: Server, method: str, path: str, **kwargs) -> httpx.Response:
    with httpx.Client(base_url=server.url, timeout=120) as client:  # a new connection
        return client.request(method, path, **kwargs)


def eventually(check, timeout: float = 30.0):
    """check() until it returns a true value (the processes publish their live figures every second)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


@contextlib.contextmanager
def serving(server: Server) -> Iterator[Server]:
    yield from running(server)


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("two") / "data"
    yield from running(Server(data, processes=2, rate_limit_per_s=0.001, rate_limit_burst=400))


def test_two_processes_serve_one_port_and_say_ready_only_when_both_are(two: Server) -> None:
    assert len(server_children(two)) == 2
    assert fresh(two, "GET", "/readyz").status_code == 200
    with two.client() as client:
        assert metrics(client)["metanet_server_processes"] == 2


def test_the_supervisor_says_once_where_the_service_listens(two: Server) -> None:
    lines = [json.loads(line)["message"] for line in two.log_path.read_text().splitlines()
             if "listening on" in line]
    assert lines == [f"MetaNet service listening on {two.url} (docs at /docs, demo at /), 2 server processes"]


def test_a_task_registered_through_one_process_classifies_alike_through_any(two: Server) -> None:
    kinds = ("circle", "cross", "triangle")
    created = fresh(two, "POST", "/v1/tasks", json={"examples": examples(kinds)})
    assert created.status_code == 201, created.text
    task = created.json()
    path = f"/v1/tasks/{task['task_id']}/classify"
    time.sleep(1.5)  # every process has published its figures since the task was registered
    with two.client() as client:
        before = metrics(client)
    answers = [fresh(two, "POST", path, json={"images": QUERIES, "top_k": 3}) for _ in range(FRESH)]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    probs = [as_matrix(a.json()["predictions"], task["labels"]) for a in answers]
    for p in probs[1:]:
        np.testing.assert_allclose(p, probs[0], atol=1e-6)
    assert [p["label"] for p in answers[0].json()["predictions"]] == list(kinds)

    def counted() -> dict[str, float] | None:
        with two.client() as client:
            after = metrics(client)
        key = 'metanet_http_requests_total{method="POST",route="/v1/tasks/{task_id}/classify",status="200"}'
        # /metrics adds up both processes: every request counted once, whichever served it; the
        # process that did not register the task rebuilt its memory once (a cache miss).
        misses = after["metanet_cache_misses_total"] - before.get("metanet_cache_misses_total", 0)
        return after if after[key] - before.get(key, 0) == FRESH and misses == 1 else None

    assert eventually(counted), "the other process never rebuilt the task, or /metrics missed requests"


def test_a_delete_through_one_process_is_seen_by_every_process(two: Server) -> None:
    task = fresh(two, "POST", "/v1/tasks", json={"examples": examples(("square", "zigzag"))}).json()
    path = f"/v1/tasks/{task['task_id']}/classify"
    for _ in range(8):  # both processes now hold its memory (each in its own cache)
        assert fresh(two, "POST", path, json={"images": QUERIES[:1]}).status_code == 200
    assert fresh(two, "DELETE", f"/v1/tasks/{task['task_id']}").status_code == 204
    for _ in range(FRESH):
        assert_error(fresh(two, "POST", path, json={"images": QUERIES[:1]}), 404, "task_not_found")


def test_examples_added_through_one_process_are_used_by_every_process(two: Server) -> None:
    task = fresh(two, "POST", "/v1/tasks", json={"examples": examples(("circle", "cross"))}).json()
    path = f"/v1/tasks/{task['task_id']}/classify"
    for _ in range(8):
        assert fresh(two, "POST", path, json={"images": QUERIES[:1]}).status_code == 200
    grown = fresh(two, "POST", f"/v1/tasks/{task['task_id']}/examples", json={"examples": examples(("bar",))})
    assert grown.status_code == 200, grown.text
    for _ in range(FRESH):
        answer = fresh(two, "POST", path, json={"images": [png("bar", shift=(2, 1))], "top_k": 3})
        assert answer.status_code == 200
        assert {e["label"] for e in answer.json()["predictions"][0]["top_k"]} == {"circle", "cross", "bar"}


def test_the_rate_limit_is_one_for_all_processes(tmp_data: Path) -> None:
    burst = 6
    with serving(Server(tmp_data, processes=2, rate_limit_per_s=0.001, rate_limit_burst=burst)) as server:
        codes = [fresh(server, "GET", "/v1/model").status_code for _ in range(FRESH)]
    assert codes.count(200) == burst and codes.count(429) == FRESH - burst, codes


def test_a_killed_process_is_replaced_and_the_other_keeps_serving(tmp_data: Path) -> None:
    with serving(Server(tmp_data, processes=2)) as server:
        task = fresh(server, "POST", "/v1/tasks", json={"examples": examples(("circle", "cross"))}).json()
        path = f"/v1/tasks/{task['task_id']}/classify"
        first = server_children(server)
        os.kill(first[0], signal.SIGKILL)  # as the OOM killer would
        # Connections queued on its socket as it died are lost (reset); once its socket is closed
        # new ones reach the other. A zombie is not enough: its main thread turns Z while the
        # others are still exiting, and the descriptors they share close with the last of them
        # (CI once sent a request in that window and had it reset).
        assert eventually(lambda: not Path(f"/proc/{first[0]}").exists() or state(first[0]) == "Z")
        assert eventually(lambda: len(listening_inodes(server)) == 1)
        # Until the replacement is loaded and warm it does not listen: every request, the model's
        # included, reaches the live process and is answered, before, while and after it loads.
        statuses, deadline = [], time.monotonic() + 180
        while len(statuses) < 3 * FRESH or not all_listening(server):
            assert time.monotonic() < deadline, "the replacement never listened"
            statuses.append(fresh(server, "POST", path, json={"images": QUERIES[:1]}).status_code)
            statuses.append(fresh(server, "GET", "/readyz").status_code)
        query = {"images": QUERIES[:1]}
        statuses += [fresh(server, "POST", path, json=query).status_code for _ in range(FRESH)]
        assert set(statuses) == {200}, statuses
        assert first[0] not in server_children(server)
        with server.client() as client:
            assert eventually(lambda: metrics(client)["metanet_server_processes"] == 2)
        assert "starting another" in server.log_path.read_text()


def test_sigterm_stops_every_process_with_the_signal_as_status(tmp_data: Path) -> None:
    server = Server(tmp_data, processes=2).start()
    pids = server_children(server)
    assert server.stop() == -signal.SIGTERM
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or state(pid) == "Z"


def test_a_process_that_cannot_start_stops_them_all_with_status_1(tmp_data: Path, tmp_path: Path) -> None:
    empty = tmp_path / "no-weights-here"
    empty.mkdir()
    server = Server(tmp_data, processes=2, checkpoint=empty).start(wait=False)
    assert server.process is not None
    assert server.process.wait(timeout=180) == 1
    log = server.log_path.read_text()
    assert "no-weights-here" in log and "failed to start" in log, log[-2000:]


def test_a_taken_port_is_refused_once_with_status_1(tmp_data: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = Server(tmp_data, processes=2)
        server.port = taken.getsockname()[1]
        server.url = f"http://127.0.0.1:{server.port}"
        server.start(wait=False)
        assert server.process is not None
        assert server.process.wait(timeout=60) == 1
    assert "cannot listen on 127.0.0.1" in server.log_path.read_text()


def test_a_port_held_by_another_supervisor_is_refused_too(two: Server, tmp_data: Path) -> None:
    # The running one's sockets allow SO_REUSEPORT: a second server of this kind must not join it.
    second = Server(tmp_data, processes=2)
    second.port, second.url = two.port, two.url
    second.start(wait=False)
    assert second.process is not None
    assert second.process.wait(timeout=60) == 1
    assert "cannot listen on 127.0.0.1" in second.log_path.read_text()
    assert fresh(two, "GET", "/readyz").status_code == 200


@pytest.mark.parametrize(("flag", "says"), [
    ("-1", "processes"), ("65", "processes"), ("two", "invalid int value: 'two'"),
    ("1.5", "invalid int value"),
])
def test_a_nonsense_process_count_is_refused_before_anything_starts(tmp_data: Path, flag: str, says: str):
    done = subprocess.run([sys.executable, "-m", "service", "--processes", flag, "--data-dir", str(tmp_data)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert says in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not tmp_data.exists() or not any(tmp_data.iterdir())  # no store was opened
