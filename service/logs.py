"""Structured logs: one JSON object per line, carrying the request id where there is one."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time

import orjson
from gunicorn.glogging import Logger

# Attributes every LogRecord has; anything else was passed through `extra=` and is logged.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON line: time, level, logger, message and any extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure(level: str = "INFO") -> None:
    """Send the service's logs to stderr as JSON lines (idempotent)."""
    root = logging.getLogger("service")
    root.setLevel(level.upper())
    if not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
        root.propagate = False


class QuietStart:
    """Hold this process's output while it starts: its stderr (native libraries' lines too)
    is discarded and its log records kept, to be written if the start succeeds; if it fails,
    one line alone says why."""

    def __init__(self) -> None:
        """Start holding: from now on nothing reaches stderr."""
        sys.stderr.flush()
        self._stderr = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
        self._root = logging.getLogger("service")
        self._handlers = self._root.handlers[:]
        self._held = logging.handlers.BufferingHandler(capacity=1_000_000)
        self._root.handlers = [self._held]

    def succeeded(self) -> None:
        """Give stderr back and write the log records held meanwhile."""
        self._release()
        for record in self._held.buffer:
            for handler in self._handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)

    def failed(self, line: str) -> None:
        """Write `line` alone, then give stderr back."""
        os.write(self._stderr, line.encode() + b"\n")
        self._release()

    def _release(self) -> None:
        sys.stderr.flush()
        os.dup2(self._stderr, 2)
        os.close(self._stderr)
        self._root.handlers = self._handlers


class GunicornLogger(Logger):
    """gunicorn's logger, writing its lines through JsonFormatter."""

    def setup(self, cfg: object) -> None:
        """Set gunicorn's handlers up as usual, then make them write JSON."""
        super().setup(cfg)
        for handler in self.error_log.handlers:
            handler.setFormatter(JsonFormatter())
