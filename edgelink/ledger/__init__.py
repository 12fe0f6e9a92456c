"""The ledger: a SQLite file holding every accepted event and the recorded health checks.

One ``Ledger`` object, made of roles, each in its own module with the rules it keeps:

* ``schema.py``: the tables and indexes, opening the file (WAL, auto-vacuum, the
  epoch), upgrading an older one in place, and telling a foreign database (VX11's own)
  from the ledger's;
* ``writer.py``: the one writer thread and its queue (group commit: an ``append``
  returns once its row is committed), the forward cursor's writes, and the health
  rounds (also into a foreign database);
* ``retention.py``: what the file may hold, kept by the writer thread: the byte bound,
  retention by count and age (never past the forward cursor), vacuum;
* ``reads.py``: the reader connections and every query (replay, the timeline, health,
  the forwarder's cursor and pages);
* ``state.py``: the settings, counters and open state the roles share;
* ``errors.py``: what the ledger raises.

This module starts and stops them (``Ledger.start``, ``Ledger.close``) and exports the
names the rest of edgelink uses.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import time
from typing import Callable

from ..config import Settings
from .errors import LedgerClosed, LedgerFull, LedgerUnavailable, LedgerUnusable
from .reads import LedgerReads
from .retention import DROP_LOG_INTERVAL, PRUNE_BATCH, PRUNE_INTERVAL
from .schema import (
    BUCKET_MS,
    EVENTS_SCHEMA,
    MIB,
    WAL_LIMIT,
    WRITE_CHUNK_BYTES,
    foreign_database,
    open_database,
    same_row,
)
from .writer import SNIPPET_CHARS, LedgerWriter, write_runtime_truth

__all__ = [
    "BUCKET_MS", "EVENTS_SCHEMA", "MIB", "SNIPPET_CHARS", "WAL_LIMIT", "WRITE_CHUNK_BYTES",
    "Ledger", "LedgerClosed", "LedgerFull", "LedgerUnavailable", "LedgerUnusable",
    "foreign_database", "write_runtime_truth",
]


class Ledger(LedgerWriter, LedgerReads):
    """The event and health store. ``await start()`` before use, ``await close()`` after.

    Hook for forwarding (API.md §9): with ``forwarding`` on, the stored forward cursor
    (the seq of the last forwarded event) is the line count and age retention never cross;
    only the byte bound under ``drop_oldest`` does, and then calls
    ``on_forced_drop(dropped, unforwarded, last_seq)`` on the event loop after the commit:
    how many events it deleted, how many of them were above the cursor, and the highest
    seq deleted (so a forwarder can move its cursor past it).
    """

    def __init__(self, path: str, *, sync: str = Settings.ledger_sync,
                 retention_events: int = Settings.retention_events, retention_days: float = Settings.retention_days,
                 max_bytes: int = Settings.ledger_max_bytes, full_policy: str = Settings.ledger_full,
                 now: Callable[[], float] = time.time, forwarding: bool = False,
                 prune_interval: float = PRUNE_INTERVAL, prune_batch: int = PRUNE_BATCH):
        if sync not in ("full", "normal"):
            raise ValueError(f"ledger sync must be 'full' or 'normal', not {sync!r}")
        if full_policy not in ("drop_oldest", "reject"):
            raise ValueError(f"ledger full policy must be 'drop_oldest' or 'reject', not {full_policy!r}")
        # the state the roles share; what each field means is said in state.py
        self.path = path
        self.sync = sync
        self.retention_events = retention_events
        self.retention_days = retention_days
        self.max_bytes = max_bytes
        self.full_policy = full_policy
        self.now = now
        self.prune_interval = prune_interval
        self.prune_batch = prune_batch
        self.forwarding = forwarding
        self.on_forced_drop = None
        self.commits = 0
        self.on_commit = None
        self.pruned = {"count": 0, "age": 0, "bytes": 0}
        self.write_failures = 0
        self.reclaimable = False
        self._page_size = 4096
        self._service_row = same_row
        self._used = None
        self._written_since = 0
        self._measured_at = 0.0
        self._full = False
        self._failing = False
        self._vacuum_failing = False
        self._drops_unlogged = [0, 0, 0]
        self._drop_logged_at = -DROP_LOG_INTERVAL
        self._queue = queue.SimpleQueue()
        self._writer = None
        self._readers = None
        self._reader_pool = queue.SimpleQueue()
        self._loop = None
        self._cursor_conn = None
        self._cursor_run = 0
        self._open = False
        self.epoch = ""

    @classmethod
    def from_settings(cls, settings: Settings, now: Callable[[], float] = time.time) -> "Ledger":
        return cls(settings.db, sync=settings.ledger_sync, retention_events=settings.retention_events,
                   retention_days=settings.retention_days, max_bytes=settings.ledger_max_bytes,
                   full_policy=settings.ledger_full, now=now, forwarding=bool(settings.forward_url))

    # --- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Open (creating or upgrading) the database and start the writer thread.

        Raises ``LedgerUnusable`` when the file is not a usable SQLite database.
        """
        self._loop = asyncio.get_running_loop()
        try:
            opened = await asyncio.to_thread(open_database, self.path, self.sync)
        except (LedgerUnusable, sqlite3.Error, OSError) as exc:
            # the operator's message, in one line: the setting, the path, the reason
            raise LedgerUnusable(f"EDGELINK_DB {self.path} is not a usable SQLite database: {exc}") from None
        self.epoch, self._page_size, self._service_row, self.reclaimable = (
            opened.epoch, opened.page_size, opened.service_row, opened.reclaimable)
        try:
            await self._open_readers()
        except BaseException:
            opened.conn.close()
            raise
        self._start_writer(opened.conn)
        self._open = True

    async def close(self) -> None:
        """Commit everything queued, stop the threads and close the connections."""
        if not self._open:
            return
        self._open = False  # appends from now on fail at once instead of queueing behind the writer's stop
        await self._stop_writer()
        await self._close_readers()
        if self._cursor_conn is not None:
            self._cursor_conn.close()
            self._cursor_conn = None
