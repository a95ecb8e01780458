"""Probes and metadata: /healthz, /readyz, /metrics, GET /v1/model."""

from __future__ import annotations

import re

import httpx

from api_tests.conftest import SERVER_SETTINGS
from api_tests.helpers import QUERIES


def test_healthz_returns_200(client: httpx.Client) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "alive"}


def test_readyz_returns_200_once_ready(client: httpx.Client) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


def test_model_reports_name_version_limits_backend_and_device(client: httpx.Client) -> None:
    model = client.get("/v1/model").json()
    assert model["name"] == "metanet"
    assert re.fullmatch(r"metanet-[0-9a-f]{12}", model["version"])
    # the heads hold 50 classes; weights trained on smaller episodes answer up to what they learnt
    assert 20 <= model["max_way"] <= 50
    assert model["max_examples"] == SERVER_SETTINGS["max_examples"]  # the configured cap
    assert model["image_size"] == 28
    assert model["backend"] == "torch"
    assert model["device"] == "cpu"


def test_metrics_count_requests_by_route_template_and_report_tasks_and_cache(client, sentinel) -> None:
    task_id = sentinel.tasks[0]["task_id"]
    client.post(f"/v1/tasks/{task_id}/classify", json={"images": QUERIES[:1]})
    client.get("/v1/tasks/does-not-exist")
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    counted = 'metanet_http_requests_total{method="POST",route="/v1/tasks/{task_id}/classify",status="200"}'
    assert counted in text
    assert 'route="/v1/tasks/{task_id}",status="404"' in text
    assert task_id not in text  # templates, never raw paths
    assert 'metanet_http_request_duration_seconds_bucket{le="0.1",method="POST",route="/v1/tasks"}' in text
    for name in ("metanet_tasks", "metanet_cache_bytes", "metanet_cache_hits_total",
                 "metanet_cache_misses_total", 'metanet_model_seconds_count{operation="register"}'):
        assert re.search(rf"^{re.escape(name)} \d", text, re.MULTILINE), name
    tasks = float(re.search(r"^metanet_tasks (\S+)", text, re.MULTILINE).group(1))
    assert tasks >= len(sentinel.tasks)
