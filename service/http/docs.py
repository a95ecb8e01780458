"""The API's documentation pages, /docs (Swagger UI) and /redoc (ReDoc), over /openapi.json, their
scripts and styles served from /docs-assets/ (the files of the fastapi-offline wheel), so the pages
work without internet access."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from service.errors import NotFound

ASSETS = Path(str(importlib.resources.files("fastapi_offline") / "static"))
FILES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
         "redoc.standalone.js": "text/javascript", "favicon.png": "image/png"}
_PREFIX = "/docs-assets"

docs = APIRouter(include_in_schema=False)


@docs.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    root = _root(request)
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}", title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{root}{_PREFIX}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{_PREFIX}/swagger-ui.css", swagger_favicon_url=f"{root}{_PREFIX}/favicon.png",
    )


@docs.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    root = _root(request)
    return get_redoc_html(
        openapi_url=f"{root}{request.app.openapi_url}", title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}{_PREFIX}/redoc.standalone.js", redoc_favicon_url=f"{root}{_PREFIX}/favicon.png",
        with_google_fonts=False,
    )


@docs.get(_PREFIX + "/{name}")
async def asset(name: str) -> FileResponse:
    if name not in FILES:  # a fixed list: no path from the request ever reaches the file system
        raise NotFound(f"no documentation asset {name!r}")
    return FileResponse(ASSETS / name, media_type=FILES[name], headers={"Cache-Control": "max-age=86400"})


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")
