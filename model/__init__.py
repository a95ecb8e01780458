"""MetaNet (Munkhdalai & Yu, ICML 2017): the model, its data, training and evaluation.

The names below load their modules on first use (PEP 562), so a submodule that needs no torch
(`model.transform`, numpy only) imports without it: image decoding processes use it alone.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from model.config import MetaNetConfig, TrainConfig
    from model.errors import CheckpointError, InvalidTaskError, MetaNetError
    from model.metanet import ClassifyOutput, MetaNet, TaskMemory

_EXPORTS = {
    "CheckpointError": "model.errors",
    "ClassifyOutput": "model.metanet",
    "InvalidTaskError": "model.errors",
    "MetaNet": "model.metanet",
    "MetaNetConfig": "model.config",
    "MetaNetError": "model.errors",
    "TaskMemory": "model.metanet",
    "TrainConfig": "model.config",
}
__all__ = [
    "CheckpointError",
    "ClassifyOutput",
    "InvalidTaskError",
    "MetaNet",
    "MetaNetConfig",
    "MetaNetError",
    "TaskMemory",
    "TrainConfig",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once loaded, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
