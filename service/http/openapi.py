"""The served OpenAPI schema, completed with what FastAPI cannot infer from the routes: the
bearer scheme (only when keys are configured) and the X-Request-ID header every response carries.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from service.http.request_log import REQUEST_ID_HEADER
from service.settings import Settings

_REQUEST_ID = {"description": "the request's id: the client's own if sane, else a fresh one",
               "required": True, "schema": {"type": "string"}}


def document(app: FastAPI, settings: Settings) -> None:
    """Replace `app.openapi` with one that completes FastAPI's schema (once, then cached)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _complete(build(), settings)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def _complete(schema: dict[str, Any], settings: Settings) -> None:
    protected = [*(["/v1/"] if settings.api_keys else []), *(["/metrics"] if settings.metrics_keys else [])]
    if protected:
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "an API key"}
        }
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            for response in operation["responses"].values():
                response.setdefault("headers", {})[REQUEST_ID_HEADER] = _REQUEST_ID
            if any(path.startswith(prefix) for prefix in protected):
                operation["security"] = [{"bearer": []}]
