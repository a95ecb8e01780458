"""Errors raised by the model package.

    MetaNetError
    ├── InvalidTaskError       a support set or query batch the model cannot take (bad shape,
    │                          NaN, one class, too many classes or examples, ...)
    └── CheckpointError        weights that are missing or do not match their config
"""

from __future__ import annotations


class MetaNetError(Exception):
    """Base class of every error raised by `model`."""


class InvalidTaskError(MetaNetError, ValueError):
    """Input to `register` or `classify` that breaks a documented precondition.

    `field` names the offending argument ("images", "labels", ...) and `index`, when known, the
    position of the offending example, so a caller can point a user at it.
    """

    def __init__(self, message: str, *, field: str, index: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.index = index


class CheckpointError(MetaNetError):
    """A checkpoint that cannot be loaded safely (missing, malformed, or not matching its config)."""
