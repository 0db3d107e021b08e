"""The server's log: one format for every line, its own and uvicorn's, as text or as JSON
lines, with UTC timestamps to the millisecond."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from goldclone.clock import rfc3339_ms

FORMATS = ("text", "json")
CHATTY = ("alembic", "httpx", "httpcore")
"""Libraries whose INFO lines say what goldclone's own say better (a migration, a fetch): at
WARNING unless the level is ``debug``."""


class _Text(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if "\n" in message:  # one line per event, whatever a library's message holds
            message = " ".join(message.split())
        line = f"{_time(record)} {record.levelname} {record.name}: {message}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _JSONLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": _time(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}  # fmt: skip
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(log_format: str = "text", level: str = "info") -> None:
    """Send every logger's lines to stderr in ``log_format``, from ``level`` up. uvicorn's
    access log is left out: ``RequestCounter`` logs requests (GETs at DEBUG)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JSONLines() if log_format == "json" else _Text())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.NOTSET if level == "debug" else logging.WARNING)


def _time(record: logging.LogRecord) -> str:
    return rfc3339_ms(datetime.fromtimestamp(record.created, UTC))
