"""Fuzzing: Schemathesis against the served OpenAPI schema, every operation, valid and invalid data.

Passes only with no 5xx and no response that breaks the documented schema (status code, content
type, headers, body), and with every schema-invalid request refused; at least 500 requests reach
the server. Dictionaries seed the generator with real task ids (the key's own and another key's)
and decodable images, so generated requests also get past validation into the model.

Not checked: `positive_data_acceptance`. A schema cannot say "a decodable image" or "at least two
distinct labels", so schema-valid requests are rightly refused with 422 by design.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api_tests.helpers import Server, b64, encode, examples, glyph

KEY, OTHER_KEY = "fuzz-key-3f9a", "other-key-8c1d"
MAX_EXAMPLES = 25  # per operation and phase: ~800 test cases, ~1 min on two busy cores
MIN_REQUESTS = 500
CHECKS = [
    "not_a_server_error", "status_code_conformance", "content_type_conformance",
    "response_headers_conformance", "response_schema_conformance", "negative_data_rejection",
    "missing_required_header", "unsupported_method", "allow_header_conformance", "use_after_free",
    "ensure_resource_availability", "ignored_auth",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("fuzz") / "data", api_keys=f"{KEY},{OTHER_KEY}")
    try:
        yield server.start()
    finally:
        server.stop()


def seed_tasks(server: Server) -> list[str]:
    """Task ids for the generator: several of the fuzzing key's own, and one of another key."""
    ids = []
    for key in (KEY,) * 6 + (OTHER_KEY,):
        with server.client(headers={"Authorization": f"Bearer {key}"}) as client:
            response = client.post("/v1/tasks", json={"examples": examples(("circle", "cross", "square"))})
            assert response.status_code == 201, response.text
            ids.append(response.json()["task_id"])
    return ids


def config(task_ids: list[str]) -> str:
    images = [b64(encode(glyph(kind, size=28, stroke=2))) for kind in ("circle", "cross", "square", "bar")]
    bindings = [("path.task_id", "task_ids", 0.8)]
    bindings += [(f"body.{p}", "images", 0.7) for p in ("examples[*].image", "support[*].image", "images[*]")]
    bindings += [(f"body.{p}", "labels", 0.7) for p in ("examples[*].label", "support[*].label")]
    lines = ["[generation]", 'database = "none"', "", "[parameters]"]
    lines += [f'"{key}" = {{ dictionary = "{name}", probability = {p} }}' for key, name, p in bindings]
    for name, values in (("task_ids", task_ids), ("images", images), ("labels", ["alpha", "beta", "gamma"])):
        lines += ["", f"[dictionaries.{name}]", f"values = {json.dumps(values)}"]
    return "\n".join(lines) + "\n"


def requests_by_status(server: Server) -> dict[str, float]:
    with server.client() as client:
        text = client.get("/metrics").text
    counts: dict[str, float] = {}
    for status, value in re.findall(r'^metanet_http_requests_total\{.*status="(\d+)"\} (\S+)$', text, re.M):
        counts[status] = counts.get(status, 0) + float(value)
    return counts


@pytest.mark.slow
def test_schemathesis_finds_no_5xx_and_no_schema_violation(server: Server, tmp_path: Path) -> None:
    (tmp_path / "schemathesis.toml").write_text(config(seed_tasks(server)))
    before = requests_by_status(server)
    report = tmp_path / "report.json"
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--no-color", "--config-file", "schemathesis.toml", "run",
         f"{server.url}/openapi.json", "--header", f"Authorization: Bearer {KEY}",
         "--checks", ",".join(CHECKS), "--mode", "all", "--phases", "examples,coverage,fuzzing,stateful",
         "--max-examples", str(MAX_EXAMPLES), "--seed", "20261126", "--workers", "1",
         "--request-timeout", "60", "--report", "json", "--report-json-path", str(report)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    output = run.stdout[-20000:] + run.stderr[-5000:]
    assert run.returncode == 0, output
    result: dict[str, Any] = json.loads(report.read_text())
    assert result["failures"] == [] and result["errors"] == [], output
    assert result["operations"]["tested"] == result["operations"]["total"] == 11, result["operations"]
    assert result["test_cases"]["generated"] >= MIN_REQUESTS, result["test_cases"]

    after = requests_by_status(server)
    sent = {status: after.get(status, 0) - before.get(status, 0) for status in after}
    assert sum(sent.values()) >= MIN_REQUESTS, sent
    assert not [status for status, n in sent.items() if status.startswith("5") and n], sent
    assert sent.get("200", 0) and sent.get("201", 0) and sent.get("204", 0), sent  # the model was reached
    assert "Traceback" not in server.log_path.read_text()
