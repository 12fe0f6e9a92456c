"""The reference peer's event ledger: SQLite in WAL mode, one commit per event.

Written the usual way: one connection, used only by one dedicated writer thread (the app
runs every ledger call in a ``ThreadPoolExecutor(max_workers=1)``, so no lock is needed),
the insert and its commit done before the caller answers 201. ``synchronous`` follows
``EDGELINK_LEDGER_SYNC`` (FULL by default, so a committed row survives a power cut).

The events table and its indexes are edgelink's own (``edgelink/ledger/schema.py``), so both
servers maintain the same b-trees per insert.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelink.ledger import EVENTS_SCHEMA


@dataclass(frozen=True)
class StoredEvent:
    seq: int
    event_id: str
    type: str
    source: str
    timestamp: int
    payload: dict[str, Any]
    metadata: dict[str, Any] | None

    def frame(self) -> str:
        """The WebSocket broadcast frame (API.md §6)."""
        return json.dumps({
            "channel": "event", "event_id": self.event_id, "seq": self.seq, "type": self.type,
            "source": self.source, "timestamp": self.timestamp, "payload": self.payload,
            "metadata": self.metadata,
        })


class Ledger:
    def __init__(self, path: str, sync: str) -> None:
        self._path = Path(path)
        self._sync = sync
        self._conn: sqlite3.Connection | None = None
        self.last_seq = 0

    def open(self) -> None:
        """Open the database; call it in the writer thread, which alone uses the connection."""
        self._path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self._path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._sync.upper()}")
        for statement in EVENTS_SCHEMA:  # edgelink's own: the same b-trees per insert
            conn.execute(statement)
        conn.commit()
        self.last_seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
        self._conn = conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def append(self, source: str, type_: str, payload: dict[str, Any], metadata: dict[str, Any] | None,
               *, canonical: bool, broadcast: bool) -> StoredEvent:
        """Insert one event and commit it; blocking, so callers run it in the writer thread."""
        event_id = uuid.uuid4().hex
        timestamp = int(time.time() * 1000)
        row = (event_id, type_, source, timestamp, json.dumps(payload),
               None if metadata is None else json.dumps(metadata), canonical, broadcast)
        with self._conn:  # commits on leaving the block
            cursor = self._conn.execute(
                "INSERT INTO events (event_id, type, source, timestamp, payload, metadata, canonical, broadcast)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
        self.last_seq = cursor.lastrowid
        return StoredEvent(cursor.lastrowid, event_id, type_, source, timestamp, payload, metadata)
