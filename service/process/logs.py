"""The process's logs: every logger (uvicorn's included) to stderr, one JSON object a line or
plain text for a person at a terminal, and the start-up line that says where the service listens.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from service.settings import Settings

# What a record carries beyond the standard attributes: the request log's fields (`extra=`).
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, the record's extra fields, and the
    traceback (as one string) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update((k, v) for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_"))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(settings: Settings) -> None:
    """Route every logger (uvicorn's included) to stderr, as JSON or as plain text."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def log_listening(host: str, port: int, processes: int = 1) -> None:
    """The start-up line a person looks for: the URL to open, and where the API's docs are."""
    shown = f"[{host}]" if ":" in host else host
    served = f", {processes} server processes" if processes > 1 else ""
    logging.getLogger("service").info(
        "MetaNet service listening on http://%s:%d (docs at /docs, demo at /)%s", shown, port, served)
