"""What the ledger's file may hold: the byte bound, retention by count and age, and vacuum.

These run on the writer thread (writer.py), inside its transactions or between them.

Rules it keeps
--------------
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
* A deleted broadcast event is remembered (its seq), so a replay from below it says it
  missed events.
"""

from __future__ import annotations

import sqlite3
import time

from ..log import log
from .schema import FORWARD_DROPPED, MIB, PRUNED_BROADCAST, WAL_LIMIT, WRITE_CHUNK_BYTES, rollback
from .state import LedgerState

PRUNE_INTERVAL = 60.0  # seconds between retention passes
PRUNE_BATCH = 500  # rows deleted per retention transaction: short enough not to delay appends
# Room kept under max_bytes for the WAL (limit plus one chunk) and for the error of
# estimating a row's pages from its bytes.
BOUND_RESERVE = WAL_LIMIT + 3 * WRITE_CHUNK_BYTES
ROOM_MEASURE_INTERVAL = 1.0  # seconds an estimate of the pages in use may stand on an old measure
ROW_OVERHEAD = 64  # bytes an event row costs beyond its fields: record header, index entries
VACUUM_KEEP = 4 * MIB  # free pages kept for reuse; beyond this they go back to the file system
VACUUM_STEP = 256  # pages per incremental_vacuum step (1 MiB at 4 KiB pages): one short write
DROP_LOG_INTERVAL = 60.0  # seconds between log lines about events dropped at the byte bound


class LedgerRetention(LedgerState):
    """The space rules (a role of ``Ledger``), called by the writer thread only."""

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
        if unforwarded:  # kept with the deletion: the forwarder's dropped count survives a restart
            conn.execute("INSERT INTO ledger_meta (key, value) VALUES (?, ?) ON CONFLICT (key)"
                         " DO UPDATE SET value = value + excluded.value", (FORWARD_DROPPED + self.epoch, unforwarded))
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

    @staticmethod
    def _record_lost_broadcast(conn: sqlite3.Connection, seq: int | None) -> None:
        # a replay from below this seq has missed events
        if seq is not None:
            conn.execute(
                "INSERT INTO ledger_meta (key, value) VALUES (?, ?) ON CONFLICT (key)"
                " DO UPDATE SET value = max(value, excluded.value)", (PRUNED_BROADCAST, seq))

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
            rollback(conn)
            return 0, False

    def _protected_after(self, conn: sqlite3.Connection) -> int | None:
        """The seq above which retention deletes nothing (the stored cursor), None when
        forwarding is off; read inside the caller's transaction."""
        if not self.forwarding:
            return None
        row = conn.execute("SELECT acked_seq FROM forward_cursor WHERE epoch = ?", (self.epoch,)).fetchone()
        return row[0] if row else 0
