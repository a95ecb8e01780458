"""Dependencies of the route handlers, as `Annotated` aliases."""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, Request

from service.errors import NotReady, Unauthorized
from service.runtime import Runtime
from service.settings import Settings
from service.tasks import TaskService


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_settings(runtime: RuntimeDep) -> Settings:
    return runtime.settings


def get_tasks(runtime: RuntimeDep) -> TaskService:
    if runtime.tasks is None:
        raise NotReady(runtime.failure or "the model is still loading; retry shortly",
                       headers={"Retry-After": "5"})
    return runtime.tasks


SettingsDep = Annotated[Settings, Depends(get_settings)]
TasksDep = Annotated[TaskService, Depends(get_tasks)]


def get_owner(request: Request, settings: SettingsDep) -> str:
    """Who is asking: '' when no API keys are configured, else a stable hash of the caller's key
    (the raw key is never stored)."""
    if not settings.api_keys:
        return ""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    challenge = {"WWW-Authenticate": "Bearer"}
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("send your API key as Authorization: Bearer <key>", headers=challenge)
    for key in settings.api_keys:
        if hmac.compare_digest(token.encode(), key.encode()):
            return hashlib.sha256(key.encode()).hexdigest()[:32]
    raise Unauthorized("unknown API key", headers=challenge)


OwnerDep = Annotated[str, Depends(get_owner)]
