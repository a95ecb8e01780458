"""api_tests.harness.LeanClient, the serving benchmark's load-generating client, against the real
server: it must read exactly what httpx reads (statuses, headers, bodies), keep its connection
alive across requests, and recover from a connection the other side closed.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from api_tests.harness import LeanClient, free_port
from api_tests.helpers import GLYPHS, Server, png, registered, running

NEVER = "0123456789abcdef0123456789abcdef"  # a task id no one has


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from running(Server(tmp_path_factory.mktemp("lean-client") / "data"))


@pytest.fixture(scope="module")
def task(server: Server) -> dict[str, Any]:
    return registered(server, GLYPHS)


def test_it_reads_what_httpx_reads_over_one_connection(server: Server, task: dict[str, Any]) -> None:
    path = f"/v1/tasks/{task['task_id']}/classify"
    bodies = [json.dumps({"images": [png(kind)], "top_k": 2}).encode() for kind in GLYPHS]
    bad = json.dumps({"images": ["not base64!"]}).encode()

    async def scenario() -> list[tuple[int, dict[str, str], bytes]]:
        async with LeanClient(server.url, timeout=60) as client:
            answers = [await client.post(path, body) for body in [*bodies, bad]]
            answers.append(await client.post(f"/v1/tasks/{NEVER}/classify", bodies[0]))
            writer = client._writer
            answers.append(await client.post(path, bodies[0]))
            assert client._writer is writer  # the same keep-alive connection throughout
            return answers

    answers = asyncio.run(scenario())
    with server.client() as httpx_client:
        for (status, headers, body), request in zip(answers[:len(GLYPHS)], bodies, strict=True):
            want = httpx_client.post(path, content=request, headers={"Content-Type": "application/json"})
            assert (status, json.loads(body)) == (want.status_code, want.json())
            assert headers["content-type"] == "application/json"
            assert int(headers["content-length"]) == len(body)
            assert json.loads(body)["predictions"][0]["label"] in GLYPHS
    status, _, body = answers[len(GLYPHS)]
    assert status == 422 and json.loads(body)["error"]["details"]["field"] == "images[0]"
    status, _, body = answers[len(GLYPHS) + 1]
    assert status == 404 and json.loads(body)["error"]["type"] == "task_not_found"
    assert answers[-1][0] == 200


def test_it_reads_a_chunked_body_and_reconnects_after_a_close() -> None:
    """A tiny HTTP/1.1 server that answers once chunked, with Connection: close."""
    port = free_port()
    served: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        served.append(await reader.readexactly(length))
        writer.write(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nTransfer-Encoding: chunked\r\n"
                     b"Connection: close\r\n\r\n5\r\nhello\r\n7;x=1\r\n, world\r\n0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def scenario() -> list[tuple[int, dict[str, str], bytes]]:
        listener = await asyncio.start_server(handle, "127.0.0.1", port, family=socket.AF_INET)
        async with listener, LeanClient(f"http://127.0.0.1:{port}", timeout=10) as client:
            return [await client.post("/x", b"first"), await client.post("/x", b"second")]

    answers = asyncio.run(scenario())
    assert served == [b"first", b"second"]
    for status, headers, body in answers:
        assert (status, headers["retry-after"], body) == (429, "3", b"hello, world")


def test_it_refuses_https() -> None:
    with pytest.raises(ValueError, match="plain http"):
        LeanClient("https://example.org", timeout=1)
