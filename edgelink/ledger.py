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
  short transaction, with pending appends served between batches.
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
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import orjson

from .config import Settings
from .gateway.events import Event
from .log import log


PRUNE_INTERVAL = 60.0  # seconds between retention passes
PRUNE_BATCH = 500  # rows deleted per retention transaction: short enough not to delay appends
READERS = 2  # reader connections; the box has few cores and reads are short
SNIPPET_CHARS = 200  # API.md §7
BUSY_TIMEOUT_MS = 5000  # another process (``edgelink probe``) may hold the write lock briefly

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

_EVENT_COLUMNS = "seq, event_id, type, source, timestamp, payload, metadata, canonical, broadcast"
_HEALTH_COLUMNS = "service_name, status, http_code, latency_ms, url, error, checked_at"


class LedgerClosed(RuntimeError):
    """The ledger is not open (not started yet, or closed)."""


@dataclass(frozen=True, slots=True)
class ProbeRecord:
    """One module's result in a health round; ``status`` is a ModuleHealth status."""

    service_name: str
    port: int | None
    status: str
    http_code: int | None
    latency_ms: float | None
    url: str
    error: str | None
    snippet: str
    checked_at: int  # Unix ms

    @property
    def endpoint_ok(self) -> bool:
        return self.status == "ok"


def _event_from_row(row: tuple) -> Event:
    seq, event_id, type_, source, timestamp, payload, metadata, canonical, broadcast = row
    return Event(event_id, type_, source, timestamp, orjson.loads(payload),
                 orjson.loads(metadata) if metadata is not None else None,
                 bool(canonical), bool(broadcast), seq)


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


@dataclass(slots=True)
class _Health:
    rows: list[tuple]  # (port, status, http_code, latency_ms, endpoint_ok, snippet, url, error, checked_at, name)
    future: asyncio.Future


@dataclass(slots=True)
class _Cursor:
    seq: int
    future: asyncio.Future


@dataclass(slots=True)
class _Prune:
    future: asyncio.Future


_STOP = object()


