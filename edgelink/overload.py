"""The overload manager: the backstop behind the memory account (API.md §1).

Modelled on Envoy's overload manager: a **resource monitor** (the process's resident
memory, read from ``/proc/self/statm`` with ``os.pread`` on a descriptor kept open: one
system call, no file object, a few microseconds), **thresholds** (``EDGELINK_MEMORY_SOFT``,
``EDGELINK_MEMORY_HARD``) and **actions**:

- ``refuse_new_work`` (over soft): no new request body, stream, replay or WebSocket is
  accepted: the transport answers 503 ``gateway_overloaded`` with ``Retry-After`` (a
  WebSocket is closed 1013); requests without a body, ``/health`` among them, are served.
- ``stop_reading`` (over soft): connections whose answers are not draining are not read.
- ``close_connections`` (over hard): the connections holding the most bytes (their share
  of the account and what waits in their buffers) are closed, one at a time, each followed
  by giving memory back, until the process is under the soft mark again.
- ``trim``: memory freed is given back to the system (``malloc_trim(0)``, glibc) when an
  episode ends and after each connection closed.

Each action is counted in ``edgelink_overload_actions_total{action}`` (every action is
exported from the start, at 0); an episode (from over soft to under it again) is logged
once when it starts and once when it ends, with what was done.

The monitor reads every ``BUSY_INTERVAL`` while a connection has work in flight (or an
episode is on) and every ``IDLE_INTERVAL`` otherwise. The per-request cost is one
attribute read (``server.overloaded``) on requests that carry a body or upgrade.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Callable

from . import memory
from .gateway.metrics import Counter, Registry
from .log import log
from .procfs import RssMonitor

if TYPE_CHECKING:
    from .http.server import Connection, HttpServer

ACTIONS = ("refuse_new_work", "stop_reading", "close_connections", "trim")
BUSY_INTERVAL = 0.1  # seconds between readings while anything is in flight
IDLE_INTERVAL = 1.0
MAX_CLOSES_PER_READING = 16  # connections closed before the loop gets a turn again
TRIM_INTERVAL = 1.0  # seconds between malloc_trim calls while over the soft mark


class OverloadManager:
    def __init__(self, server: "HttpServer", settings: Callable[[], Any], metrics: Registry,
                 monitor: RssMonitor | None = None):
        self.server = server
        self.settings = settings  # read at each reading: a reload's new marks apply at once
        self.monitor = monitor if monitor is not None else RssMonitor()
        self.actions: Counter = metrics.counter("edgelink_overload_actions_total")
        for action in ACTIONS:
            self.actions.inc(action, amount=0)
        self.rss = 0
        self._timer: asyncio.TimerHandle | None = None
        self._episode: dict[str, int] | None = None  # actions taken in the current episode
        self._trimmed_at = -TRIM_INTERVAL  # monotonic time of the last trim in an episode
        self._paused: set[Connection] = set()

    def start(self) -> None:
        self._schedule(BUSY_INTERVAL)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._leave()
        self.monitor.close()

    def count(self, action: str, n: int = 1) -> None:
        """Count an action; its first time in an episode is logged (the episode's end says
        how many of each there were)."""
        self.actions.inc(action, amount=n)
        if self._episode is not None:
            if action not in self._episode:
                log.warning("overload_action", action=action, rss=self.rss)
            self._episode[action] = self._episode.get(action, 0) + n

    def _schedule(self, delay: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay, self._reading)

    def _reading(self) -> None:
        try:
            self.check()
        finally:
            busy = self._episode is not None or any(c.busy for c in self.server.connections)
            self._schedule(BUSY_INTERVAL if busy else IDLE_INTERVAL)

    def check(self) -> None:
        """One reading and the actions it calls for."""
        settings = self.settings()
        self.rss = self.monitor.read()
        if self.rss >= settings.memory_soft and self._episode is not None:
            # Freed memory stays in the heap until it is trimmed: without this an episode
            # whose load is gone could hold the process over the mark, refusing new bodies
            # for good (seen: every stream closed, the account empty, ingest still 503).
            now = time.monotonic()
            if now - self._trimmed_at >= TRIM_INTERVAL:
                self._trimmed_at = now
                if memory.trim():
                    self.count("trim")
                    self.rss = self.monitor.read()
        if self.rss >= settings.memory_soft:
            if self._episode is None:
                self._enter(settings)
            self._stop_reading()
            if self.rss >= settings.memory_hard:
                self._close_heaviest(settings)
        elif self._episode is not None:
            self._leave()

    def _enter(self, settings: Any) -> None:
        self._episode = {}
        self.server.overloaded = True
        log.warning("overload_started", rss=self.rss, soft=settings.memory_soft, hard=settings.memory_hard,
                    detail="no new bodies, streams or WebSockets until resident memory is under the soft mark")

    def _leave(self) -> None:
        if self._episode is None:
            return
        self.server.overloaded = False
        for conn in self._paused:
            conn.overload_reading(True)
        self._paused.clear()
        if memory.trim():
            self.count("trim")
        episode, self._episode = self._episode, None
        log.warning("overload_ended", rss=self.monitor.read(), actions=episode)

    def _stop_reading(self) -> None:
        for conn in self.server.connections:
            if conn not in self._paused and conn.held_bytes() and conn.overload_reading(False):
                self._paused.add(conn)
                self.count("stop_reading")
        self._paused = {c for c in self._paused if c in self.server.connections}

    def _close_heaviest(self, settings: Any) -> None:
        candidates = sorted(((c.held_bytes(), id(c), c) for c in self.server.connections), reverse=True)
        for held, _, conn in candidates[:MAX_CLOSES_PER_READING]:
            if held == 0:
                break
            conn.abort()
            self.count("close_connections")
            if memory.trim():
                self.count("trim")
            self.rss = self.monitor.read()
            if self.rss < settings.memory_soft:
                break
