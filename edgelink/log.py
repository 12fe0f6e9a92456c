"""JSON-lines logging on stderr, one object per line, so journald and `jq` read it as is.

Callers pass an event name and fields; nothing here ever looks at headers, so a token
cannot reach the log unless a caller puts it in a field (none does). API.md §7:

* ``ts`` is RFC 3339 UTC with milliseconds (``2026-12-01T20:00:00.123Z``);
* under journald (``JOURNAL_STREAM`` set) each line starts with its syslog priority
  ``<N>`` (sd-daemon(3) style), so ``journalctl -p warning`` selects by level;
* a field keeps one JSON type across events: ``client`` is always the peer address as a
  string (``address()``), ``traceback`` always a string (``traceback_text()``).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Any, Callable, TextIO

import orjson

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
# syslog priorities (RFC 5424): what journald files each line under
PRIORITIES = {"debug": "<7>", "info": "<6>", "warning": "<4>", "error": "<3>"}
TRACEBACK_MAX_CHARS = 8192  # a deep recursion must not make one log line unbounded


def rfc3339(t: float) -> str:
    """``t`` (Unix seconds) as RFC 3339 UTC with milliseconds."""
    seconds, millis = divmod(round(t * 1000), 1000)  # whole ms first: 0.123 must not print .122
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + ".%03dZ" % millis


def address(client: tuple[str, int] | None) -> str:
    """The peer address for the ``client`` field: the host only, always a string."""
    return client[0] if client else "unknown"


def traceback_text(exc: BaseException) -> str:
    """The formatted traceback of ``exc``, its last ``TRACEBACK_MAX_CHARS`` characters."""
    text = "".join(traceback.format_exception(exc))
    return text[-TRACEBACK_MAX_CHARS:]


class Logger:
    def __init__(self, level: str = "info", stream: TextIO | None = None, journal: bool | None = None) -> None:
        self.threshold = LEVELS[level]
        self.stream = stream
        self.journal = bool(os.environ.get("JOURNAL_STREAM")) if journal is None else journal

    def log(self, level: str, event: str, **fields: Any) -> None:
        if LEVELS[level] < self.threshold:
            return
        record = {"ts": rfc3339(time.time()), "level": level, "event": event}
        record.update(fields)
        line = orjson.dumps(record, default=str).decode() + "\n"
        if self.journal:
            line = PRIORITIES[level] + line
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


class Throttle:
    """At most ``burst`` log lines per ``window`` seconds per key (a client address), for
    events a client can cause at will. Keys are bounded: past ``max_keys`` the oldest
    window is forgotten, so many addresses cost memory bounded by ``max_keys``."""

    def __init__(self, burst: int = 5, window: float = 60.0, max_keys: int = 1024,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.window, self.max_keys, self.now = burst, window, max_keys, now
        self._windows: dict[str, list[float]] = {}  # key -> [window start, lines, suppressed]

    def __len__(self) -> int:
        return len(self._windows)

    def allow(self, key: str) -> int | None:
        """None if this line is to be dropped; else how many lines of ``key`` were dropped
        since the last one logged (to say so in this one)."""
        t = self.now()
        entry = self._windows.get(key)
        if entry is not None and t - entry[0] < self.window:
            if entry[1] < self.burst:
                entry[1] += 1
                return 0
            entry[2] += 1
            return None
        suppressed = int(entry[2]) if entry is not None else 0
        self._windows.pop(key, None)
        if len(self._windows) >= self.max_keys:
            del self._windows[next(iter(self._windows))]  # the oldest window
        self._windows[key] = [t, 1, 0]
        return suppressed


class ClientLog:
    """Whether to write a line a client caused (a refusal, an auth failure, a dropped
    connection): at most ``Throttle``'s burst per address, and at most ``per_second`` lines a
    second in total, since one client may speak from many addresses (every 127/8 address
    is loopback). What is dropped is counted, and said in one ``log_suppressed`` line at the
    first client-caused line after the second it was dropped in."""

    def __init__(self, per_second: int = 50, per_address: Throttle | None = None,
                 now: Callable[[], float] = time.monotonic, logger: Logger | None = None) -> None:
        self.per_second, self.now = per_second, now
        self.per_address = per_address if per_address is not None else Throttle(now=now)
        self.logger = logger if logger is not None else log
        self.dropped = 0  # since the last log_suppressed line
        self._second = -1.0
        self._lines = 0

    def allow(self, key: str) -> int | None:
        """None if this line is to be dropped; else how many lines of ``key`` were dropped
        since its last one (``Throttle.allow``)."""
        t = self.now()
        if t - self._second >= 1.0:
            if self.dropped:
                self.logger.warning("log_suppressed", dropped=self.dropped,
                                    detail="client-caused log lines over the limits (per address, "
                                           f"{self.per_second} a second in total)")
                self.dropped = 0
            self._second, self._lines = t, 0
        if self._lines >= self.per_second:
            self.dropped += 1
            return None
        suppressed = self.per_address.allow(key)
        if suppressed is None:
            self.dropped += 1
            return None
        self._lines += 1
        return suppressed


client_log = ClientLog()
"""Every client-caused line goes through this one, whichever piece writes it."""
