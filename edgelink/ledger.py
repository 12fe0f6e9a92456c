"""The ledger: a SQLite file holding every accepted event and the recorded health probes.

Rules it keeps
--------------
* An ``append`` returns only after the event's row is COMMITTED (with
  ``synchronous=FULL`` the WAL is fsynced, so it survives a power cut; ``NORMAL`` survives
  a crash of the process). A 201 answered after ``append`` therefore survives SIGKILL.
* ``seq`` is strictly increasing and never reused, also after retention deleted the
  newest rows: ``AUTOINCREMENT`` keeps the high-water mark in ``sqlite_sequence``.
* The event loop never waits on the disk. All writes go through ONE writer thread;
  reads run on a small pool of reader connections in threads (WAL lets them read
  while the writer writes).
* Retention (count and age) runs on the writer thread in small batches, each its own
  short transaction, with pending appends served between batches. With ``forwarding`` on
  it never deletes an event above the forwarder's STORED cursor, read in the batch's own
  transaction: so also the pass at start, before any forwarder runs, keeps them.
* The file (main database + WAL) stays under ``max_bytes``: before a chunk of appends is
  inserted, the pages in use (measured at least once per chunk's worth of writes or per
  second, and again before any refusal or drop) plus the chunk are compared with the
  bound; at the bound ``drop_oldest`` deletes the oldest events in the same transaction
  (the only deletion allowed past the cursor; ``on_forced_drop`` tells the forwarder,
  and every dropped event is in the log: the first drop at once, the rest summed at most
  DROP_LOG_INTERVAL later or at close) and ``reject`` refuses the appends (``LedgerFull``). Free pages beyond a
  small reserve go back to the file system by ``incremental_vacuum`` in small steps
  between batches; the WAL is held near ``WAL_LIMIT`` by the auto-checkpoint and
  ``journal_size_limit``.
* A write the disk refuses (full, read-only, I/O error) raises ``LedgerUnavailable``:
  nothing of it is stored. The next write simply tries again, so ingest recovers by
  itself when space returns.
* Per-type event counts per minute bucket are kept by triggers, in the transaction of
  every insert and delete, so ``counts_by_type`` never scans all the events.
* An older database is upgraded in place: missing columns are added, nothing is dropped.

Theory of operation (group commit)
----------------------------------
``append`` serialises the event on the loop, puts a job on a queue and awaits a future.
The writer thread blocks on the queue; when it wakes it drains *everything* queued,
inserts it in one transaction, commits once, and only then resolves all the futures with
a single ``call_soon_threadsafe``. While one commit is being fsynced the next batch piles
up in the queue, so under load one fsync covers many events and at low load an event is
committed at once, with no timer adding latency.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sqlite3
import threading
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

import orjson

from .config import Settings
from .gateway.events import Event
from .gateway.health import HealthCheck
from .log import log

PRUNE_INTERVAL = 60.0  # seconds between retention passes
PRUNE_BATCH = 500  # rows deleted per retention transaction: short enough not to delay appends
READERS = 2  # reader connections; the box has few cores and reads are short
SNIPPET_CHARS = 200  # API.md §7
HEALTH_ENDPOINT = "/health"  # what a probe calls: a text endpoint_ok column names it when it answered
BUSY_TIMEOUT_MS = 5000  # another process (``edgelink probe``) may hold the write lock briefly
MIB = 1024 * 1024
WRITE_CHUNK_BYTES = MIB  # appends per transaction, in bytes: bounds what one commit adds to the WAL
WAL_LIMIT = 4 * MIB  # the auto-checkpoint threshold (SQLite's default of 1000 pages, about 4 MiB)
# cursor writes on the loop (write_forward_cursor_now, two pages each) between two that go
# through the writer thread, whose commit runs the auto-checkpoint: about 512 KiB of WAL
CURSOR_RUN = 64
# Room kept under max_bytes for the WAL (limit plus one chunk) and for the error of
# estimating a row's pages from its bytes.
BOUND_RESERVE = WAL_LIMIT + 3 * WRITE_CHUNK_BYTES
ROOM_MEASURE_INTERVAL = 1.0  # seconds an estimate of the pages in use may stand on an old measure
ROW_OVERHEAD = 64  # bytes an event row costs beyond its fields: record header, index entries
VACUUM_KEEP = 4 * MIB  # free pages kept for reuse; beyond this they go back to the file system
VACUUM_STEP = 256  # pages per incremental_vacuum step (1 MiB at 4 KiB pages): one short write
CONVERT_MAX_BYTES = 64 * MIB  # an older file without auto_vacuum is VACUUMed at start up to this size
BUCKET_MS = 60_000  # per-type counts are kept per minute of event timestamp
DROP_LOG_INTERVAL = 60.0  # seconds between log lines about events dropped at the byte bound
DEAD_LETTERS_KEPT = 10_000  # dead-letter records kept (the oldest go first): a bounded table
DEAD_LETTER_DETAIL_CHARS = 1000  # of the broker's reason kept with a dead letter

# What an event's JSON costs besides its type, source, payload and metadata (keys, event_id,
# seq, timestamp, a summary in place of a long field): for answers bounded in bytes.
_ROW_JSON = 200

# The events table and its indexes (the benchmark's reference peer creates the same ones).
EVENTS_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id TEXT NOT NULL,
        type TEXT NOT NULL,
        source TEXT NOT NULL,
        timestamp INTEGER NOT NULL,
        payload BLOB NOT NULL,
        metadata BLOB,
        canonical INTEGER NOT NULL,
        broadcast INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS events_timestamp ON events (timestamp, type)",
    # replay reads only broadcast events: a partial index keeps that cheap when they are rare
    "CREATE INDEX IF NOT EXISTS events_broadcast ON events (seq) WHERE broadcast = 1",
)
_SCHEMA = (
    *EVENTS_SCHEMA,
    "CREATE TABLE IF NOT EXISTS ledger_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    # text facts about this database file; ``epoch`` is written once, when the file is created
    "CREATE TABLE IF NOT EXISTS ledger_info (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # the forwarder's cursor (API.md §9): the last seq the broker acknowledged, per epoch
    "CREATE TABLE IF NOT EXISTS forward_cursor (epoch TEXT PRIMARY KEY, acked_seq INTEGER NOT NULL)",
    # events the broker refused for themselves (API.md §9): the cursor moved past them; the
    # event stays in ``events`` until retention reaches it like any forwarded one
    """CREATE TABLE IF NOT EXISTS forward_dead_letters (
        epoch TEXT NOT NULL,
        seq INTEGER NOT NULL,
        event_id TEXT NOT NULL,
        type TEXT NOT NULL,
        reason TEXT NOT NULL,
        detail TEXT NOT NULL,
        at INTEGER NOT NULL,
        PRIMARY KEY (epoch, seq)
    )""",
)
# The runtime-truth tables (API.md §7): all ``edgelink probe --db`` creates in a database the
# ledger did not create (VX11's own, say).
RUNTIME_TRUTH_SCHEMA = (
    # the first version of this table; _upgrade adds the later columns and the unique index
    """CREATE TABLE IF NOT EXISTS copilot_runtime_services (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        service_name TEXT NOT NULL,
        port INTEGER
    )""",
    """CREATE TABLE IF NOT EXISTS copilot_runtime_services_history (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        service_name TEXT NOT NULL,
        port INTEGER,
        status TEXT NOT NULL,
        http_code INTEGER,
        latency_ms REAL,
        endpoint_ok INTEGER NOT NULL,
        snippet TEXT,
        url TEXT,
        error TEXT,
        checked_at INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS history_service_time ON copilot_runtime_services_history (service_name, checked_at)",
    "CREATE INDEX IF NOT EXISTS history_time ON copilot_runtime_services_history (checked_at)",
)
# tables only the ledger creates: a database without them is someone else's
LEDGER_TABLES = ("ledger_info", "ledger_meta")

