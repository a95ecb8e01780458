"""Structured logs: the JSON formatter, and one line per request with an echoed X-Request-ID."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path

import httpx
import pytest

from service.process.app import create_app
from service.process.logs import JsonFormatter
from service.settings import Settings


def record(message: str = "hello", **extra: object) -> logging.LogRecord:
    rec = logging.makeLogRecord({"name": "service.test", "levelname": "INFO", "msg": message})
    rec.__dict__.update(extra)
    return rec


def test_a_record_is_one_json_line_with_its_extra_fields() -> None:
    line = JsonFormatter().format(record("a\nb", request_id="r1", status=200))
    assert "\n" not in line
    data = json.loads(line)
    assert data["message"] == "a\nb" and data["level"] == "info" and data["logger"] == "service.test"
    assert data["request_id"] == "r1" and data["status"] == 200
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", data["ts"])


def test_a_traceback_is_kept_inside_the_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec = record(exc_info=sys.exc_info())
    line = JsonFormatter().format(rec)
    assert "\n" not in line and "ValueError: boom" in json.loads(line)["exc"]


def requests(tmp_path: Path, *calls: tuple[str, str, dict[str, str]]) -> list[httpx.Response]:
    """Send requests to an app whose model never loads (httpx does not run the lifespan)."""
    app = create_app(Settings(data_dir=tmp_path, api_keys=("alice-secret-key",)))

    async def boom() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/boom", boom)

    async def main() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return [await client.request(method, path, headers=headers) for method, path, headers in calls]

    return asyncio.run(main())


@pytest.mark.parametrize(("sent", "kept"), [
    ("abc-123", True), ("trace:4f1c.9_z", True), ("a" * 128, True),
    ("a" * 129, False), ("has space", False), ("quote\"d", False), ("-leading-dash", False), ("", False),
])
def test_a_sane_client_request_id_is_echoed_and_anything_else_replaced(tmp_path, sent, kept) -> None:
    (response,) = requests(tmp_path, ("GET", "/healthz", {"x-request-id": sent}))
    echoed = response.headers["x-request-id"]
    if kept:
        assert echoed == sent
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", echoed)


def test_every_response_carries_a_request_id_errors_and_crashes_included(tmp_path: Path) -> None:
    alice = {"authorization": "Bearer alice-secret-key"}
    responses = requests(tmp_path, ("GET", "/v1/tasks", {}), ("GET", "/v1/tasks", alice),
                         ("GET", "/nowhere", {}), ("GET", "/boom", {"x-request-id": "crash-1"}))
    assert [r.status_code for r in responses] == [401, 503, 404, 500]
    ids = [r.headers["x-request-id"] for r in responses]
    assert len(set(ids)) == 4 and ids[-1] == "crash-1"
    assert responses[-1].json() == {"error": {"type": "internal_error", "message": "internal error",
                                              "details": None}}


def test_one_log_line_per_request_with_route_status_latency_task_and_owner_prefix(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="service.access")
    requests(tmp_path, ("GET", "/v1/tasks/abc123", {"authorization": "Bearer alice-secret-key",
                                                    "x-request-id": "req-7"}))
    (line,) = [r for r in caplog.records if r.name == "service.access"]
    fields = json.loads(JsonFormatter().format(line))
    assert fields["request_id"] == "req-7"
    assert fields["method"] == "GET" and fields["route"] == "/v1/tasks/{task_id}"
    assert fields["status"] == 503 and fields["task_id"] == "abc123"
    assert isinstance(fields["latency_ms"], float)
    assert re.fullmatch(r"[0-9a-f]{8}", fields["owner"])
    assert "alice-secret-key" not in caplog.text


def test_a_crash_is_logged_as_status_500(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="service.access")
    requests(tmp_path, ("GET", "/boom", {}))
    (line,) = [r for r in caplog.records if r.name == "service.access"]
    assert line.status == 500 and line.route == "/boom"
