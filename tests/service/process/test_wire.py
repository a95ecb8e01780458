"""A response leaves in one send: uvicorn's real protocol over a recording transport."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from service.process.wire import OneSendHttpProtocol, TurnBufferedTransport


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        assert not self.closed, "a write after close"
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def abort(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)


async def json_app(scope: dict, receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    body = b'{"ok": true}'
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


async def answer(request: bytes) -> RecordingTransport:
    config = uvicorn.Config(json_app, http=OneSendHttpProtocol, log_config=None, lifespan="off")
    config.load()
    protocol = OneSendHttpProtocol(config=config, server_state=ServerState(), app_state={},
                                   _loop=asyncio.get_running_loop())
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(request)
    for _ in range(50):
        await asyncio.sleep(0.01)
        if transport.writes:
            break
    await asyncio.sleep(0.02)
    return transport


def test_a_responses_headers_and_body_leave_in_one_send() -> None:
    transport = asyncio.run(answer(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"))
    assert len(transport.writes) == 1, transport.writes
    head, _, body = transport.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and body == b'{"ok": true}'
    assert not transport.closed  # keep-alive


def test_a_connection_close_response_is_sent_before_the_close() -> None:
    transport = asyncio.run(answer(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"))
    assert len(transport.writes) == 1 and transport.writes[0].endswith(b'{"ok": true}')
    assert transport.closed


def test_a_malformed_request_still_gets_its_400() -> None:
    transport = asyncio.run(answer(b"NOT HTTP AT ALL\r\n\r\n"))
    assert len(transport.writes) == 1 and transport.writes[0].startswith(b"HTTP/1.1 400")
    assert transport.closed


def test_writes_of_one_turn_are_joined_and_later_turns_sent_apart() -> None:
    async def scenario() -> list[bytes]:
        inner = RecordingTransport()
        outer = TurnBufferedTransport(inner, asyncio.get_running_loop())
        outer.write(b"a")
        outer.write(memoryview(b"b"))
        outer.write(b"")
        assert inner.writes == [] and outer.get_write_buffer_size() == 2
        await asyncio.sleep(0)
        outer.write(b"c")
        await asyncio.sleep(0)
        outer.write(b"lost")  # the peer went away: nothing is written to a closing transport
        inner.closed = True
        await asyncio.sleep(0)
        return inner.writes

    assert asyncio.run(scenario()) == [b"ab", b"c"]
