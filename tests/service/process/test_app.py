"""The app factory's life cycle: probes before and after a failed model load."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import httpx

from service.process.app import create_app
from service.settings import Settings


def test_readyz_and_v1_answer_503_when_the_weights_cannot_be_loaded(tmp_path: Path) -> None:
    missing = tmp_path / "no-weights"
    missing.mkdir()
    app = create_app(Settings(data_dir=tmp_path / "data", checkpoint=missing, device="cpu"))

    async def scenario() -> None:
        # httpx's ASGI transport does not run the lifespan: run it around the requests ourselves.
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://app") as client:
                for _ in range(600):
                    if app.state.runtime.failure is not None:
                        break
                    await asyncio.sleep(0.05)
                assert (await client.get("/healthz")).status_code == 200
                for path in ("/readyz", "/v1/model", "/v1/tasks"):
                    response = await client.get(path)
                    assert response.status_code == 503, path
                    error = response.json()["error"]
                    assert error["type"] == "not_ready"
                    assert "startup failed" in error["message"] and "is missing" in error["message"]

    asyncio.run(scenario())


def test_settings_come_from_metanet_environment_variables(monkeypatch) -> None:
    monkeypatch.setenv("METANET_PORT", "9123")
    monkeypatch.setenv("METANET_API_KEYS", "k1, k2")
    monkeypatch.setenv("METANET_DATA_DIR", "/tmp/somewhere")
    settings = Settings()
    assert settings.port == 9123
    assert settings.api_keys == ("k1", "k2")
    assert settings.database_path == Path("/tmp/somewhere/tasks.sqlite3")
    assert Settings(port=1234).port == 1234  # explicit values (the CLI's flags) win


def test_what_startup_loaded_is_frozen_out_of_the_collectors_sight(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path / "data", device="cpu"))
    gc.unfreeze()
    try:
        async def scenario() -> None:
            async with app.router.lifespan_context(app):
                for _ in range(1200):
                    if app.state.runtime.tasks is not None or app.state.runtime.failure is not None:
                        break
                    await asyncio.sleep(0.05)
                assert app.state.runtime.tasks is not None, app.state.runtime.failure

        asyncio.run(scenario())
        assert gc.get_freeze_count() > 50_000  # the model, torch's and the service's modules
    finally:
        gc.unfreeze()
