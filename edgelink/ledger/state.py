"""What the roles of the ledger share: its settings, counters and open state, declared once.

``Ledger`` (``__init__.py``) is one object made of the roles in this package (the writer,
the reads); each role is a class of methods over this state, so every attribute below is
one attribute of the ``Ledger``, set by its constructor. The writer thread writes its own
fields and the counters; the loop reads the counters for /metrics and may set the
settings marked so (a reload, the forwarder): the writer reads those afresh each time.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from .schema import connect


class LedgerState:
    """The fields of a ``Ledger`` (for the type checker and the reader), and two helpers."""

    # --- settings
    path: str
    sync: str  # "full" or "normal"
    retention_events: int
    retention_days: float
    max_bytes: int  # read by the writer thread per chunk: a reload may change it
    full_policy: str  # "drop_oldest" or "reject"; a reload may change it
    now: Callable[[], float]  # wall clock in seconds, for the retention age
    prune_interval: float
    prune_batch: int
    forwarding: bool  # retention keeps what the stored cursor has not passed; the forwarder sets it
    on_forced_drop: Callable[[int, int, int], None] | None  # set by the forwarder; see Ledger
    on_commit: Callable[[float, int], None] | None  # (seconds, writes) per commit, for /metrics
    # --- the file, as start() found it
    epoch: str  # this database file's random id (API.md §5), read by start()
    reclaimable: bool  # auto_vacuum is on: pruned space goes back to the file system
    _page_size: int
    _service_row: Callable[[tuple], tuple]  # what the latest-health table's types need
    # --- counters, written by the writer thread only
    commits: int  # committed write transactions (the group-commit test counts them)
    pruned: dict[str, int]  # events deleted, by the rule that deleted them (for /metrics)
    write_failures: int  # write transactions the disk refused (for /metrics)
    # --- the writer thread's own (see writer.py and retention.py)
    # the pages in use, in bytes, when last measured, and what was written since (see _room)
    _used: int | None
    _written_since: int
    _measured_at: float
    _full: bool  # in a run of LedgerFull refusals (logged once per run)
    _failing: bool  # in a run of refused writes (logged once per run)
    _vacuum_failing: bool
    # events, unforwarded events and the highest seq dropped at the bound since the last log line
    _drops_unlogged: list[int]
    _drop_logged_at: float
    _queue: queue.SimpleQueue
    _writer: threading.Thread | None
    # --- the readers (see reads.py)
    _readers: ThreadPoolExecutor | None
    _reader_pool: queue.SimpleQueue[sqlite3.Connection]
    # --- life cycle
    _loop: asyncio.AbstractEventLoop | None
    _cursor_conn: sqlite3.Connection | None  # write_forward_cursor_now's, on the loop
    _cursor_run: int  # its commits since the writer thread last committed one
    _open: bool

    def _started_loop(self) -> asyncio.AbstractEventLoop:
        """The loop start() ran on (the writer and readers exist only after it)."""
        assert self._loop is not None, "the ledger was not started"
        return self._loop

    def _connect(self, read_only: bool = False) -> sqlite3.Connection:
        return connect(self.path, self.sync, read_only)

    def file_bytes(self) -> int:
        """What the ledger holds on disk: the database file plus its WAL."""
        total = 0
        for name in (self.path, self.path + "-wal"):
            try:
                total += os.path.getsize(name)
            except OSError:
                pass
        return total
