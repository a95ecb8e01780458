"""The docs pages work offline (every script, style and icon they load is served here), and HEAD
is answered wherever GET is."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from service.process.app import create_app
from service.settings import Settings


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    return create_app(Settings(data_dir=Path(tmp_path_factory.mktemp("docs"))))  # the model never loads


def fetch(app: FastAPI, method: str, *paths: str) -> list[httpx.Response]:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://app") as client:
            return [await client.request(method, path) for path in paths]
    return asyncio.run(run())


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_a_docs_page_loads_only_this_servers_files_and_each_of_them_answers(app: FastAPI, page: str) -> None:
    (response,) = fetch(app, "GET", page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", response.text)
    urls += re.findall(r"""(?:url|spec-url)\s*[:=]\s*["']([^"']+)["']""", response.text)
    assert urls and all(url.startswith("/") and not url.startswith("//") for url in urls), urls
    assert "/openapi.json" in urls
    assets = fetch(app, "GET", *urls)
    assert [r.status_code for r in assets] == [200] * len(urls), dict(zip(urls, assets, strict=True))
    assert all(len(r.content) > 0 for r in assets)


def test_only_the_listed_docs_assets_are_served(app: FastAPI) -> None:
    (missing, escape) = fetch(app, "GET", "/docs-assets/nothing.js", "/docs-assets/..%2F__init__.py")
    assert missing.status_code == 404 and escape.status_code == 404


def test_the_docs_pages_stay_out_of_the_openapi_schema(app: FastAPI) -> None:
    paths = app.openapi()["paths"]
    assert not any(path.startswith(("/docs", "/redoc")) for path in paths)
    assert not any("head" in operations for operations in paths.values())


@pytest.mark.parametrize("path", ["/", "/static/app.js", "/healthz", "/docs", "/docs-assets/swagger-ui.css",
                                  "/openapi.json", "/v2", "/v2/health/live"])
def test_head_answers_as_get_without_the_body(app: FastAPI, path: str) -> None:
    (get,) = fetch(app, "GET", path)
    (head,) = fetch(app, "HEAD", path)
    assert (head.status_code, get.status_code) == (200, 200)
    assert head.content == b"" and head.headers.get("content-type") == get.headers.get("content-type")
    assert head.headers.get("content-length") == get.headers.get("content-length")


def test_head_of_a_route_without_get_is_a_405_naming_its_methods(app: FastAPI) -> None:
    (response,) = fetch(app, "HEAD", "/v1/classify")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
