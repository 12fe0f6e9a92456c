"""The runtime-truth table in VX11's own database (API.md §7, §12, issue 22 item 6).

VX11 declares ``copilot_runtime_services`` with SQLAlchemy (``checked_at DateTime``,
``endpoint_ok String(128)``, ``latency_ms Integer``, ``port`` not null, beside tables of its
own). The model below declares the same columns the same way; the table is created by
SQLAlchemy, written by the real ``edgelink probe --db`` and read back through the model, as
VX11's tools read it.
"""

from __future__ import annotations

import sqlite3
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import Column, DateTime, Integer, String, Text, create_engine, select
from sqlalchemy.orm import Session, declarative_base

from conftest import EDGELINK, TOKEN, module_env
from fakemodule import FakeModule

Base = declarative_base()


class RuntimeService(Base):
    """The runtime-truth row as VX11's schema declares it."""

    __tablename__ = "copilot_runtime_services"
    id = Column(Integer, primary_key=True)
    service_name = Column(String(128), unique=True, nullable=False)
    host = Column(String(128), default="localhost")
    port = Column(Integer, nullable=False)
    health_url = Column(String(256), nullable=True)
    status = Column(String(32), default="unknown")
    http_code = Column(Integer, nullable=True)
    latency_ms = Column(Integer, nullable=True)
    endpoint_ok = Column(String(128), nullable=True)
    snippet = Column(Text, nullable=True)
    last_check = Column(DateTime, nullable=True)
    checked_at = Column(DateTime, nullable=True)
    created_at = Column(DateTime, nullable=True)


class Decision(Base):
    """One of VX11's other tables: the probe must leave it alone."""

    __tablename__ = "madre_decisions"
    id = Column(Integer, primary_key=True)
    summary = Column(Text)


def _vx11_database(path: Path) -> None:
    engine = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.add(Decision(summary="kept"))
        session.add(RuntimeService(service_name="madre", port=8001, status="unknown"))  # VX11's own row
        session.commit()
    engine.dispose()


def _schema(path: Path) -> dict[str, object]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        return {
            # SQLite's own sqlite_sequence comes with any AUTOINCREMENT table
            "tables": sorted(n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"
                                                         " AND name NOT LIKE 'sqlite_%'")),
            "auto_vacuum": conn.execute("PRAGMA auto_vacuum").fetchone()[0],
            "journal_mode": conn.execute("PRAGMA journal_mode").fetchone()[0],
        }


def test_probe_writes_vx11_column_types_and_touches_only_the_runtime_truth_tables(tmp_path: Path) -> None:
    db = tmp_path / "vx11.db"
    _vx11_database(db)
    before = _schema(db)
    with FakeModule("madre") as madre:
        env = {"PATH": "/usr/bin:/bin", **module_env({"madre": madre}), "VX11_GATEWAY_TOKEN": TOKEN,
               "EDGELINK_HEALTH_TIMEOUT": "0.5"}
        started = datetime.now(timezone.utc).replace(tzinfo=None)
        for _ in range(2):  # a second round updates the rows in place
            proc = subprocess.run([EDGELINK, "probe", "--db", str(db)], env=env, capture_output=True, text=True,
                                  timeout=60)
            assert proc.returncode == 1, proc.stdout + proc.stderr  # most modules are down

    # read back through the model, as VX11's tools do: this raised TypeError with integers
    engine = create_engine(f"sqlite:///{db}")
    with Session(engine) as session:
        rows = {r.service_name: r for r in session.scalars(select(RuntimeService))}
        assert session.scalars(select(Decision)).one().summary == "kept"
    engine.dispose()
    assert set(rows) >= {"madre", "switch", "tentaculo_link"} and len(rows) == 10
    row = rows["madre"]
    assert (row.status, row.http_code, row.port, row.endpoint_ok) == ("ok", 200, madre.port, "/health")
    assert isinstance(row.latency_ms, int) and row.latency_ms >= 0
    assert isinstance(row.checked_at, datetime)
    assert started - timedelta(seconds=1) <= row.checked_at <= datetime.now(timezone.utc).replace(tzinfo=None)
    down = rows["switch"]
    assert (down.status, down.endpoint_ok, down.http_code) == ("unreachable", None, None)

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        stored = conn.execute("SELECT typeof(checked_at), checked_at, typeof(endpoint_ok), typeof(latency_ms)"
                              " FROM copilot_runtime_services WHERE service_name = 'madre'").fetchone()
        # SQLAlchemy's own DateTime text on SQLite, which Python 3.10's fromisoformat reads
        assert stored[0] == "text" and datetime.fromisoformat(stored[1]) == row.checked_at
        assert len(stored[1]) == len("2026-01-01 00:00:00.000000")
        assert stored[2:] == ("text", "integer")
        assert conn.execute("SELECT count(*) FROM copilot_runtime_services_history").fetchone()[0] == 20

    after = _schema(db)
    # no ledger tables, the same journal mode and auto-vacuum; the history table is runtime truth too
    assert set(after["tables"]) - set(before["tables"]) == {"copilot_runtime_services_history"}
    assert (after["auto_vacuum"], after["journal_mode"]) == (before["auto_vacuum"], before["journal_mode"])
    assert not Path(f"{db}.epoch").exists()
