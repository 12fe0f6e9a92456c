"""The ledger's file: its tables, how it is opened, and how an older one is upgraded.

Rules it keeps
--------------
* ``seq`` is strictly increasing and never reused, also after retention deleted the
  newest rows: ``AUTOINCREMENT`` keeps the high-water mark in ``sqlite_sequence``.
* Per-type event counts per minute bucket are kept by triggers, in the transaction of
  every insert and delete, so ``counts_by_type`` never scans all the events.
* An older database is upgraded in place, in one transaction (the upgrade happens whole
  or not at all): missing tables, columns, indexes and triggers are added, nothing is
  dropped. There is no stored schema version: what is missing is read from the file.
* A file that is not SQLite, or shorter than its header says, is refused before SQLite
  touches it (``LedgerUnusable``); a new file gets a new epoch, kept beside it, so a lost
  or replaced file is noticed.
* The file uses WAL (readers read while the writer writes), incremental auto-vacuum (an
  older file is converted at start when small enough), and a WAL held near ``WAL_LIMIT``.
* A database the ledger did not create (VX11's own) is written as its columns are
  declared (``service_row_writer``).
* Every connection (``connect``) makes its transactions explicit and waits up to
  BUSY_TIMEOUT_MS for another process's lock; a failed transaction is ended without
  killing the thread that ran it (``rollback``).
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
import uuid
from datetime import datetime, timezone
from typing import Callable, NamedTuple

from ..log import log
from .errors import LedgerUnusable

HEALTH_ENDPOINT = "/health"  # what a health check calls: a text endpoint_ok column names it when it answered
BUSY_TIMEOUT_MS = 5000  # another process (``edgelink probe``) may hold the write lock briefly
MIB = 1024 * 1024
WRITE_CHUNK_BYTES = MIB  # appends per transaction, in bytes: bounds what one commit adds to the WAL
WAL_LIMIT = 4 * MIB  # the auto-checkpoint threshold (SQLite's default of 1000 pages, about 4 MiB)
CONVERT_MAX_BYTES = 64 * MIB  # an older file without auto_vacuum is VACUUMed at start up to this size
BUCKET_MS = 60_000  # per-type counts are kept per minute of event timestamp

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
    # the first version of this table; upgrade_services adds the later columns and the unique index
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
# events. An older database gets them filled once, when they are created (upgrade_counts).
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
PRUNED_BROADCAST = "pruned_broadcast_seq"
# Highest seq the forwarder had sent when it last stored its cursor (per epoch: key + epoch):
# after a restart, sending one at or below it again counts as a resend.
FORWARD_SENT = "forward_sent_seq:"
FORWARD_DROPPED = "forward_dropped:"  # per epoch: unforwarded events dropped at the byte bound, in all


class Opened(NamedTuple):
    """A database opened for writing, and what the ledger learnt about it."""
    conn: sqlite3.Connection
    epoch: str  # the file's random id (API.md §5)
    page_size: int
    service_row: Callable[[tuple], tuple]  # what the latest-health table's types need
    reclaimable: bool  # auto_vacuum is on: pruned space goes back to the file system


def connect(path: str, sync: str, read_only: bool = False) -> sqlite3.Connection:
    # autocommit mode: transactions are explicit; check_same_thread off because a
    # connection is opened on one thread and used on another (one at a time)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                           timeout=BUSY_TIMEOUT_MS / 1000)
    conn.execute(f"PRAGMA synchronous = {sync.upper()}")
    if read_only:
        conn.execute("PRAGMA query_only = ON")
    return conn


def rollback(conn: sqlite3.Connection) -> None:
    # SQLite ends the transaction itself on some errors (disk full, I/O); a failing
    # ROLLBACK must not kill the writer thread, whose callers would then wait forever
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error as exc:
        log.error("ledger_rollback_failed", error=repr(exc))


def open_database(path: str, sync: str) -> Opened:
    """Open ``path`` for the writer, creating or upgrading its tables in one transaction."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    existed = check_file(path)
    conn = connect(path, sync)
    try:
        if not existed:
            # takes effect only before the first table is created
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise sqlite3.OperationalError(f"{path}: cannot use WAL journal mode (got {mode})")
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        # After a checkpoint the WAL is reset and cut back to this; one chunk above the
        # threshold, so the usual WAL is reused rather than cut and regrown each time.
        conn.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT + WRITE_CHUNK_BYTES}")
        conn.execute(f"PRAGMA wal_autocheckpoint = {max(1, WAL_LIMIT // page_size)}")
        conn.execute("BEGIN IMMEDIATE")  # DDL is transactional: the upgrade happens whole or not at all
        for statement in (*_SCHEMA, *RUNTIME_TRUTH_SCHEMA):
            conn.execute(statement)
        upgrade_services(conn)
        service_row = service_row_writer(conn)
        upgrade_counts(conn)
        # A new file gets a new epoch: seq is only comparable within one epoch.
        conn.execute("INSERT OR IGNORE INTO ledger_info (key, value) VALUES ('epoch', ?)", (uuid.uuid4().hex,))
        epoch = conn.execute("SELECT value FROM ledger_info WHERE key = 'epoch'").fetchone()[0]
        conn.execute("COMMIT")
        reclaimable = enable_reclaim(conn, path)
    except BaseException:
        conn.close()
        raise
    record_epoch(path, epoch, existed)
    return Opened(conn, epoch, page_size, service_row, reclaimable)


