"""The server's log lines: JSON objects for log pipelines, or readable text for a person at a terminal.

Structured fields are passed as ``logger.info("...", extra={"fields": {...}})``. In JSON they land at the
top level of the object (e.g. ``{"event": "listening", "port": 50051}``), so that log pipelines and tests
can read them without parsing the message text; in text they follow the message as ``key=value``.
``--log-format`` picks one; the default is text when stderr is a terminal and JSON otherwise (a pod, a
pipe, a test), so that nothing changes for machines.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

LOG_FORMATS = ("text", "json")
# JAX probes every backend it knows at start-up and logs, at info level, each one that is absent
# ("Unable to initialize backend 'tpu': ... libtpu.so ..."), which reads like a failure on a CPU or GPU
# machine. Those lines are shown at debug level only.
_JAX_BACKEND_LOGGER = "jax._src.xla_bridge"
_JAX_BACKEND_PROBE = "Unable to initialize backend"


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC).isoformat(timespec="milliseconds")


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_fields(record))
        if record.exc_info:
            # Stack traces stay in the server's own logs; they never reach a caller.
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``12:01:02.345 INFO  request done  status=OK latency_s=1.23 ...`` (time in UTC)."""

    def format(self, record: logging.LogRecord) -> str:
        clock = _timestamp(record)[11:23]
        fields = " ".join(f"{key}={_text_value(value)}" for key, value in _fields(record).items())
        line = f"{clock} {record.levelname:<7} {record.getMessage()}" + (f"  {fields}" if fields else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text_value(value: Any) -> str:
    if isinstance(value, dict):
        text = ",".join(f"{key}:{item}" for key, item in value.items())
    else:
        text = f"{value:.3g}" if isinstance(value, float) else str(value)
    return json.dumps(text) if not text or any(c.isspace() or c in '"=' for c in text) else text


class _QuietBackendProbes(logging.Filter):
    """Demotes JAX's "Unable to initialize backend" probe lines to debug."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == _JAX_BACKEND_LOGGER and record.getMessage().startswith(_JAX_BACKEND_PROBE):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def default_log_format() -> str:
    return "text" if sys.stderr.isatty() else "json"


def configure_logging(level: str, log_format: str | None = None) -> None:
    """Routes every logger (ours and the libraries') through one handler on stderr.

    Args:
        level: ``debug``, ``info``, ``warning`` or ``error``.
        log_format: ``text`` or ``json``; None chooses by whether stderr is a terminal.
    """
    handler = logging.StreamHandler(sys.stderr)
    chosen = log_format or default_log_format()
    handler.setFormatter(TextFormatter() if chosen == "text" else JsonFormatter())
    handler.addFilter(_QuietBackendProbes())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def fields(**values: Any) -> dict[str, Any]:
    """``extra=`` argument carrying structured fields: ``log.info("msg", extra=fields(port=1))``."""
    return {"fields": values}
