"""The demo page at `/`: static HTML, CSS and JavaScript from service/http/static/, no build step, nothing
fetched from elsewhere (its Content-Security-Policy allows this origin only), so it works offline.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.errors import NotFound

STATIC = Path(__file__).resolve().parent / "static"
FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
# data: and blob: for the canvases' PNGs and uploaded images shown as thumbnails.
_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")

demo = APIRouter(include_in_schema=False)


@demo.get("/")
async def index() -> FileResponse:
    return _file("index.html")


@demo.get("/static/{name}")
async def static(name: str) -> FileResponse:
    if name not in FILES:  # a fixed list: no path from the request ever reaches the file system
        raise NotFound(f"no static file {name!r}")
    return _file(name)


def _file(name: str) -> FileResponse:
    return FileResponse(STATIC / name, media_type=FILES[name],
                        headers={"Content-Security-Policy": _CSP, "Cache-Control": "no-cache",
                                 "X-Content-Type-Options": "nosniff"})