class Ledger:
    """The event and health store. ``await start()`` before use, ``await close()`` after."""

    def __init__(self, path: str, *, sync: str = Settings.ledger_sync,
                 retention_events: int = Settings.retention_events, retention_days: float = Settings.retention_days,
                 now: Callable[[], float] = time.time,
                 prune_interval: float = PRUNE_INTERVAL, prune_batch: int = PRUNE_BATCH):
        if sync not in ("full", "normal"):
            raise ValueError(f"ledger sync must be 'full' or 'normal', not {sync!r}")
        self.path = path
        self.sync = sync
        self.retention_events = retention_events
        self.retention_days = retention_days
        self.now = now  # wall clock in seconds, for the retention age
        self.prune_interval = prune_interval
        self.prune_batch = prune_batch
        self.commits = 0  # committed write transactions (the group-commit test counts them)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._reader_pool: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open = False
        self.epoch = ""  # this database file's random id (API.md §5), read by start()
        # Set by the forwarder to its stored cursor: count/age retention keeps every event
        # above it (API.md §9); None = not forwarding, nothing protected.
        self.protect_after: int | None = None
        self.forward_dropped = 0  # unforwarded events the byte bound pruned (drop_oldest)

    @classmethod
    def from_settings(cls, settings: Settings, now: Callable[[], float] = time.time) -> "Ledger":
        return cls(settings.db, sync=settings.ledger_sync, retention_events=settings.retention_events,
                   retention_days=settings.retention_days, now=now)

    # --- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Open (creating or upgrading) the database and start the writer thread."""
        self._loop = asyncio.get_running_loop()
        conn = await asyncio.to_thread(self._open_database)
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
        await asyncio.to_thread(self._writer.join)
        await asyncio.to_thread(self._readers.shutdown)
        while not self._reader_pool.empty():
            self._reader_pool.get().close()

    # --- writes -----------------------------------------------------------------------

    async def append(self, event: Event) -> int:
        """Store ``event``; return its ``seq`` once its row is committed.

        Raises ``sqlite3.Error`` if the transaction failed (nothing of it is stored) and
        ``LedgerClosed`` if the ledger is not open. If the caller is cancelled while
        waiting, the event is still committed.
        """
        # serialise on the caller's side so a bad value fails this event, not its whole batch
        row = (event.event_id, event.type, event.source, event.timestamp, orjson.dumps(event.payload),
               None if event.metadata is None else orjson.dumps(event.metadata),
               int(event.canonical), int(event.broadcast))
        return await self._submit(lambda fut: _Append(row, fut))

    async def record_health(self, records: Iterable[ProbeRecord]) -> None:
        """Record one health round: the latest row per service and one history row each."""
        rows = [(r.port, r.status, r.http_code, r.latency_ms, int(r.endpoint_ok), r.snippet[:SNIPPET_CHARS],
                 r.url, r.error, r.checked_at, r.service_name) for r in records]
        await self._submit(lambda fut: _Health(rows, fut))

    async def prune(self) -> int:
        """Run a retention pass now, in batches like the background one; returns the rows
        (events and health history) it deleted."""
        return await self._submit(_Prune)

    async def _submit(self, make_job: Callable[[asyncio.Future], Any]) -> Any:
        if not self._open:
            raise LedgerClosed("the ledger is not open")
        future = self._loop.create_future()
        self._queue.put(make_job(future))
        return await future

    # --- the writer thread ------------------------------------------------------------

    def _write_loop(self, conn: sqlite3.Connection) -> None:
        next_pass = time.monotonic()  # a pass at start-up catches up after a long downtime
        waiters: list[_Prune] | None = None  # not None while a retention pass is under way
        deleted = 0
        try:
            while True:
                pass_due = waiters is not None or time.monotonic() >= next_pass
                jobs = self._take_jobs(0.0 if pass_due else next_pass - time.monotonic())
                writes = [j for j in jobs if isinstance(j, (_Append, _Health, _Cursor))]
                if writes:
                    self._commit_writes(conn, writes)
                requests = [j for j in jobs if isinstance(j, _Prune)]
                if requests or (waiters is None and time.monotonic() >= next_pass):
                    waiters = (waiters or []) + requests
                if any(j is _STOP for j in jobs):
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
        results: list[tuple[asyncio.Future, Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in jobs:
                if isinstance(job, _Append):
                    cursor = conn.execute(
                        "INSERT INTO events (event_id, type, source, timestamp, payload, metadata, canonical,"
                        " broadcast) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", job.row)
                    results.append((job.future, cursor.lastrowid, None))
                elif isinstance(job, _Cursor):
                    results.append((job.future, self._write_cursor(conn, job.seq), None))
                else:
                    self._write_health(conn, job.rows)
                    results.append((job.future, None, None))
            conn.execute("COMMIT")
            self.commits += 1
        except Exception as exc:
            # Nothing of the batch is stored; every caller hears it (ingest answers 5xx).
            log.error("ledger_write_failed", jobs=len(jobs), error=repr(exc))
            _rollback(conn)
            results = [(job.future, None, exc) for job in jobs]
        # Only now, after COMMIT, may anyone learn a seq.
        self._settle(results)

    def _settle(self, results: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
        if results:
            # one wake-up of the loop per batch, not one per event
            self._loop.call_soon_threadsafe(_settle_futures, results)

    @staticmethod
    def _write_health(conn: sqlite3.Connection, rows: list[tuple]) -> None:
        columns = "port, status, http_code, latency_ms, endpoint_ok, snippet, url, error, checked_at, service_name"
        for row in rows:
            # UPDATE-then-INSERT rather than ON CONFLICT: an upgraded old table whose rows
            # hold duplicate names has no UNIQUE index to conflict on (see _upgrade)
            updated = conn.execute(
                "UPDATE copilot_runtime_services SET port = ?, status = ?, http_code = ?, latency_ms = ?,"
                " endpoint_ok = ?, snippet = ?, url = ?, error = ?, checked_at = ? WHERE service_name = ?",
                row).rowcount
            if not updated:
                conn.execute(f"INSERT INTO copilot_runtime_services ({columns}) VALUES ({', '.join('?' * 10)})", row)
            conn.execute(f"INSERT INTO copilot_runtime_services_history ({columns}) VALUES ({', '.join('?' * 10)})",
                         row)

    def _prune_batch(self, conn: sqlite3.Connection) -> tuple[int, bool]:
        """Delete one batch of expired rows in one short transaction: (rows deleted, more left?)."""
        cutoff_ms = int((self.now() - self.retention_days * 86_400) * 1000)
        try:
            conn.execute("BEGIN IMMEDIATE")
            (max_seq,) = conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()
            # Seqs are unique integers, so at most retention_events rows lie above this line.
            keep_above = max_seq - self.retention_events
            protect = self.protect_after
            if protect is not None:  # an event not yet forwarded is never pruned by count or age
                keep_above = min(keep_above, protect)
            rows = conn.execute(
                "SELECT seq, broadcast FROM events WHERE seq <= ? ORDER BY seq LIMIT ?",
                (keep_above, self.prune_batch)).fetchall()
            if len(rows) < self.prune_batch:
                rows += conn.execute(
                    "SELECT seq, broadcast FROM events WHERE timestamp < ? AND seq > ? AND seq <= ? LIMIT ?",
                    (cutoff_ms, keep_above, max_seq if protect is None else protect,
                     self.prune_batch - len(rows))).fetchall()
            conn.executemany("DELETE FROM events WHERE seq = ?", [(seq,) for seq, _ in rows])
            lost = max((seq for seq, broadcast in rows if broadcast), default=None)
            if lost is not None:
                conn.execute(
                    "INSERT INTO ledger_meta (key, value) VALUES (?, ?) ON CONFLICT (key)"
                    " DO UPDATE SET value = max(value, excluded.value)", (_PRUNED_BROADCAST, lost))
            history = conn.execute(
                "DELETE FROM copilot_runtime_services_history WHERE id IN (SELECT id FROM"
                " copilot_runtime_services_history WHERE checked_at < ? LIMIT ?)",
                (cutoff_ms, self.prune_batch)).rowcount
            conn.execute("COMMIT")
            self.commits += 1
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

        return await self._loop.run_in_executor(self._readers, run)

    async def last_seq(self) -> int:
        """The highest seq ever assigned (0 if none), even if retention deleted its row."""
        def query(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
            return row[0] if row else 0
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

    async def counts_by_type(self, at_ms: int) -> dict[str, int]:
        """How many stored events of each type have ``timestamp <= at_ms``."""
        def query(conn: sqlite3.Connection) -> dict[str, int]:
            return dict(conn.execute(
                "SELECT type, count(*) FROM events WHERE timestamp <= ? GROUP BY type", (at_ms,)).fetchall())
        return await self._read(query)

    async def recent(self, at_ms: int, limit: int) -> list[Event]:
        """The newest ``limit`` events with ``timestamp <= at_ms``, newest first."""
        def query(conn: sqlite3.Connection) -> list[Event]:
            rows = conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE timestamp <= ? ORDER BY timestamp DESC, seq DESC"
                " LIMIT ?", (at_ms, limit)).fetchall()
            return [_event_from_row(r) for r in rows]
        return await self._read(query)

    async def between(self, start_ms: int, end_ms: int, limit: int) -> list[Event]:
        """Events with ``start_ms <= timestamp <= end_ms``, oldest first, at most ``limit``."""
        def query(conn: sqlite3.Connection) -> list[Event]:
            rows = conn.execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE timestamp BETWEEN ? AND ? ORDER BY timestamp, seq"
                " LIMIT ?", (start_ms, end_ms, limit)).fetchall()
            return [_event_from_row(r) for r in rows]
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

    # --- forwarding (API.md §9) -------------------------------------------------------

    async def forward_cursor(self) -> int:
        """The last seq the broker acknowledged in this epoch (0: nothing forwarded yet)."""
        def query(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT acked_seq FROM forward_cursor WHERE epoch = ?", (self.epoch,)).fetchone()
            return row[0] if row else 0
        return await self._read(query)

    async def store_forward_cursor(self, seq: int) -> int:
        """Move the cursor forward to ``seq`` (never back); returns the stored cursor, which
        the byte bound may have moved further."""
        return await self._submit(lambda fut: _Cursor(seq, fut))

    async def forward_page(self, after_seq: int, limit: int, max_bytes: int) -> list[tuple]:
        """Up to ``limit`` events with ``seq > after_seq``, oldest first, as raw rows
        (seq, event_id, type, source, timestamp, payload JSON, metadata JSON or None,
        canonical); cut once their payload and metadata exceed ``max_bytes`` (at least
        one row, so a single large event still moves)."""
        def query(conn: sqlite3.Connection) -> list[tuple]:
            rows, size = [], 0
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

    def _write_cursor(self, conn: sqlite3.Connection, seq: int) -> int:
        conn.execute("INSERT INTO forward_cursor (epoch, acked_seq) VALUES (?, ?) ON CONFLICT (epoch)"
                     " DO UPDATE SET acked_seq = max(acked_seq, excluded.acked_seq)", (self.epoch, seq))
        (stored,) = conn.execute("SELECT acked_seq FROM forward_cursor WHERE epoch = ?", (self.epoch,)).fetchone()
        if self.protect_after is not None:
            self.protect_after = max(self.protect_after, stored)
        return stored

    def drop_unforwarded(self, conn: sqlite3.Connection, deleted_seqs: Iterable[int]) -> int:
        """For the byte-bound prune under ``drop_oldest``, inside its transaction: the
        events it deleted that were not yet forwarded are lost to the broker, so the cursor
        moves past them. Returns how many there were (counted and logged)."""
        protect = self.protect_after
        if protect is None:
            return 0
        lost = [seq for seq in deleted_seqs if seq > protect]
        if lost:
            self._write_cursor(conn, max(lost))
            self.forward_dropped += len(lost)
            log.warning("forward_events_dropped", events=len(lost), up_to_seq=max(lost),
                        detail="the ledger byte bound pruned events not yet forwarded")
        return len(lost)

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
        conn = self._connect()
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise sqlite3.OperationalError(f"{self.path}: cannot use WAL journal mode (got {mode})")
            conn.execute("BEGIN IMMEDIATE")  # DDL is transactional: the upgrade happens whole or not at all
            for statement in _SCHEMA:
                conn.execute(statement)
            self._upgrade(conn)
            # A new file gets a new epoch: seq is only comparable within one epoch.
            conn.execute("INSERT OR IGNORE INTO ledger_info (key, value) VALUES ('epoch', ?)", (uuid.uuid4().hex,))
            self.epoch = conn.execute("SELECT value FROM ledger_info WHERE key = 'epoch'").fetchone()[0]
            conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        return conn

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