# Events per (minute of timestamp, type) and per type, kept by triggers in the
# transaction of every insert and delete: counting at a time t reads the counts, not the
# events. An older database gets them filled once, when they are created (_upgrade_counts).
_COUNTS_TABLES = (
    """CREATE TABLE event_counts (
        bucket INTEGER NOT NULL,
        type TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (bucket, type)
    ) WITHOUT ROWID""",
    "CREATE TABLE event_type_counts (type TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID",
)
_COUNTS_FILL = (
    f"INSERT INTO event_counts SELECT timestamp / {BUCKET_MS}, type, count(*) FROM events GROUP BY 1, 2",
    "INSERT INTO event_type_counts SELECT type, count(*) FROM events GROUP BY type",
)
_COUNTS_TRIGGERS = (
    f"""CREATE TRIGGER IF NOT EXISTS event_counts_insert AFTER INSERT ON events BEGIN
        INSERT INTO event_counts (bucket, type, n) VALUES (new.timestamp / {BUCKET_MS}, new.type, 1)
        ON CONFLICT (bucket, type) DO UPDATE SET n = n + 1;
        INSERT INTO event_type_counts (type, n) VALUES (new.type, 1)
        ON CONFLICT (type) DO UPDATE SET n = n + 1;
    END""",
    f"""CREATE TRIGGER IF NOT EXISTS event_counts_delete AFTER DELETE ON events BEGIN
        UPDATE event_counts SET n = n - 1 WHERE bucket = old.timestamp / {BUCKET_MS} AND type = old.type;
        DELETE FROM event_counts WHERE bucket = old.timestamp / {BUCKET_MS} AND type = old.type AND n <= 0;
        UPDATE event_type_counts SET n = n - 1 WHERE type = old.type;
        DELETE FROM event_type_counts WHERE type = old.type AND n <= 0;
    END""",
)

# Columns of the latest-health table added after its first version; an older database
# gets each missing one with ALTER TABLE ADD COLUMN (API.md §7).
_SERVICE_COLUMNS = (
    ("status", "TEXT"),
    ("http_code", "INTEGER"),
    ("latency_ms", "REAL"),
    ("endpoint_ok", "INTEGER"),
    ("snippet", "TEXT"),
    ("url", "TEXT"),
    ("error", "TEXT"),
    ("checked_at", "INTEGER"),
)

# Highest seq of a broadcast event retention has deleted: a replay from below it missed events.
_PRUNED_BROADCAST = "pruned_broadcast_seq"
# Highest seq the forwarder had sent when it last stored its cursor (per epoch: key + epoch):
# after a restart, sending one at or below it again counts as a resend.
_FORWARD_SENT = "forward_sent_seq:"

_EVENT_COLUMNS = "seq, event_id, type, source, timestamp, payload, metadata, canonical, broadcast"
_HEALTH_COLUMNS = "service_name, status, http_code, latency_ms, url, error, checked_at"


class LedgerClosed(RuntimeError):
    """The ledger is not open (not started yet, or closed)."""


class LedgerUnavailable(RuntimeError):
    """The disk refused a write (full, read-only, I/O error); nothing of it is stored."""


class LedgerFull(RuntimeError):
    """The byte bound is reached and ``ledger_full`` is ``reject``; nothing of it is stored."""


class LedgerUnusable(RuntimeError):
    """The database file cannot be used (not SQLite, truncated, unreadable): the start stops."""


def _event_from_row(row: tuple) -> Event:
    seq, event_id, type_, source, timestamp, payload, metadata, canonical, broadcast = row
    return Event(event_id, type_, source, timestamp, orjson.loads(payload),
                 orjson.loads(metadata) if metadata is not None else None,
                 bool(canonical), bool(broadcast), seq)


def _field(value: bytes | None, size: int | None) -> Any:
    """A stored JSON field, or its summary when the query left out a long one."""
    if value is None:
        return None if size is None else {"truncated": True, "bytes": size}
    return orjson.loads(value)


def _health_from_row(row: tuple) -> dict[str, Any]:
    _, status, http_code, latency_ms, url, error, checked_at = row
    return {"status": status, "http_code": http_code, "latency_ms": latency_ms, "url": url,
            "error": error, "checked_at": checked_at}


# Jobs for the writer thread. Appends and health rounds share a transaction; a prune
# request starts a retention pass; _STOP ends the thread after what precedes it.
@dataclass(slots=True)
class _Append:
    row: tuple
    future: asyncio.Future
    size: int  # bytes the row costs in the file, estimated from its fields


@dataclass(slots=True)
class _Health:
    rows: list[tuple]  # (port, status, http_code, latency_ms, endpoint_ok, snippet, url, error, checked_at, name)
    future: asyncio.Future
    size: int = 0  # a few short rows: not held against the bound


@dataclass(slots=True)
class _Cursor:
    seq: int
    future: asyncio.Future
    size: int = 0  # one small row, updated in place
    rewind: bool = False  # set the cursor to ``seq`` even if that moves it back
    sent: int = 0  # the highest seq sent so far, kept beside the cursor
    dead: tuple | None = None  # a dead letter recorded with the move: (seq, event_id, type, reason, detail, at)


@dataclass(slots=True)
class _Prune:
    future: asyncio.Future


_STOP = object()


