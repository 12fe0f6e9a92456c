"""The ledger's writes: one writer thread, its queue, and group commit.

Rules it keeps
--------------
* An ``append`` returns only after the event's row is COMMITTED (with
  ``synchronous=FULL`` the WAL is fsynced, so it survives a power cut; ``NORMAL`` survives
  a crash of the process). A 201 answered after ``append`` therefore survives SIGKILL.
* The event loop never waits on the disk. All writes go through ONE writer thread
  (reads run on their own connections: reads.py).
* Before each chunk of appends is inserted the byte bound is checked, and between
  rounds the writer runs retention and vacuum: the rules of what the file may hold are
  in retention.py.
* A write the disk refuses (full, read-only, I/O error) raises ``LedgerUnavailable``:
  nothing of it is stored. The next write simply tries again, so ingest recovers by
  itself when space returns.

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
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import orjson

from ..gateway.events import Event
from ..gateway.health import HealthCheck
from ..log import log
from .errors import LedgerClosed, LedgerFull, LedgerUnavailable
from .retention import BOUND_RESERVE, DROP_LOG_INTERVAL, ROW_OVERHEAD, LedgerRetention
from .schema import (
    BUSY_TIMEOUT_MS,
    FORWARD_SENT,
    RUNTIME_TRUTH_SCHEMA,
    WRITE_CHUNK_BYTES,
    rollback,
    service_row_writer,
    upgrade_services,
)

SNIPPET_CHARS = 200  # API.md §7
DEAD_LETTERS_KEPT = 10_000  # dead-letter records kept (the oldest go first): a bounded table
DEAD_LETTER_DETAIL_CHARS = 1000  # of the broker's reason kept with a dead letter
# cursor writes on the loop (write_forward_cursor_now, two pages each) between two that go
# through the writer thread, whose commit runs the auto-checkpoint: about 512 KiB of WAL
CURSOR_RUN = 64


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


class LedgerWriter(LedgerRetention):
    """The ledger's writes (a role of ``Ledger``): every one is a job for the writer thread."""

    def _start_writer(self, conn: sqlite3.Connection) -> None:
        """Start the writer thread on ``conn``, the connection ``open_database`` made."""
        self._writer = threading.Thread(target=self._write_loop, args=(conn,), name="ledger-write", daemon=True)
        self._writer.start()

    async def _stop_writer(self) -> None:
        """Commit everything queued, then end the thread (it closes its connection)."""
        self._queue.put(_STOP)
        assert self._writer is not None  # start() made it before the ledger was open
        await asyncio.to_thread(self._writer.join)

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

    # --- the forwarder's cursor (API.md §9) -------------------------------------------

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
                rollback(conn)
                raise
        except sqlite3.Error:
            return None
        self._cursor_run += 1
        return stored

    async def rewind_forward_cursor(self, seq: int) -> int:
        """Set the cursor to ``seq``, also back (a rewind: the events after it are forwarded
        again and retention keeps them again); returns the stored cursor."""
        return await self._submit(lambda fut: _Cursor(seq, fut, rewind=True))

    async def dead_letter(self, seq: int, event_id: str, type_: str, reason: str, detail: str, at_ms: int) -> int:
        """Record event ``seq`` as a dead letter and move the cursor past it, in one
        transaction; returns the stored cursor."""
        dead = (seq, event_id, type_, reason, detail[:DEAD_LETTER_DETAIL_CHARS], at_ms)
        return await self._submit(lambda fut: _Cursor(seq, fut, dead=dead))

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
            rollback(conn)
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

    def _settle(self, results: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
        if results:
            # one wake-up of the loop per batch, not one per event
            self._started_loop().call_soon_threadsafe(_settle_futures, results)

    def _write_cursor(self, conn: sqlite3.Connection, seq: int, rewind: bool = False) -> int:
        conn.execute("INSERT INTO forward_cursor (epoch, acked_seq) VALUES (?, ?) ON CONFLICT (epoch) DO UPDATE SET"
                     f" acked_seq = {'excluded.acked_seq' if rewind else 'max(acked_seq, excluded.acked_seq)'}",
                     (self.epoch, seq))
        (stored,) = conn.execute("SELECT acked_seq FROM forward_cursor WHERE epoch = ?", (self.epoch,)).fetchone()
        return stored

    def _write_sent(self, conn: sqlite3.Connection, sent: int) -> None:
        conn.execute("INSERT INTO ledger_meta (key, value) VALUES (?, ?) ON CONFLICT (key)"
                     " DO UPDATE SET value = max(value, excluded.value)", (FORWARD_SENT + self.epoch, sent))

    def _write_dead_letter(self, conn: sqlite3.Connection, dead: tuple) -> None:
        conn.execute("INSERT OR REPLACE INTO forward_dead_letters (epoch, seq, event_id, type, reason, detail, at)"
                     " VALUES (?, ?, ?, ?, ?, ?, ?)", (self.epoch, *dead))
        (count,) = conn.execute("SELECT count(*) FROM forward_dead_letters").fetchone()
        if count > DEAD_LETTERS_KEPT:
            conn.execute("DELETE FROM forward_dead_letters WHERE rowid IN (SELECT rowid FROM forward_dead_letters"
                         " ORDER BY at, seq LIMIT ?)", (count - DEAD_LETTERS_KEPT,))

def write_health(conn: sqlite3.Connection, rows: list[tuple], service_row: Callable[[tuple], tuple]) -> None:
    """One round into the latest-health table (``service_row`` fits a row to its column
    types) and the history table (the ledger's own: Unix ms, integers)."""
    columns = "port, status, http_code, latency_ms, endpoint_ok, snippet, url, error, checked_at, service_name"
    for row in rows:
        latest = service_row(row)
        # UPDATE-then-INSERT rather than ON CONFLICT: an upgraded old table whose rows
        # hold duplicate names has no UNIQUE index to conflict on (see upgrade_services)
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
        upgrade_services(conn)
        write_health(conn, rows, service_row_writer(conn))
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise
    finally:
        conn.close()



def _settle_futures(results: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
    for future, value, exc in results:
        if future.done():  # the caller was cancelled; its write stands regardless
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)
