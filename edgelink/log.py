"""JSON-lines logging on stderr, one object per line, so journald and `jq` read it as is.

Callers pass an event name and fields; nothing here ever looks at headers, so a token
cannot reach the log unless a caller puts it in a field (none does).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import orjson

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class Logger:
    def __init__(self, level: str = "info", stream: TextIO | None = None) -> None:
        self.threshold = LEVELS[level]
        self.stream = stream

    def log(self, level: str, event: str, **fields: Any) -> None:
        if LEVELS[level] < self.threshold:
            return
        record = {"ts": round(time.time(), 3), "level": level, "event": event}
        record.update(fields)
        line = orjson.dumps(record, default=str).decode() + "\n"
        stream = self.stream or sys.stderr
        try:
            stream.write(line)
            stream.flush()
        except (OSError, ValueError):  # stderr closed (e.g. journald gone): never crash on logging
            pass

    def debug(self, event: str, **fields: Any) -> None:
        self.log("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self.log("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.log("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.log("error", event, **fields)


log = Logger()
"""The process-wide logger; ``configure`` sets its level from settings at start."""


def configure(level: str) -> None:
    log.threshold = LEVELS[level]
