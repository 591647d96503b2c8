"""JSON-lines logging: one object per line with time, level, logger, message and any ``extra`` fields.

Structured fields are passed as ``logger.info("...", extra={"fields": {...}})`` and land at the top level
of the JSON object (e.g. ``{"event": "listening", "port": 50051}``), so that log pipelines and tests can
read them without parsing the message text.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            # Stack traces stay in the server's own logs; they never reach a caller.
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str) -> None:
    """Routes every logger (ours and the libraries') through one JSON handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def fields(**values: Any) -> dict[str, Any]:
    """``extra=`` argument carrying structured fields: ``log.info("msg", extra=fields(port=1))``."""
    return {"fields": values}
