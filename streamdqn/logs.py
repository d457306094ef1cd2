"""Logging setup: plain lines for a terminal, or one JSON object per line for journald and log shippers."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class PlainFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


def configure_logging(*, json_format: bool, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format
                         else PlainFormatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiokafka reports every failed connection attempt at ERROR, on and on while a broker is down;
    # our own lines say what matters and carry its last error as their `cause` (last_kafka_error).
    kafka = logging.getLogger("aiokafka")
    kafka.handlers[:] = [_LAST_KAFKA_ERROR]
    kafka.setLevel(logging.DEBUG if level == "DEBUG" else logging.ERROR)
    kafka.propagate = level == "DEBUG"
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class _LastRecord(logging.Handler):
    """Keeps the message of the last record it was given, emits nothing."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.message: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.message = record.getMessage()[:300]


_LAST_KAFKA_ERROR = _LastRecord()


def last_kafka_error() -> str | None:
    """The last error aiokafka logged (e.g. why a connection or SASL handshake failed), if any."""
    return _LAST_KAFKA_ERROR.message


_DAEMON = logging.getLogger("streamdqn.daemon")


def log_event(event: str, **fields: Any) -> None:
    """One structured log line: `event` plus fields (rendered as JSON keys with log.json)."""
    _DAEMON.info(event, extra={"fields": fields})
