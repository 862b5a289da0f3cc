"""Logging set-up: everything goes to stderr (stdout belongs to JSON-RPC in stdio mode)."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Hashable

NOISY_LOGGERS = ("mcp", "httpx", "httpx2", "httpcore", "httpcore2", "uvicorn.access", "sse_starlette")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str = "warning", fmt: str = "pretty") -> None:
    """Install one stderr handler on the root logger.

    Done before the MCP SDK is imported into use: its own set-up calls
    `logging.basicConfig`, which does nothing once the root logger has a handler.
    """
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    set_log_level(level)


def set_log_level(level: str) -> None:
    """The root logger's level; the chatty libraries stay at warning or above."""
    numeric = getattr(logging, level.upper())
    logging.getLogger().setLevel(numeric)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))


class Sampled:
    """At most one log record per `interval_s` for each key (say, a stage shedding under
    overload); the next record says how many were left out. Overload must not also flood
    stderr: the counts are in the metrics and every request is in the dead letters."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._windows: dict[Hashable, tuple[float, int]] = {}

    def take(self, key: Hashable) -> int | None:
        """None: leave this record out. Otherwise log it, noting the returned count of records
        left out since the last one."""
        now = self._clock()
        window = self._windows.get(key)
        if window is not None and now - window[0] < self.interval_s:
            self._windows[key] = (window[0], window[1] + 1)
            return None
        self._windows[key] = (now, 0)
        return 0 if window is None else window[1]
