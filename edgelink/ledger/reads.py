"""The ledger's reads: replay, the timeline's queries, health, and the forwarder's pages.

Rules it keeps
--------------
* The event loop never waits on the disk: reads run on a small pool of reader
  connections (``query_only``) in threads, and WAL lets them read while the writer
  writes (writer.py).
* Each query is one read transaction: a consistent snapshot across its statements.
* An answer is bounded: by a row ``limit`` always, and where rows can be big by bytes too
  (``between``, ``forward_page``), reading row by row so a wide range costs no memory;
  counting by type reads the per-minute counts, never all the events (schema.py).
"""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import orjson

from ..gateway.events import Event
from .errors import LedgerClosed
from .schema import BUCKET_MS, FORWARD_DROPPED, FORWARD_SENT, PRUNED_BROADCAST
from .state import LedgerState

READERS = 2  # reader connections; the box has few cores and reads are short


# What an event's JSON costs besides its type, source, payload and metadata (keys, event_id,
# seq, timestamp, a summary in place of a long field): for answers bounded in bytes.
_ROW_JSON = 200
_EVENT_COLUMNS = "seq, event_id, type, source, timestamp, payload, metadata, canonical, broadcast"
_HEALTH_COLUMNS = "service_name, status, http_code, latency_ms, url, error, checked_at"


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


class LedgerReads(LedgerState):
    """The ledger's reads (a role of ``Ledger``): each runs on a reader connection."""

    async def _open_readers(self) -> None:
        """Open the reader connections and the threads that run queries on them."""
        readers = await asyncio.to_thread(lambda: [self._connect(read_only=True) for _ in range(READERS)])
        for reader in readers:
            self._reader_pool.put(reader)
        self._readers = ThreadPoolExecutor(READERS, thread_name_prefix="ledger-read")

    async def _close_readers(self) -> None:
        assert self._readers is not None  # start() made them before the ledger was open
        await asyncio.to_thread(self._readers.shutdown)
        while not self._reader_pool.empty():
            self._reader_pool.get().close()

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
            pruned = conn.execute("SELECT value FROM ledger_meta WHERE key = ?", (PRUNED_BROADCAST,)).fetchone()
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
            pruned = conn.execute("SELECT value FROM ledger_meta WHERE key = ?", (PRUNED_BROADCAST,)).fetchone()
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
        """The recorded health checks of ``service`` with ``checked_at >= since_ms``, oldest first:
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

    async def forward_sent_seq(self) -> int:
        """The highest seq sent as of the last cursor write in this epoch (0: none)."""
        def query(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT value FROM ledger_meta WHERE key = ?", (FORWARD_SENT + self.epoch,)).fetchone()
            return row[0] if row else 0
        return await self._read(query)

    async def forward_dropped(self) -> int:
        """Unforwarded events of this epoch the byte bound dropped, in all (0: none)."""
        def query(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT value FROM ledger_meta WHERE key = ?",
                               (FORWARD_DROPPED + self.epoch,)).fetchone()
            return row[0] if row else 0
        return await self._read(query)

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