class Ledger:
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
        self.path = path
        self.sync = sync
        self.retention_events = retention_events
        self.retention_days = retention_days
        self.max_bytes = max_bytes  # read by the writer thread per chunk: a reload may change it
        self.full_policy = full_policy
        self.now = now  # wall clock in seconds, for the retention age
        self.prune_interval = prune_interval
        self.prune_batch = prune_batch
        self.forwarding = forwarding  # retention keeps what the stored cursor has not passed
        self.on_forced_drop: Callable[[int, int, int], None] | None = None
        self.commits = 0  # committed write transactions (the group-commit test counts them)
        self.on_commit: Callable[[float, int], None] | None = None  # (seconds, writes) per commit, for /metrics
        # Counters for /metrics, written by the writer thread only.
        self.pruned = {"count": 0, "age": 0, "bytes": 0}  # events deleted, by the rule that deleted them
        self.write_failures = 0  # write transactions the disk refused
        self.reclaimable = False  # auto_vacuum is on: pruned space goes back to the file system
        self._page_size = 4096
        self._service_row: Callable[[tuple], tuple] = _same  # what the latest-health table's types need
        # the pages in use, in bytes, when last measured, and what was written since (see _room)
        self._used: int | None = None
        self._written_since = 0
        self._measured_at = 0.0
        self._full = False  # in a run of LedgerFull refusals (logged once per run)
        self._failing = False  # in a run of refused writes (logged once per run)
        self._vacuum_failing = False
        # events, unforwarded events and the highest seq dropped at the bound since the last log line
        self._drops_unlogged = [0, 0, 0]
        self._drop_logged_at = -DROP_LOG_INTERVAL
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._reader_pool: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cursor_conn: sqlite3.Connection | None = None  # write_forward_cursor_now's, on the loop
        self._cursor_run = 0  # its commits since the writer thread last committed one
        self._open = False
        self.epoch = ""  # this database file's random id (API.md §5), read by start()

    @classmethod
    def from_settings(cls, settings: Settings, now: Callable[[], float] = time.time) -> "Ledger":
        return cls(settings.db, sync=settings.ledger_sync, retention_events=settings.retention_events,
                   retention_days=settings.retention_days, max_bytes=settings.ledger_max_bytes,
                   full_policy=settings.ledger_full, now=now, forwarding=bool(settings.forward_url))

    # --- life cycle -------------------------------------------------------------------

    def _started_loop(self) -> asyncio.AbstractEventLoop:
        """The loop start() ran on (the writer and readers exist only after it)."""
        assert self._loop is not None, "the ledger was not started"
        return self._loop

    async def start(self) -> None:
        """Open (creating or upgrading) the database and start the writer thread.

        Raises ``LedgerUnusable`` when the file is not a usable SQLite database.
        """
        self._loop = asyncio.get_running_loop()
        try:
            conn = await asyncio.to_thread(self._open_database)
        except (LedgerUnusable, sqlite3.Error, OSError) as exc:
            # the operator's message, in one line: the setting, the path, the reason
            raise LedgerUnusable(f"EDGELINK_DB {self.path} is not a usable SQLite database: {exc}") from None
        try:
            readers = await asyncio.to_thread(lambda: [self._connect(read_only=True) for _ in range(READERS)])
        except BaseException:
            conn.close()
            raise
        for reader in readers:
            self._reader_pool.put(reader)
        self._readers = ThreadPoolExecutor(READERS, thread_name_prefix="ledger-read")
        self._writer = threading.Thread(target=self._write_loop, args=(conn,), name="ledger-write", daemon=True)
        self._writer.start()
        self._open = True

    async def close(self) -> None:
        """Commit everything queued, stop the threads and close the connections."""
        if not self._open:
            return
        self._open = False  # appends from now on fail at once instead of queueing behind _STOP
        self._queue.put(_STOP)
        assert self._writer is not None and self._readers is not None  # start() made them before _open
        await asyncio.to_thread(self._writer.join)
        await asyncio.to_thread(self._readers.shutdown)
        while not self._reader_pool.empty():
            self._reader_pool.get().close()
        if self._cursor_conn is not None:
            self._cursor_conn.close()
            self._cursor_conn = None

    def file_bytes(self) -> int:
        """What the ledger holds on disk: the database file plus its WAL."""
        total = 0
        for name in (self.path, self.path + "-wal"):
            try:
                total += os.path.getsize(name)
            except OSError:
                pass
        return total

    # --- writes -----------------------------------------------------------------------

    async def append(self, event: Event) -> int:
        """Store ``event``; return its ``seq`` once its row is committed.

        Raises ``LedgerUnavailable`` if the disk refused the transaction, ``LedgerFull``
        at the byte bound under ``reject`` (nothing is stored in either case) and
        ``LedgerClosed`` if the ledger is not open. If the caller is cancelled while
        waiting, the event is still committed.
        """
        # serialise on the caller's side so a bad value fails this event, not its whole batch
        payload = orjson.dumps(event.payload)
        metadata = None if event.metadata is None else orjson.dumps(event.metadata)
        row = (event.event_id, event.type, event.source, event.timestamp, payload, metadata,
               int(event.canonical), int(event.broadcast))
        size = (len(payload) + (len(metadata) if metadata is not None else 0) + len(event.event_id)
                + len(event.type) + len(event.source) + ROW_OVERHEAD)
        return await self._submit(lambda fut: _Append(row, fut, size))

    async def record_health(self, records: Iterable[HealthCheck]) -> None:
        """Record one health round: the latest row per service and one history row each."""
        rows = health_rows(records)
        await self._submit(lambda fut: _Health(rows, fut))

    async def prune(self) -> int:
        """Run a retention pass now, in batches like the background one; returns the rows
        (events and health history) it deleted."""
        return await self._submit(_Prune)

    def _queue_job(self, make_job: Callable[[asyncio.Future], Any]) -> asyncio.Future:
        """Queue a job for the writer thread now; the future it settles."""
        if not self._open:
            raise LedgerClosed("the ledger is not open")
        future = self._started_loop().create_future()
        self._queue.put(make_job(future))
        return future

    async def _submit(self, make_job: Callable[[asyncio.Future], Any]) -> Any:
        future = self._queue_job(make_job)
        try:
            return await future
        finally:
            # a raised error's traceback holds this frame: without this, frame -> future ->
            # error -> traceback is a cycle keeping the 1 MiB row alive until a full GC
            del future

    # --- the writer thread ------------------------------------------------------------

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        next_pass = time.monotonic()  # a pass at start-up catches up after a long downtime
        waiters: list[_Prune] | None = None  # not None while a retention pass is under way
        deleted = 0
        vacuuming = True  # free pages may be waiting to go back (a pass, or the last run)
        try:
            while True:
                pass_due = waiters is not None or time.monotonic() >= next_pass
                busy = pass_due or vacuuming
                due = next_pass if self._drops_unlogged[0] == 0 else min(
                    next_pass, self._drop_logged_at + DROP_LOG_INTERVAL)
                jobs = self._take_jobs(0.0 if busy else due - time.monotonic())
                writes = [j for j in jobs if isinstance(j, (_Append, _Health, _Cursor))]
                if writes:
                    self._commit_writes(conn, writes)
                requests = [j for j in jobs if isinstance(j, _Prune)]
                if requests or (waiters is None and time.monotonic() >= next_pass):
                    waiters = (waiters or []) + requests
                stopping = any(j is _STOP for j in jobs)
                self._log_drops(force=stopping)
                if stopping:
                    # a pass cut short by close() reports what it deleted so far
                    self._settle([(w.future, deleted, None) for w in waiters or ()])
                    return
                if waiters is not None:
                    # one batch per round, so appends queued meanwhile wait for one short
                    # transaction at most
                    n, more = self._prune_batch(conn)
                    deleted += n
                    if not more:
                        self._settle([(w.future, deleted, None) for w in waiters])
                        waiters, deleted = None, 0
                        next_pass = time.monotonic() + self.prune_interval
                vacuuming = self._vacuum_step(conn)
        finally:
            conn.close()

    def _take_jobs(self, wait: float) -> list[Any]:
        """Wait up to ``wait`` seconds for a job, then take everything else queued."""
        jobs = []
        try:
            jobs.append(self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait())
            while True:
                jobs.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return jobs

    def _commit_writes(self, conn: sqlite3.Connection, jobs: list[_Append | _Health | _Cursor]) -> None:
        # Chunks of about WRITE_CHUNK_BYTES, each its own transaction: one commit adds a
        # bounded amount to the WAL, and the byte bound is checked before each.
        chunk: list[_Append | _Health | _Cursor] = []
        size = 0
        for job in jobs:
            chunk.append(job)
            size += job.size
            if size >= WRITE_CHUNK_BYTES:
                self._commit_chunk(conn, chunk)
                chunk, size = [], 0
        if chunk:
            self._commit_chunk(conn, chunk)

    def _commit_chunk(self, conn: sqlite3.Connection, jobs: list[_Append | _Health | _Cursor]) -> None:
        # A transaction of forward-cursor moves only is not fsynced (WAL, synchronous
        # NORMAL: it survives a crash of the process, not a power cut): a cursor lost to a
        # power cut only makes events go to the broker again, which the consumer's dedup
        # absorbs, while an fsync per burst of acks held the forwarder's window (issue 23).
        # The next fsynced commit makes it durable as well.
        light = self.sync == "full" and all(isinstance(job, _Cursor) and job.dead is None for job in jobs)
        if light:
            conn.execute("PRAGMA synchronous = NORMAL")
        try:
            self._commit_jobs(conn, jobs)
        finally:
            if light:
                conn.execute("PRAGMA synchronous = FULL")

    def _commit_jobs(self, conn: sqlite3.Connection, jobs: list[_Append | _Health | _Cursor]) -> None:
        results: list[tuple[asyncio.Future, Any, BaseException | None]] = []
        dropped = (0, 0, 0)
        started = time.perf_counter()
        try:
            conn.execute("BEGIN IMMEDIATE")
            room = self._room(conn)
            # an event bigger than the whole bound never fits: nothing is dropped for it
            fitting = sum(job.size for job in jobs if job.size <= self.max_bytes - BOUND_RESERVE)
            if fitting > room:  # a refusal or a drop is decided on the pages as they are now
                room = self._room(conn, measure=True)
            written = 0
            if fitting > room and self.full_policy == "drop_oldest":
                dropped, freed = self._drop_oldest(conn, fitting - room)
                room += freed
            for job in jobs:
                if isinstance(job, _Append):
                    if job.size > room:
                        results.append((job.future, None, LedgerFull(
                            f"the ledger is at its bound of {self.max_bytes} bytes")))
                        continue
                    room -= job.size
                    written += job.size
                    cursor = conn.execute(
                        "INSERT INTO events (event_id, type, source, timestamp, payload, metadata, canonical,"
                        " broadcast) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", job.row)
                    results.append((job.future, cursor.lastrowid, None))
                elif isinstance(job, _Cursor):
                    if job.dead is not None:
                        self._write_dead_letter(conn, job.dead)
                    results.append((job.future, self._write_cursor(conn, job.seq, job.rewind), None))
                    if job.sent:
                        self._write_sent(conn, job.sent)
                else:
                    write_health(conn, job.rows, self._service_row)
                    written += job.size
                    results.append((job.future, None, None))
            conn.execute("COMMIT")
            if dropped[0]:
                self._used = None  # pages were freed: measured again next time
            else:
                self._written_since += written
            self.commits += 1
            if self.on_commit is not None:
                self.on_commit(time.perf_counter() - started, len(jobs))
        except sqlite3.Error as exc:
            # Nothing of the chunk is stored; every caller hears it (ingest answers 503).
            _rollback(conn)
            self._used = None
            self.write_failures += 1
            if not self._failing:
                self._failing = True
                log.error("ledger_unavailable", jobs=len(jobs), error=str(exc), db=self.path,
                          detail="writes are refused until the disk accepts them again")
            error = LedgerUnavailable(str(exc))
            self._settle([(job.future, None, error) for job in jobs])
            return
        if self._failing:
            self._failing = False
            log.info("ledger_recovered", db=self.path)
        if any(isinstance(job, _Append) for job in jobs):
            self._note_full(sum(1 for _, _, exc in results if isinstance(exc, LedgerFull)))
        if dropped[0]:
            self._note_dropped(*dropped)
        # Only now, after COMMIT, may anyone learn a seq.
        self._settle(results)

    def _room(self, conn: sqlite3.Connection, measure: bool = False) -> int:
        """Bytes that may still be added under the bound: its target minus the pages in use.

        The pages are measured (two PRAGMAs, ~11 µs: as much as the rest of a one-event
        commit) when ``measure`` says so, once a chunk's worth of bytes was written since, a
        second has passed, or pages were freed; in between, the last measure plus the
        estimated bytes written since, an over-estimate of its growth within at most two
        chunks' worth of error, which BOUND_RESERVE covers."""
        now = time.monotonic()
        if (measure or self._used is None or self._written_since >= WRITE_CHUNK_BYTES
                or now - self._measured_at >= ROOM_MEASURE_INTERVAL):
            (pages,) = conn.execute("PRAGMA page_count").fetchone()
            (free,) = conn.execute("PRAGMA freelist_count").fetchone()
            self._used, self._written_since, self._measured_at = (pages - free) * self._page_size, 0, now
        return self.max_bytes - BOUND_RESERVE - self._used - self._written_since

    def _drop_oldest(self, conn: sqlite3.Connection, need: int) -> tuple[tuple[int, int, int], int]:
        """Delete the oldest events, inside the caller's transaction, until about ``need``
        bytes are free: ((events, of them unforwarded, highest seq), bytes freed)."""
        protect = self._protected_after(conn)
        freed = count = unforwarded = last = 0
        lost_broadcast = None
        while freed < need:
            rows = conn.execute(
                "SELECT seq, broadcast, length(payload) + coalesce(length(metadata), 0) + length(event_id)"
                " + length(type) + length(source) FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                (last, self.prune_batch)).fetchall()
            if not rows:
                break
            for seq, broadcast, nbytes in rows:
                freed += nbytes + ROW_OVERHEAD
                last = seq
                count += 1
                if broadcast:
                    lost_broadcast = seq
                if protect is not None and seq > protect:
                    unforwarded += 1
                if freed >= need:
                    break
        if count:
            conn.execute("DELETE FROM events WHERE seq <= ?", (last,))
            self._record_lost_broadcast(conn, lost_broadcast)
        return (count, unforwarded, last), freed

    def _note_full(self, refused: int) -> None:
        # logged once per run of refusals, not per request
        if refused:
            if not self._full:
                self._full = True
                log.warning("ledger_full", max_bytes=self.max_bytes, policy=self.full_policy,
                            detail="ingest answers 507 until retention frees space")
        elif self._full:
            self._full = False
            log.info("ledger_accepting", max_bytes=self.max_bytes)

    def _note_dropped(self, count: int, unforwarded: int, last_seq: int) -> None:
        self.pruned["bytes"] += count
        pending = self._drops_unlogged
        pending[0] += count
        pending[1] += unforwarded
        pending[2] = last_seq
        self._log_drops()
        if self.on_forced_drop is not None:
            self._started_loop().call_soon_threadsafe(self.on_forced_drop, count, unforwarded, last_seq)

    def _log_drops(self, force: bool = False) -> None:
        """Log the events dropped at the byte bound since the last line: at once after a
        quiet DROP_LOG_INTERVAL, else summed into one line per interval (at the bound every
        chunk may drop some); every dropped event is in some line, the last at close."""
        events, unforwarded, last_seq = self._drops_unlogged
        if events and (force or time.monotonic() - self._drop_logged_at >= DROP_LOG_INTERVAL):
            log.warning("ledger_dropped_oldest", events=events, unforwarded=unforwarded, last_seq=last_seq,
                        max_bytes=self.max_bytes)
            self._drops_unlogged = [0, 0, 0]
            self._drop_logged_at = time.monotonic()

    def _vacuum_step(self, conn: sqlite3.Connection) -> bool:
        """Give up to VACUUM_STEP free pages back to the file system, keeping VACUUM_KEEP
        bytes of them for reuse; true while more are waiting."""
        if not self.reclaimable:
            return False
        try:
            (free,) = conn.execute("PRAGMA freelist_count").fetchone()
            surplus = free - VACUUM_KEEP // self._page_size
            if surplus <= 0:
                return False
            # executescript steps the pragma to its end; execute() would free a single page
            conn.executescript(f"PRAGMA incremental_vacuum({min(surplus, VACUUM_STEP)});")
            if surplus > VACUUM_STEP:
                return True
            # in WAL mode the file shrinks when the checkpoint writes the vacuum back
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            self._vacuum_failing = False
            return False
        except sqlite3.Error as exc:
            # space not returned yet is reused by inserts; tried again after the next write
            if not self._vacuum_failing:  # once per run of failures, as for writes
                self._vacuum_failing = True
                log.warning("ledger_vacuum_failed", error=str(exc))
            return False

    def _settle(self, results: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
        if results:
            # one wake-up of the loop per batch, not one per event
            self._started_loop().call_soon_threadsafe(_settle_futures, results)

    @staticmethod
    def _record_lost_broadcast(conn: sqlite3.Connection, seq: int | None) -> None:
        # a replay from below this seq has missed events
        if seq is not None:
            conn.execute(
                "INSERT INTO ledger_meta (key, value) VALUES (?, ?) ON CONFLICT (key)"
                " DO UPDATE SET value = max(value, excluded.value)", (_PRUNED_BROADCAST, seq))

    def _prune_batch(self, conn: sqlite3.Connection) -> tuple[int, bool]:
        """Delete one batch of expired rows in one short transaction: (rows deleted, more left?)."""
        cutoff_ms = int((self.now() - self.retention_days * 86_400) * 1000)
        self._used = None  # what this deletes is measured by the next chunk's _room
        try:
            conn.execute("BEGIN IMMEDIATE")
            # events not yet forwarded are kept whatever their count or age
            protect = self._protected_after(conn)
            (max_seq,) = conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()
            # Seqs are unique integers, so at most retention_events rows lie above this line.
            keep_above = max_seq - self.retention_events
            limit = keep_above if protect is None else min(keep_above, protect)
            by_count = conn.execute(
                "SELECT seq, broadcast FROM events WHERE seq <= ? ORDER BY seq LIMIT ?",
                (limit, self.prune_batch)).fetchall()
            by_age = []
            if len(by_count) < self.prune_batch:
                by_age = conn.execute(
                    "SELECT seq, broadcast FROM events WHERE timestamp < ? AND seq > ? AND seq <= ? LIMIT ?",
                    (cutoff_ms, keep_above, max_seq if protect is None else protect,
                     self.prune_batch - len(by_count))).fetchall()
            rows = by_count + by_age
            conn.executemany("DELETE FROM events WHERE seq = ?", [(seq,) for seq, _ in rows])
            self._record_lost_broadcast(conn, max((seq for seq, broadcast in rows if broadcast), default=None))
            history = conn.execute(
                "DELETE FROM copilot_runtime_services_history WHERE id IN (SELECT id FROM"
                " copilot_runtime_services_history WHERE checked_at < ? LIMIT ?)",
                (cutoff_ms, self.prune_batch)).rowcount
            conn.execute("COMMIT")
            self.commits += 1
            self.pruned["count"] += len(by_count)
            self.pruned["age"] += len(by_age)
            return len(rows) + history, len(rows) == self.prune_batch or history == self.prune_batch
        except Exception as exc:
            # Retention is retried at the next pass; ingest must not stop because of it.
            log.error("ledger_retention_failed", error=repr(exc))
            _rollback(conn)
            return 0, False

    # --- reads ------------------------------------------------------------------------

    async def _read(self, query: Callable[[sqlite3.Connection], Any]) -> Any:
        if not self._open:
            raise LedgerClosed("the ledger is not open")

        def run() -> Any:
            conn = self._reader_pool.get()
            try:
                # one read transaction: a consistent snapshot across the statements of a query
                conn.execute("BEGIN")
                try:
                    return query(conn)
                finally:
                    if conn.in_transaction:  # an error may have ended it already
                        conn.execute("COMMIT")
            finally:
                self._reader_pool.put(conn)

        return await self._started_loop().run_in_executor(self._readers, run)

    async def last_seq(self) -> int:
        """The highest seq ever assigned (0 if none), even if retention deleted its row."""
        def query(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
            return row[0] if row else 0
        return await self._read(query)

    async def stats(self) -> tuple[int, int]:
        """(events stored, bytes of the database file and its WAL), for /metrics: from the
        per-type counts, so a scrape costs O(types) also with a million events."""
        def query(conn: sqlite3.Connection) -> tuple[int, int]:
            (events,) = conn.execute("SELECT coalesce(sum(n), 0) FROM event_type_counts").fetchone()
            return events, self.file_bytes()
        return await self._read(query)

    async def replay(self, since_seq: int, limit: int) -> tuple[list[Event], bool]:
        """Broadcast events with ``seq > since_seq``, oldest first: the newest ``limit`` of
        them, so they join live events without a gap. ``truncated`` is true when events
        were missed: more than ``limit`` matched, or retention deleted some already."""
        def query(conn: sqlite3.Connection) -> tuple[list[Event], bool]:
            rows = conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE broadcast = 1 AND seq > ? ORDER BY seq DESC LIMIT ?",
                (since_seq, limit + 1)).fetchall()
            pruned = conn.execute("SELECT value FROM ledger_meta WHERE key = ?", (_PRUNED_BROADCAST,)).fetchone()
            truncated = len(rows) > limit or (pruned is not None and pruned[0] > since_seq)
            return [_event_from_row(r) for r in reversed(rows[:limit])], truncated
        return await self._read(query)

    async def replay_window(self, since_seq: int, limit: int) -> tuple[int, int, bool]:
        """Where a paged replay after ``since_seq`` starts, without reading events:
        ``(after, count, truncated)``. The replay is the broadcast events with seq > ``after``
        (``count`` of them now, at most ``limit``: the newest, so they join live events
        without a gap); ``truncated`` as for ``replay``."""
        def query(conn: sqlite3.Connection) -> tuple[int, int, bool]:
            row = conn.execute("SELECT seq FROM events WHERE broadcast = 1 AND seq > ? ORDER BY seq DESC"
                               " LIMIT 1 OFFSET ?", (since_seq, limit)).fetchone()
            if row is not None:
                return row[0], limit, True
            count = conn.execute("SELECT count(*) FROM events WHERE broadcast = 1 AND seq > ?",
                                 (since_seq,)).fetchone()[0]
            pruned = conn.execute("SELECT value FROM ledger_meta WHERE key = ?", (_PRUNED_BROADCAST,)).fetchone()
            return since_seq, count, pruned is not None and pruned[0] > since_seq
        return await self._read(query)

    async def replay_page(self, after_seq: int, limit: int) -> list[tuple]:
        """Up to ``limit`` broadcast events with seq > ``after_seq``, oldest first, as stored:
        ``(seq, event_id, type, source, timestamp, payload, metadata)`` with the JSON still
        encoded, so a frame is spliced from it without decoding."""
        def query(conn: sqlite3.Connection) -> list[tuple]:
            return conn.execute("SELECT seq, event_id, type, source, timestamp, payload, metadata FROM events"
                                " WHERE broadcast = 1 AND seq > ? ORDER BY seq LIMIT ?",
                                (after_seq, limit)).fetchall()
        return await self._read(query)

    async def counts_by_type(self, at_ms: int) -> dict[str, int]:
        """How many stored events of each type have ``timestamp <= at_ms``, every type."""
        return (await self.top_types(at_ms, -1))[0]

    async def top_types(self, at_ms: int, limit: int) -> tuple[dict[str, int], int]:
        """The ``limit`` types (-1: all) with the most stored events of ``timestamp <= at_ms``,
        and how many events the other types have.

        Read from the per-minute counts, never from all the events: the minutes before
        ``at_ms``'s own minute (summed directly, or as the totals minus the later minutes,
        whichever side has fewer), corrected by the events of its own minute on the nearer
        side of ``at_ms``, counted from the timestamp index. The sums and the ranking are
        SQLite's (its sorter spills to disk past its cache), so only ``limit`` rows reach
        Python however many types clients made up (API.md §5)."""
        bucket = at_ms // BUCKET_MS
        start, end = bucket * BUCKET_MS, (bucket + 1) * BUCKET_MS
        # counts(t) = C(minutes < b) + events in [start, t] = C(minutes <= b) - events in (t, end)
        head = at_ms - start < end - at_ms
        partial = ("SELECT type, 1 FROM events WHERE timestamp >= :start AND timestamp <= :at" if head else
                   "SELECT type, -1 FROM events WHERE timestamp > :at AND timestamp < :end")

        def query(conn: sqlite3.Connection) -> tuple[dict[str, int], int]:
            # two lone aggregates: SQLite answers each from the index's ends, where
            # min() and max() together would scan the whole table
            first, last = conn.execute("SELECT (SELECT min(bucket) FROM event_counts),"
                                       " (SELECT max(bucket) FROM event_counts)").fetchone()
            if first is None:
                return {}, 0
            if bucket - first <= last - bucket:
                minutes = f"SELECT type, n FROM event_counts WHERE bucket {'<' if head else '<='} :bucket"
            else:
                minutes = ("SELECT type, n FROM event_type_counts UNION ALL SELECT type, -n FROM event_counts"
                           f" WHERE bucket {'>=' if head else '>'} :bucket")
            rows = conn.execute(
                f"WITH parts(type, n) AS ({minutes} UNION ALL {partial}),"
                " totals(type, n) AS (SELECT type, sum(n) FROM parts GROUP BY type HAVING sum(n) > 0)"
                " SELECT type, n, (SELECT sum(n) FROM totals) FROM totals ORDER BY n DESC, type LIMIT :limit",
                {"bucket": bucket, "start": start, "at": at_ms, "end": end, "limit": limit}).fetchall()
            top = {type_: n for type_, n, _ in rows}
            return top, (rows[0][2] - sum(top.values()) if rows else 0)
        return await self._read(query)

    async def recent(self, at_ms: int, limit: int, max_field_bytes: int | None = None) -> list[Event]:
        """The newest ``limit`` events with ``timestamp <= at_ms``, newest first.

        A payload or metadata longer than ``max_field_bytes`` of JSON is not even read
        from the file: it comes back as ``{"truncated": true, "bytes": n}`` (API.md §5)."""
        cap = 2**62 if max_field_bytes is None else max_field_bytes

        def query(conn: sqlite3.Connection) -> list[Event]:
            # length() of a BLOB reads only the record header, not the value's pages
            rows = conn.execute(
                "SELECT seq, event_id, type, source, timestamp,"
                " CASE WHEN length(payload) > ?1 THEN NULL ELSE payload END, length(payload),"
                " CASE WHEN length(metadata) > ?1 THEN NULL ELSE metadata END, length(metadata),"
                " canonical, broadcast FROM events WHERE timestamp <= ?2 ORDER BY timestamp DESC, seq DESC"
                " LIMIT ?3", (cap, at_ms, limit)).fetchall()
            return [Event(event_id, type_, source, timestamp, _field(payload, payload_bytes),
                          _field(metadata, metadata_bytes), bool(canonical), bool(broadcast), seq)
                    for (seq, event_id, type_, source, timestamp, payload, payload_bytes, metadata,
                         metadata_bytes, canonical, broadcast) in rows]
        return await self._read(query)

    async def between(self, since_ms: int, until_ms: int, limit: int, max_field_bytes: int, max_bytes: int, *,
                      containing: bytes = b"", scan: int = 0) -> tuple[list[Event], bool]:
        """The newest events with ``since_ms <= timestamp <= until_ms``, newest first, fields
        over ``max_field_bytes`` summarised as in ``recent``: at most ``limit`` of them, and no
        more once ``max_bytes`` of names and fields have been read (rows are read one by one,
        so a wide range costs no memory). With ``containing``, only events whose payload or
        metadata holds those bytes, looked for among the newest ``scan`` rows of the range
        only, whatever the ledger holds. The flag says whether more events may match."""

        def query(conn: sqlite3.Connection) -> tuple[list[Event], bool]:
            columns = ("seq, event_id, type, source, timestamp,"
                       " CASE WHEN length(payload) > ?1 THEN NULL ELSE payload END, length(payload),"
                       " CASE WHEN length(metadata) > ?1 THEN NULL ELSE metadata END, length(metadata),"
                       " canonical, broadcast")
            newest = "FROM events WHERE timestamp BETWEEN ?2 AND ?3 ORDER BY timestamp DESC, seq DESC"
            more = False
            if containing:
                more = conn.execute(f"SELECT count(*) FROM (SELECT 1 {newest} LIMIT ?4)",
                                    (max_field_bytes, since_ms, until_ms, scan)).fetchone()[0] >= scan
                rows = conn.execute(f"SELECT {columns} FROM (SELECT * {newest} LIMIT ?4)"
                                    " WHERE instr(payload, ?5) > 0 OR instr(metadata, ?5) > 0"
                                    " ORDER BY timestamp DESC, seq DESC",
                                    (max_field_bytes, since_ms, until_ms, scan, containing))
            else:
                rows = conn.execute(f"SELECT {columns} {newest}", (max_field_bytes, since_ms, until_ms))
            events: list[Event] = []
            read = 0
            for (seq, event_id, type_, source, timestamp, payload, payload_bytes, metadata, metadata_bytes,
                 canonical, broadcast) in rows:
                read += _ROW_JSON + len(type_) + len(source) + len(payload or b"") + len(metadata or b"")
                if len(events) == limit or read > max_bytes:
                    more = True
                    break
                events.append(Event(event_id, type_, source, timestamp, _field(payload, payload_bytes),
                                    _field(metadata, metadata_bytes), bool(canonical), bool(broadcast), seq))
            rows.close()
            return events, more
        return await self._read(query)

    async def health_at(self, t_ms: int) -> dict[str, dict[str, Any]]:
        """Per service, the last health recorded at or before ``t_ms``: ModuleHealth plus
        ``checked_at``. Services never recorded by then are absent."""
        def query(conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
            result = {}
            names = [n for (n,) in conn.execute("SELECT DISTINCT service_name FROM copilot_runtime_services")]
            for name in names:
                # the latest table answers when history retention has passed t; rows of an
                # older version without checked_at cannot be placed in time and are skipped
                rows = conn.execute(
                    f"SELECT {_HEALTH_COLUMNS} FROM copilot_runtime_services_history"
                    " WHERE service_name = ? AND checked_at <= ? ORDER BY checked_at DESC, id DESC LIMIT 1",
                    (name, t_ms)).fetchall()
                rows += conn.execute(
                    f"SELECT {_HEALTH_COLUMNS} FROM copilot_runtime_services"
                    " WHERE service_name = ? AND checked_at <= ?", (name, t_ms)).fetchall()
                if rows:
                    result[name] = _health_from_row(max(rows, key=lambda r: r[-1]))
            return result
        return await self._read(query)

    async def health_history(self, service: str, since_ms: int, limit: int) -> list[dict[str, Any]]:
        """The recorded probes of ``service`` with ``checked_at >= since_ms``, oldest first:
        the newest ``limit`` of them, so a trend ends at the latest round."""
        def query(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(
                "SELECT checked_at, status, http_code, latency_ms FROM copilot_runtime_services_history"
                " WHERE service_name = ? AND checked_at >= ? ORDER BY checked_at DESC, id DESC LIMIT ?",
                (service, since_ms, limit)).fetchall()
            return [{"checked_at": t, "status": s, "http_code": c, "latency_ms": ms} for t, s, c, ms in reversed(rows)]
        return await self._read(query)

    # --- forwarding (API.md §9) -------------------------------------------------------

    async def forward_cursor(self) -> int:
        """The last seq the broker acknowledged in this epoch (0: nothing forwarded yet)."""
        def query(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT acked_seq FROM forward_cursor WHERE epoch = ?", (self.epoch,)).fetchone()
            return row[0] if row else 0
        return await self._read(query)

    async def store_forward_cursor(self, seq: int, sent: int = 0) -> int:
        """Move the cursor forward to ``seq`` (never back), and keep ``sent``, the highest
        seq sent so far, if higher than the kept one; returns the stored cursor, which the
        byte bound may have moved further."""
        return await self._submit(lambda fut: _Cursor(seq, fut, sent=sent))

    def queue_forward_cursor(self, seq: int, sent: int = 0) -> asyncio.Future[int]:
        """``store_forward_cursor`` queued for the writer at once, not when a task runs it
        (the forwarder's window waits on these writes: a loop round less for each); the
        future settles with the stored cursor. Cancelling it ends only the wait."""
        return self._queue_job(lambda fut: _Cursor(seq, fut, sent=sent))

    def write_forward_cursor_now(self, seq: int, sent: int = 0) -> int | None:
        """``store_forward_cursor`` done now on the calling (event loop) thread, through a
        connection of its own, if the database's write lock is free at once: the stored
        cursor, or None (the writer thread holds the lock, or the write failed: queue it
        with ``queue_forward_cursor`` instead). It never waits: no busy timeout, no fsync
        (as the writer's cursor-only commits), no checkpoint (the writer's commits run
        them). The forwarder's acked events hold their window slots until the cursor is
        stored: this spares them two thread hand-offs (issue 23). Every CURSOR_RUN-th write
        is left to the writer thread (None), whose commit runs the auto-checkpoint: the WAL
        stays near WAL_LIMIT."""
        if not self._open:
            raise LedgerClosed("the ledger is not open")
        if self._cursor_run >= CURSOR_RUN:
            self._cursor_run = 0
            return None
        conn = self._cursor_conn
        try:
            if conn is None:
                conn = self._cursor_conn = sqlite3.connect(self.path, isolation_level=None, timeout=0)
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute("PRAGMA wal_autocheckpoint = 0")
                conn.execute("PRAGMA cache_size = -64")  # KiB: two one-row tables
            conn.execute("BEGIN IMMEDIATE")
            try:
                stored = self._write_cursor(conn, seq)
                if sent:
                    self._write_sent(conn, sent)
                conn.execute("COMMIT")
            except sqlite3.Error:
                _rollback(conn)
                raise
        except sqlite3.Error:
            return None
        self._cursor_run += 1
        return stored

    async def forward_sent_seq(self) -> int:
        """The highest seq sent as of the last cursor write in this epoch (0: none)."""
        def query(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT value FROM ledger_meta WHERE key = ?", (_FORWARD_SENT + self.epoch,)).fetchone()
            return row[0] if row else 0
        return await self._read(query)

    async def rewind_forward_cursor(self, seq: int) -> int:
        """Set the cursor to ``seq``, also back (a rewind: the events after it are forwarded
        again and retention keeps them again); returns the stored cursor."""
        return await self._submit(lambda fut: _Cursor(seq, fut, rewind=True))

    async def dead_letter(self, seq: int, event_id: str, type_: str, reason: str, detail: str, at_ms: int) -> int:
        """Record event ``seq`` as a dead letter and move the cursor past it, in one
        transaction; returns the stored cursor."""
        dead = (seq, event_id, type_, reason, detail[:DEAD_LETTER_DETAIL_CHARS], at_ms)
        return await self._submit(lambda fut: _Cursor(seq, fut, dead=dead))

    async def dead_letters(self, limit: int) -> tuple[list[dict[str, Any]], int]:
        """This epoch's newest ``limit`` dead letters (newest first) and how many are recorded;
        ``stored`` says whether the event itself is still in the ledger."""
        def query(conn: sqlite3.Connection) -> tuple[list[dict[str, Any]], int]:
            (total,) = conn.execute("SELECT count(*) FROM forward_dead_letters WHERE epoch = ?",
                                    (self.epoch,)).fetchone()
            rows = conn.execute(
                "SELECT d.seq, d.event_id, d.type, d.reason, d.detail, d.at, e.seq IS NOT NULL"
                " FROM forward_dead_letters d LEFT JOIN events e ON e.seq = d.seq"
                " WHERE d.epoch = ? ORDER BY d.seq DESC LIMIT ?", (self.epoch, limit)).fetchall()
            keys = ("seq", "event_id", "type", "reason", "detail", "at", "stored")
            return [dict(zip(keys, (*row[:6], bool(row[6])))) for row in rows], total
        return await self._read(query)

    async def forward_oldest(self, after_seq: int) -> tuple[int, int] | None:
        """(seq, timestamp ms) of the first stored event after ``after_seq``, or None."""
        def query(conn: sqlite3.Connection) -> tuple[int, int] | None:
            return conn.execute("SELECT seq, timestamp FROM events WHERE seq > ? ORDER BY seq LIMIT 1",
                                (after_seq,)).fetchone()
        return await self._read(query)

    async def forward_page(self, after_seq: int, limit: int, max_bytes: int) -> list[tuple]:
        """Up to ``limit`` events with ``seq > after_seq``, oldest first, as raw rows
        (seq, event_id, type, source, timestamp, payload JSON, metadata JSON or None,
        canonical); cut once their payload and metadata exceed ``max_bytes`` (at least
        one row, so a single large event still moves)."""
        def query(conn: sqlite3.Connection) -> list[tuple]:
            rows: list[tuple] = []
            size = 0
            # iterating the cursor reads row by row: the byte cut bounds what is held
            for row in conn.execute(
                    "SELECT seq, event_id, type, source, timestamp, payload, metadata, canonical FROM events"
                    " WHERE seq > ? ORDER BY seq LIMIT ?", (after_seq, limit)):
                size += len(row[5]) + len(row[6] or b"")
                if rows and size > max_bytes:
                    break
                rows.append(row)
            return rows
        return await self._read(query)

    def _write_cursor(self, conn: sqlite3.Connection, seq: int, rewind: bool = False) -> int:
        conn.execute("INSERT INTO forward_cursor (epoch, acked_seq) VALUES (?, ?) ON CONFLICT (epoch) DO UPDATE SET"
                     f" acked_seq = {'excluded.acked_seq' if rewind else 'max(acked_seq, excluded.acked_seq)'}",
                     (self.epoch, seq))
        (stored,) = conn.execute("SELECT acked_seq FROM forward_cursor WHERE epoch = ?", (self.epoch,)).fetchone()
        return stored

    def _write_sent(self, conn: sqlite3.Connection, sent: int) -> None:
        conn.execute("INSERT INTO ledger_meta (key, value) VALUES (?, ?) ON CONFLICT (key)"
                     " DO UPDATE SET value = max(value, excluded.value)", (_FORWARD_SENT + self.epoch, sent))

    def _write_dead_letter(self, conn: sqlite3.Connection, dead: tuple) -> None:
        conn.execute("INSERT OR REPLACE INTO forward_dead_letters (epoch, seq, event_id, type, reason, detail, at)"
                     " VALUES (?, ?, ?, ?, ?, ?, ?)", (self.epoch, *dead))
        (count,) = conn.execute("SELECT count(*) FROM forward_dead_letters").fetchone()
        if count > DEAD_LETTERS_KEPT:
            conn.execute("DELETE FROM forward_dead_letters WHERE rowid IN (SELECT rowid FROM forward_dead_letters"
                         " ORDER BY at, seq LIMIT ?)", (count - DEAD_LETTERS_KEPT,))

    def _protected_after(self, conn: sqlite3.Connection) -> int | None:
        """The seq above which retention deletes nothing (the stored cursor), None when
        forwarding is off; read inside the caller's transaction."""
        if not self.forwarding:
            return None
        row = conn.execute("SELECT acked_seq FROM forward_cursor WHERE epoch = ?", (self.epoch,)).fetchone()
        return row[0] if row else 0

    # --- opening and upgrading --------------------------------------------------------

    def _connect(self, read_only: bool = False) -> sqlite3.Connection:
        # autocommit mode: transactions are explicit; check_same_thread off because a
        # connection is opened on one thread and used on another (one at a time)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=BUSY_TIMEOUT_MS / 1000)
        conn.execute(f"PRAGMA synchronous = {self.sync.upper()}")
        if read_only:
            conn.execute("PRAGMA query_only = ON")
        return conn

    def _open_database(self) -> sqlite3.Connection:
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        existed = _check_file(self.path)
        conn = self._connect()
        try:
            if not existed:
                # takes effect only before the first table is created
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise sqlite3.OperationalError(f"{self.path}: cannot use WAL journal mode (got {mode})")
            (self._page_size,) = conn.execute("PRAGMA page_size").fetchone()
            # After a checkpoint the WAL is reset and cut back to this; one chunk above the
            # threshold, so the usual WAL is reused rather than cut and regrown each time.
            conn.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT + WRITE_CHUNK_BYTES}")
            conn.execute(f"PRAGMA wal_autocheckpoint = {max(1, WAL_LIMIT // self._page_size)}")
            conn.execute("BEGIN IMMEDIATE")  # DDL is transactional: the upgrade happens whole or not at all
            for statement in (*_SCHEMA, *RUNTIME_TRUTH_SCHEMA):
                conn.execute(statement)
            self._upgrade(conn)
            self._service_row = service_row_writer(conn)
            self._upgrade_counts(conn)
            # A new file gets a new epoch: seq is only comparable within one epoch.
            conn.execute("INSERT OR IGNORE INTO ledger_info (key, value) VALUES ('epoch', ?)", (uuid.uuid4().hex,))
            self.epoch = conn.execute("SELECT value FROM ledger_info WHERE key = 'epoch'").fetchone()[0]
            conn.execute("COMMIT")
            self._enable_reclaim(conn)
        except BaseException:
            conn.close()
            raise
        self._record_epoch(existed)
        return conn

    @staticmethod
    def _upgrade_counts(conn: sqlite3.Connection) -> None:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'event_counts'").fetchone() is None:
            for statement in (*_COUNTS_TABLES, *_COUNTS_FILL):
                conn.execute(statement)
        for statement in _COUNTS_TRIGGERS:
            conn.execute(statement)

    def _enable_reclaim(self, conn: sqlite3.Connection) -> None:
        """Make sure pruned space can go back to the file system (incremental auto-vacuum).

        A file made before it was turned on is converted with VACUUM at start when it is
        small enough to do so quickly; a bigger one keeps reusing its free pages."""
        (mode,) = conn.execute("PRAGMA auto_vacuum").fetchone()
        if mode == 0:  # NONE
            size = os.path.getsize(self.path)
            if size <= CONVERT_MAX_BYTES:
                try:
                    conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
                    conn.execute("VACUUM")
                    (mode,) = conn.execute("PRAGMA auto_vacuum").fetchone()
                    log.info("ledger_converted", db=self.path, bytes=size, detail="incremental auto-vacuum on")
                except sqlite3.Error as exc:
                    log.warning("ledger_convert_failed", db=self.path, error=str(exc))
            if mode == 0:
                log.warning("ledger_space_not_returned", db=self.path, bytes=size,
                            detail="this file predates incremental auto-vacuum and is too big to convert at "
                            "start: pruned space is reused but not given back to the file system; VACUUM it "
                            "offline after PRAGMA auto_vacuum = INCREMENTAL to convert it")
        self.reclaimable = mode == 2  # INCREMENTAL (FULL gives space back at each commit)

    def _record_epoch(self, existed: bool) -> None:
        """Keep the epoch beside the database, so a lost or replaced file is noticed."""
        record = self.path + ".epoch"
        try:
            with open(record, encoding="ascii") as f:
                previous = f.read().strip()
        except (OSError, UnicodeDecodeError):
            previous = ""
        if previous == self.epoch:
            return
        if previous:
            log.warning("ledger_epoch_changed", db=self.path, previous_epoch=previous, epoch=self.epoch,
                        detail=("the database file was missing and has been created again" if not existed
                                else "the database file was replaced") + "; seq restarted in a new epoch")
        try:
            with open(record + ".tmp", "w", encoding="ascii") as f:
                f.write(self.epoch + "\n")
            os.replace(record + ".tmp", record)
        except OSError as exc:
            log.warning("ledger_epoch_unrecorded", path=record, error=str(exc))

    @staticmethod
    def _upgrade(conn: sqlite3.Connection) -> None:
        """Bring a latest-health table made by an older version up to date, in place."""
        have = {row[1] for row in conn.execute("PRAGMA table_info(copilot_runtime_services)")}
        for column, kind in _SERVICE_COLUMNS:
            if column not in have:
                conn.execute(f"ALTER TABLE copilot_runtime_services ADD COLUMN {column} {kind}")
        # An old table may lack UNIQUE(service_name). Add it as an index when its rows allow;
        # if they hold duplicates, keep them (no row is ever lost) and index without it.
        duplicates = conn.execute(
            "SELECT 1 FROM copilot_runtime_services GROUP BY service_name HAVING count(*) > 1 LIMIT 1").fetchone()
        unique = "" if duplicates else "UNIQUE"
        if duplicates:
            log.warning("ledger_duplicate_services", detail="copilot_runtime_services has duplicate service "
                        "names; kept as they are, without a unique index")
        conn.execute(f"CREATE {unique} INDEX IF NOT EXISTS services_name ON copilot_runtime_services (service_name)")


def _same(row: tuple) -> tuple:
    return row


def service_row_writer(conn: sqlite3.Connection) -> Callable[[tuple], tuple]:
    """How a health row is written to ``copilot_runtime_services`` as its columns are declared.

    The ledger's own table keeps Unix ms and 0/1 integers. A table created by VX11's schema
    (SQLAlchemy: ``checked_at DATETIME``, ``endpoint_ok VARCHAR(128)``, ``latency_ms
    INTEGER``) gets what SQLAlchemy itself stores and reads back: the time as UTC text
    ``YYYY-MM-DD HH:MM:SS.ffffff``, the endpoint that answered as text (``/health``, or
    NULL when it did not), the latency as a whole number (API.md §7)."""
    declared = {row[1]: (row[2] or "").upper() for row in conn.execute("PRAGMA table_info(copilot_runtime_services)")}
    as_datetime = any(word in declared.get("checked_at", "") for word in ("DATE", "TIME"))
    # SQLite's own affinity rules: a declared type holding CHAR, CLOB or TEXT is text, INT integer
    as_text = any(word in declared.get("endpoint_ok", "") for word in ("CHAR", "CLOB", "TEXT"))
    as_int = "INT" in declared.get("latency_ms", "")
    if not (as_datetime or as_text or as_int):
        return _same

    def convert(row: tuple) -> tuple:
        port, status, http_code, latency_ms, endpoint_ok, snippet, url, error, checked_at, name = row
        if as_datetime:
            checked_at = datetime.fromtimestamp(checked_at / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")
        if as_text:
            endpoint_ok = HEALTH_ENDPOINT if endpoint_ok else None
        if as_int and latency_ms is not None:
            latency_ms = round(latency_ms)
        return port, status, http_code, latency_ms, endpoint_ok, snippet, url, error, checked_at, name

    return convert


def write_health(conn: sqlite3.Connection, rows: list[tuple], service_row: Callable[[tuple], tuple]) -> None:
    """One round into the latest-health table (``service_row`` fits a row to its column
    types) and the history table (the ledger's own: Unix ms, integers)."""
    columns = "port, status, http_code, latency_ms, endpoint_ok, snippet, url, error, checked_at, service_name"
    for row in rows:
        latest = service_row(row)
        # UPDATE-then-INSERT rather than ON CONFLICT: an upgraded old table whose rows
        # hold duplicate names has no UNIQUE index to conflict on (see _upgrade)
        updated = conn.execute(
            "UPDATE copilot_runtime_services SET port = ?, status = ?, http_code = ?, latency_ms = ?,"
            " endpoint_ok = ?, snippet = ?, url = ?, error = ?, checked_at = ? WHERE service_name = ?",
            latest).rowcount
        if not updated:
            conn.execute(f"INSERT INTO copilot_runtime_services ({columns}) VALUES ({', '.join('?' * 10)})", latest)
        conn.execute(f"INSERT INTO copilot_runtime_services_history ({columns}) VALUES ({', '.join('?' * 10)})",
                     row)


def health_rows(records: Iterable[HealthCheck]) -> list[tuple]:
    """Health checks as the rows ``write_health`` takes."""
    return [(r.port, r.status, r.http_code, r.latency_ms, int(r.endpoint_ok), r.snippet[:SNIPPET_CHARS],
             r.url, r.error, r.checked_at, r.service) for r in records]


def foreign_database(path: str) -> bool:
    """Whether ``path`` is an SQLite database the ledger did not create (VX11's own, say):
    ``edgelink probe --db`` then writes only the runtime-truth tables into it. A file that
    is missing, empty or not SQLite is not foreign (the ledger creates it, or says why not)."""
    try:
        if not _check_file(path):
            return False
    except LedgerUnusable:
        return False
    try:
        conn = sqlite3.connect(f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro", uri=True,
                               timeout=BUSY_TIMEOUT_MS / 1000)
    except sqlite3.Error:
        return False
    try:
        found = conn.execute(f"SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN "
                             f"({', '.join('?' * len(LEDGER_TABLES))})", LEDGER_TABLES).fetchone()[0]
    except sqlite3.Error:
        return False
    finally:
        conn.close()
    return found == 0


def write_runtime_truth(path: str, records: Iterable[HealthCheck]) -> None:
    """One health round into a database the ledger did not create: its runtime-truth tables
    only, in one transaction, leaving its journal mode, auto-vacuum and other tables as
    they are (API.md §7)."""
    rows = health_rows(records)
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        conn.execute("BEGIN IMMEDIATE")
        for statement in RUNTIME_TRUTH_SCHEMA:
            conn.execute(statement)
        Ledger._upgrade(conn)
        write_health(conn, rows, service_row_writer(conn))
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    finally:
        conn.close()


def _check_file(path: str) -> bool:
    """Whether ``path`` holds a database already; ``LedgerUnusable`` if it is not SQLite or
    is shorter than its header says (truncated), which SQLite itself notices only later."""
    try:
        with open(path, "rb") as f:
            header = f.read(100)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise LedgerUnusable(f"cannot read it: {exc.strerror}") from None
    if not header:
        return False  # an empty file becomes a new database
    if len(header) < 100 or not header.startswith(b"SQLite format 3\0"):
        raise LedgerUnusable("not an SQLite database")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    # the page count is only valid when written by the same change as the counter; pages
    # still in a WAL may lie beyond the main file, so only a file without one is measured
    valid = header[92:96] == header[24:28]
    try:
        wal = os.path.getsize(path + "-wal")
    except OSError:
        wal = 0
    if valid and not wal and size < pages * page_size:
        raise LedgerUnusable(f"truncated: {size} bytes where its header says {pages * page_size}")
    return True


def _rollback(conn: sqlite3.Connection) -> None:
    # SQLite ends the transaction itself on some errors (disk full, I/O); a failing
    # ROLLBACK must not kill the writer thread, whose callers would then wait forever
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error as exc:
        log.error("ledger_rollback_failed", error=repr(exc))


def _settle_futures(results: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
    for future, value, exc in results:
        if future.done():  # the caller was cancelled; its write stands regardless
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)