def upgrade_counts(conn: sqlite3.Connection) -> None:
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'event_counts'").fetchone() is None:
        for statement in (*_COUNTS_TABLES, *_COUNTS_FILL):
            conn.execute(statement)
    for statement in _COUNTS_TRIGGERS:
        conn.execute(statement)


def enable_reclaim(conn: sqlite3.Connection, path: str) -> bool:
    """Make sure pruned space can go back to the file system (incremental auto-vacuum);
    whether it can.

    A file made before it was turned on is converted with VACUUM at start when it is
    small enough to do so quickly; a bigger one keeps reusing its free pages."""
    (mode,) = conn.execute("PRAGMA auto_vacuum").fetchone()
    if mode == 0:  # NONE
        size = os.path.getsize(path)
        if size <= CONVERT_MAX_BYTES:
            try:
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
                conn.execute("VACUUM")
                (mode,) = conn.execute("PRAGMA auto_vacuum").fetchone()
                log.info("ledger_converted", db=path, bytes=size, detail="incremental auto-vacuum on")
            except sqlite3.Error as exc:
                log.warning("ledger_convert_failed", db=path, error=str(exc))
        if mode == 0:
            log.warning("ledger_space_not_returned", db=path, bytes=size,
                        detail="this file predates incremental auto-vacuum and is too big to convert at "
                        "start: pruned space is reused but not given back to the file system; VACUUM it "
                        "offline after PRAGMA auto_vacuum = INCREMENTAL to convert it")
    return mode == 2  # INCREMENTAL (FULL gives space back at each commit)


def record_epoch(path: str, epoch: str, existed: bool) -> None:
    """Keep the epoch beside the database, so a lost or replaced file is noticed."""
    record = path + ".epoch"
    try:
        with open(record, encoding="ascii") as f:
            previous = f.read().strip()
    except (OSError, UnicodeDecodeError):
        previous = ""
    if previous == epoch:
        return
    if previous:
        log.warning("ledger_epoch_changed", db=path, previous_epoch=previous, epoch=epoch,
                    detail=("the database file was missing and has been created again" if not existed
                            else "the database file was replaced") + "; seq restarted in a new epoch")
    try:
        with open(record + ".tmp", "w", encoding="ascii") as f:
            f.write(epoch + "\n")
        os.replace(record + ".tmp", record)
    except OSError as exc:
        log.warning("ledger_epoch_unrecorded", path=record, error=str(exc))


def upgrade_services(conn: sqlite3.Connection) -> None:
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


def same_row(row: tuple) -> tuple:
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
        return same_row

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


def foreign_database(path: str) -> bool:
    """Whether ``path`` is an SQLite database the ledger did not create (VX11's own, say):
    ``edgelink probe --db`` then writes only the runtime-truth tables into it. A file that
    is missing, empty or not SQLite is not foreign (the ledger creates it, or says why not)."""
    try:
        if not check_file(path):
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


def check_file(path: str) -> bool:
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
