"""The SQLite ledger (edgelink/ledger/), on real files in tmp_path."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest

from clock import T0, Clock
from conftest import next_loop_turn, until
from edgelink.config import Settings
from edgelink.gateway.events import Event, build_event
from edgelink.gateway.health import HealthCheck
from edgelink.ledger import (
    BUCKET_MS,
    EVENTS_SCHEMA,
    MIB,
    SNIPPET_CHARS,
    WAL_LIMIT,
    WRITE_CHUNK_BYTES,
    Ledger,
    LedgerClosed,
    LedgerFull,
    LedgerUnavailable,
)

DAY_MS = 86_400_000


def event(type_: str = "custom.event", ts_ms: int = int(T0 * 1000), broadcast: bool = False,
          payload: dict | None = None, metadata: dict | None = None) -> Event:
    if type_ == "system.alert" and payload is None:
        payload = {"alert_id": "a", "severity": "high", "message": "m", "timestamp": ts_ms}
    return build_event(type_, "test", payload if payload is not None else {"n": 1}, metadata, broadcast, ts_ms)


@contextlib.asynccontextmanager
async def opened(path: Path, **kwargs):
    kwargs.setdefault("now", Clock())
    kwargs.setdefault("prune_interval", 3600)  # the tests that want a background pass ask for one
    ledger = Ledger(str(path), **kwargs)
    await ledger.start()
    try:
        yield ledger
    finally:
        await ledger.close()


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(str(path), isolation_level=None)


def stored_seqs(path: Path) -> list[int]:
    """Every seq in the file, oldest first, read beside the ledger's own connections."""
    with contextlib.closing(raw(path)) as conn:
        return [seq for (seq,) in conn.execute("SELECT seq FROM events ORDER BY seq")]


def run(coro):
    return asyncio.run(coro)


# --- opening ------------------------------------------------------------------------------


def test_creates_parent_directories_and_uses_wal(tmp_path):
    path = tmp_path / "a" / "b" / "edgelink.db"

    async def main():
        async with opened(path):
            assert raw(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    run(main())
    assert path.exists()


@pytest.mark.parametrize("sync, level", [("full", 2), ("normal", 1)])
def test_sync_mode_is_applied(tmp_path, sync, level):
    ledger = Ledger(str(tmp_path / "x.db"), sync=sync)
    assert ledger._connect().execute("PRAGMA synchronous").fetchone()[0] == level


def test_bad_sync_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sync"):
        Ledger(str(tmp_path / "x.db"), sync="off")


def test_from_settings(tmp_path):
    settings = Settings(db=str(tmp_path / "s.db"), ledger_sync="normal", retention_events=5, retention_days=2.5)
    ledger = Ledger.from_settings(settings)
    assert (ledger.path, ledger.sync, ledger.retention_events, ledger.retention_days) == \
        (settings.db, "normal", 5, 2.5)


# --- appending ----------------------------------------------------------------------------


def test_append_is_committed_before_it_returns(tmp_path):
    path = tmp_path / "l.db"

    async def main():
        async with opened(path) as ledger:
            e = event("system.alert", broadcast=True, metadata={"k": "v"})
            seq = await ledger.append(e)
            # another connection sees the row at once: it was committed, not just queued
            row = raw(path).execute("SELECT seq, event_id, type, canonical, broadcast FROM events").fetchone()
            assert row == (seq, e.event_id, "system.alert", 1, 1)
            replayed, _ = await ledger.replay(0, 10)
            assert replayed == [e.with_seq(seq)]

    run(main())


def test_epoch_is_kept_by_the_file_and_new_with_a_new_file(tmp_path):
    path = tmp_path / "l.db"

    async def epoch() -> str:
        async with opened(path) as ledger:
            return ledger.epoch

    first, again = run(epoch()), run(epoch())
    assert len(first) == 32 and first == again
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"l.db{suffix}").unlink(missing_ok=True)
    assert run(epoch()) not in ("", first)


def test_seq_is_strictly_increasing_across_reopen(tmp_path):
    path = tmp_path / "l.db"

    async def batch() -> list[int]:
        async with opened(path) as ledger:
            return [await ledger.append(event()) for _ in range(5)]

    first, second = run(batch()), run(batch())
    assert first + second == sorted(set(first + second)) and second[0] > first[-1]


def test_group_commit_batches_concurrent_appends(tmp_path):
    path = tmp_path / "l.db"

    async def main():
        async with opened(path) as ledger:
            await ledger.prune()  # let the start-up retention pass finish: it commits too
            before = ledger.commits
            # Hold the write lock from outside so the writer is stuck on its first batch
            # while the other appends queue up behind it; they must then commit together.
            blocker = raw(path)
            blocker.execute("BEGIN IMMEDIATE")
            tasks = [asyncio.create_task(ledger.append(event())) for _ in range(200)]
            await next_loop_turn()  # every task has queued its event
            blocker.execute("COMMIT")
            seqs = await asyncio.gather(*tasks)
            assert sorted(seqs) == list(range(seqs[0], seqs[0] + 200)) and len(set(seqs)) == 200
            assert ledger.commits - before <= 2

    run(main())


def test_a_failed_write_reaches_its_callers_and_the_ledger_goes_on(tmp_path):
    path = tmp_path / "l.db"

    async def main():
        async with opened(path) as ledger:
            raw(path).execute("CREATE TRIGGER refuse BEFORE INSERT ON events WHEN NEW.type = 'boom'"
                              " BEGIN SELECT RAISE(ABORT, 'disk says no'); END")
            with pytest.raises(LedgerUnavailable, match="disk says no"):
                await ledger.append(event("boom"))
            assert await ledger.append(event("fine")) >= 1
            assert await ledger.counts_by_type(2**62) == {"fine": 1}

    run(main())


def test_a_cancelled_append_is_still_committed(tmp_path):
    path = tmp_path / "l.db"

    async def main():
        async with opened(path) as ledger:
            e = event()
            task = asyncio.create_task(ledger.append(e))
            await next_loop_turn()  # queued
            task.cancel()
        # close() flushed it
        return e

    e = run(main())
    assert raw(path).execute("SELECT event_id FROM events").fetchall() == [(e.event_id,)]


def test_close_flushes_pending_appends(tmp_path):
    path = tmp_path / "l.db"

    async def main():
        ledger = Ledger(str(path), now=Clock(), prune_interval=3600)
        await ledger.start()
        tasks = [asyncio.create_task(ledger.append(event())) for _ in range(50)]
        await next_loop_turn()  # every append is queued, none answered yet
        await ledger.close()
        seqs = [t.result() for t in tasks]  # all done by the time close() returns
        with pytest.raises(LedgerClosed):
            await ledger.append(event())
        with pytest.raises(LedgerClosed):
            await ledger.last_seq()
        await ledger.close()  # a second close is harmless
        return seqs

    seqs = run(main())
    assert raw(path).execute("SELECT count(*), max(seq) FROM events").fetchone() == (50, max(seqs))


def test_use_before_start_is_refused(tmp_path):
    with pytest.raises(LedgerClosed):
        run(Ledger(str(tmp_path / "l.db")).append(event()))


# --- reading ------------------------------------------------------------------------------


def test_replay_returns_newest_broadcast_events_with_truncation(tmp_path):
    async def main():
        async with opened(tmp_path / "l.db") as ledger:
            seqs = [await ledger.append(event(broadcast=i % 2 == 0, type_="system.alert" if i % 2 == 0
                                              else "custom")) for i in range(10)]
            broadcast = seqs[0::2]  # 5 broadcast events
            events, truncated = await ledger.replay(0, 10)
            assert [e.seq for e in events] == broadcast and not truncated
            events, truncated = await ledger.replay(0, 3)
            # the newest three: they join the live stream without a gap
            assert [e.seq for e in events] == broadcast[-3:] and truncated
            events, truncated = await ledger.replay(broadcast[1], 3)
            assert [e.seq for e in events] == broadcast[2:] and not truncated
            assert await ledger.replay(seqs[-1], 10) == ([], False)
            assert await ledger.replay(0, 0) == ([], True)

    run(main())


def test_replay_reports_events_lost_to_retention(tmp_path):
    async def main():
        async with opened(tmp_path / "l.db", retention_events=3) as ledger:
            seqs = [await ledger.append(event("system.alert", broadcast=True)) for _ in range(5)]
            assert await ledger.prune() == 2
            events, truncated = await ledger.replay(0, 10)
            assert [e.seq for e in events] == seqs[2:] and truncated  # seqs[0:2] were missed
            events, truncated = await ledger.replay(seqs[1], 10)
            assert [e.seq for e in events] == seqs[2:] and not truncated

    run(main())


def test_last_seq(tmp_path):
    async def main():
        async with opened(tmp_path / "l.db") as ledger:
            assert await ledger.last_seq() == 0
            seq = [await ledger.append(event()) for _ in range(3)][-1]
            assert await ledger.last_seq() == seq

    run(main())


def test_counts_and_recent_at_a_time(tmp_path):
    base = int(T0 * 1000)

    async def main():
        async with opened(tmp_path / "l.db") as ledger:
            for i, type_ in enumerate(["a", "b", "a", "c", "a", "b"]):
                await ledger.append(event(type_, ts_ms=base + i * 1000))
            assert await ledger.counts_by_type(base + 3000) == {"a": 2, "b": 1, "c": 1}
            assert await ledger.counts_by_type(base - 1) == {}
            recent = await ledger.recent(base + 4000, 3)
            assert [(e.type, e.timestamp) for e in recent] == [("a", base + 4000), ("c", base + 3000),
                                                              ("a", base + 2000)]

    run(main())


def test_events_round_trip(tmp_path):
    async def main():
        async with opened(tmp_path / "l.db") as ledger:
            e = event("system.alert", broadcast=True, metadata={"correlation_id": "c", "n": [1, 2.5, None]})
            seq = await ledger.append(e)
            assert await ledger.recent(2**62, 1) == [e.with_seq(seq)]

    run(main())


# --- retention ----------------------------------------------------------------------------


def test_retention_by_count_keeps_the_newest(tmp_path):
    async def main():
        async with opened(tmp_path / "l.db", retention_events=10) as ledger:
            seqs = [await ledger.append(event()) for _ in range(25)]
            assert await ledger.prune() == 15
            kept = await ledger.recent(2**62, 100)  # newest first
            assert [e.seq for e in reversed(kept)] == seqs[-10:]
            assert await ledger.prune() == 0

    run(main())


def test_retention_by_age(tmp_path):
    clock = Clock()
    now_ms = int(T0 * 1000)

    async def main():
        async with opened(tmp_path / "l.db", retention_days=1, now=clock) as ledger:
            await ledger.append(event("old", ts_ms=now_ms - 2 * DAY_MS))
            await ledger.append(event("edge", ts_ms=now_ms - DAY_MS))  # exactly one day: kept
            await ledger.append(event("new", ts_ms=now_ms))
            assert await ledger.prune() == 1
            assert await ledger.counts_by_type(2**62) == {"edge": 1, "new": 1}
            clock.t += 3 * 86_400
            assert await ledger.prune() == 2
            assert await ledger.counts_by_type(2**62) == {}

    run(main())


def test_seq_is_never_reused_after_everything_was_pruned(tmp_path):
    clock = Clock()

    async def main():
        async with opened(tmp_path / "l.db", retention_days=1, now=clock) as ledger:
            seqs = [await ledger.append(event(ts_ms=int(clock.t * 1000))) for _ in range(3)]
            clock.t += 2 * 86_400
            assert await ledger.prune() == 3
            assert await ledger.last_seq() == seqs[-1]
            assert await ledger.append(event(ts_ms=int(clock.t * 1000))) == seqs[-1] + 1

    run(main())


def test_retention_runs_in_small_transactions(tmp_path):
    async def main():
        async with opened(tmp_path / "l.db", retention_events=1, prune_batch=7) as ledger:
            for _ in range(31):
                await ledger.append(event())
            before = ledger.commits
            assert await ledger.prune() == 30
            assert ledger.commits - before == 5  # 7 + 7 + 7 + 7 + 2
            assert await ledger.counts_by_type(2**62) == {"custom.event": 1}

    run(main())


def test_retention_runs_in_the_background(tmp_path):
    async def main():
        async with opened(tmp_path / "l.db", retention_events=5, prune_interval=0.01) as ledger:
            for _ in range(20):
                await ledger.append(event())
            async def five_left() -> bool:
                return sum((await ledger.counts_by_type(2**62)).values()) == 5
            await until(five_left, why="the background pass")  # no timing is asserted
            assert await ledger.counts_by_type(2**62) == {"custom.event": 5}

    run(main())


def test_appends_are_served_between_retention_batches(tmp_path):
    path = tmp_path / "l.db"

    async def main():
        async with opened(path, retention_events=1, prune_batch=1) as ledger:
            await asyncio.gather(*(ledger.append(event()) for _ in range(20)))
            db = raw(path)
            db.execute("CREATE TABLE log (n INTEGER PRIMARY KEY, what TEXT)")
            db.execute("CREATE TRIGGER d AFTER DELETE ON events BEGIN INSERT INTO log (what) VALUES ('delete'); END")
            db.execute("CREATE TRIGGER i AFTER INSERT ON events BEGIN INSERT INTO log (what) VALUES ('insert'); END")
            db.execute("BEGIN IMMEDIATE")  # holds the writer inside the first retention batch
            prune = asyncio.create_task(ledger.prune())
            await next_loop_turn()  # the request is queued
            await until(lambda: not ledger._queue.qsize(), why="the writer has taken the prune request")
            during = asyncio.create_task(ledger.append(event("during")))
            await next_loop_turn()
            db.execute("COMMIT")
            await asyncio.gather(during, prune)
            log = [what for (what,) in db.execute("SELECT what FROM log ORDER BY n")]
            # the append went in after one batch of the pass, not after all of them
            assert log[:2] == ["delete", "insert"] and log.count("delete") >= 19
            assert await ledger.counts_by_type(2**62) == {"during": 1}

    run(main())


# --- health ------------------------------------------------------------------------------


def probe(name: str, status: str, checked_at: int, snippet: str = "{}", port: int = 8001) -> HealthCheck:
    ok = status == "ok"
    return HealthCheck(name, status, 200 if ok else None, 12.5 if ok else None, f"http://127.0.0.1:{port}",
                       None if ok else "connection refused", snippet, port, checked_at)


def test_health_rounds_latest_history_and_health_at(tmp_path):
    path = tmp_path / "l.db"

    async def main():
        async with opened(path) as ledger:
            assert await ledger.health_at(10_000) == {}
            await ledger.record_health([probe("madre", "ok", 1000), probe("switch", "unreachable", 1000, port=8002)])
            await ledger.record_health([probe("madre", "error", 2000, snippet="x" * 500),
                                        probe("switch", "ok", 2000, port=8002)])
            assert await ledger.health_at(999) == {}
            assert await ledger.health_at(1500) == {
                "madre": {"status": "ok", "http_code": 200, "latency_ms": 12.5, "url": "http://127.0.0.1:8001",
                          "error": None, "checked_at": 1000},
                "switch": {"status": "unreachable", "http_code": None, "latency_ms": None,
                           "url": "http://127.0.0.1:8002", "error": "connection refused", "checked_at": 1000},
            }
            later = await ledger.health_at(2000)
            assert (later["madre"]["status"], later["switch"]["status"]) == ("error", "ok")

    run(main())
    db = raw(path)
    latest = db.execute("SELECT service_name, port, status, http_code, latency_ms, endpoint_ok, length(snippet),"
                        " checked_at FROM copilot_runtime_services ORDER BY service_name").fetchall()
    assert latest == [("madre", 8001, "error", None, None, 0, SNIPPET_CHARS, 2000),
                      ("switch", 8002, "ok", 200, 12.5, 1, 2, 2000)]
    history = db.execute("SELECT service_name, status, checked_at FROM copilot_runtime_services_history"
                         " ORDER BY checked_at, service_name").fetchall()
    assert history == [("madre", "ok", 1000), ("switch", "unreachable", 1000),
                       ("madre", "error", 2000), ("switch", "ok", 2000)]


def test_health_history_follows_age_retention(tmp_path):
    clock = Clock()
    now_ms = int(T0 * 1000)

    async def main():
        async with opened(tmp_path / "l.db", retention_days=1, now=clock) as ledger:
            await ledger.record_health([probe("madre", "ok", now_ms - 2 * DAY_MS)])
            await ledger.record_health([probe("madre", "error", now_ms)])
            assert await ledger.prune() == 1
            # the latest row still answers for times whose history is gone
            assert (await ledger.health_at(now_ms - DAY_MS)) == {}
            assert (await ledger.health_at(now_ms))["madre"]["status"] == "error"
            clock.t += 3 * 86_400
            await ledger.prune()
            assert (await ledger.health_at(now_ms + 1))["madre"]["status"] == "error"

    run(main())


def old_database(path: Path, rows: list[tuple]) -> None:
    db = raw(path)
    db.execute("CREATE TABLE copilot_runtime_services (id INTEGER PRIMARY KEY, service_name TEXT, port INTEGER,"
               " status TEXT)")
    db.executemany("INSERT INTO copilot_runtime_services (id, service_name, port, status) VALUES (?, ?, ?, ?)",
                   rows)
    db.close()


def test_old_schema_is_upgraded_in_place_keeping_rows(tmp_path):
    path = tmp_path / "old.db"
    old_rows = [(1, "madre", 8001, "healthy"), (2, "hermes", 8003, "down"), (7, "legacy", 9999, "unknown")]
    old_database(path, old_rows)

    async def main():
        async with opened(path) as ledger:
            # rows of the old version cannot be placed in time: no health_at answer from them
            assert await ledger.health_at(2**62) == {}
            await ledger.record_health([probe("madre", "ok", 5000), probe("switch", "ok", 5000, port=8002)])
            assert set(await ledger.health_at(5000)) == {"madre", "switch"}

    async def reopen():
        async with opened(path) as ledger:  # opening an upgraded database again changes nothing
            await ledger.record_health([probe("madre", "ok", 6000), probe("switch", "ok", 6000, port=8002)])

    run(main())
    run(reopen())
    db = raw(path)
    columns = [row[1] for row in db.execute("PRAGMA table_info(copilot_runtime_services)")]
    assert columns[:4] == ["id", "service_name", "port", "status"]
    assert {"http_code", "latency_ms", "endpoint_ok", "snippet", "checked_at"} <= set(columns)
    rows = db.execute("SELECT id, service_name, port, status FROM copilot_runtime_services ORDER BY id").fetchall()
    assert rows[:2] == [(1, "madre", 8001, "ok"), (2, "hermes", 8003, "down")]  # madre updated in place
    assert rows[2] == (7, "legacy", 9999, "unknown") and rows[3][1:] == ("switch", 8002, "ok")
    assert len(rows) == 4
    with pytest.raises(sqlite3.IntegrityError):  # service_name is now unique
        db.execute("INSERT INTO copilot_runtime_services (service_name) VALUES ('madre')")


def test_old_schema_with_duplicate_names_loses_nothing(tmp_path):
    path = tmp_path / "old.db"
    old_database(path, [(1, "madre", 8001, "a"), (2, "madre", 8001, "b")])

    async def main():
        async with opened(path) as ledger:
            await ledger.record_health([probe("madre", "ok", 5000)])
            assert (await ledger.health_at(5000))["madre"]["checked_at"] == 5000

    run(main())
    assert raw(path).execute("SELECT id, status FROM copilot_runtime_services ORDER BY id").fetchall() == \
        [(1, "ok"), (2, "ok")]


# --- crash safety -------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import asyncio, sys
    from edgelink.gateway.events import build_event
    from edgelink.ledger import Ledger

    async def one(ledger, n):
        event = build_event("custom.crash", "child", {"n": n}, None, False, n)
        seq = await ledger.append(event)
        print(event.event_id, seq, flush=True)  # the "201": printed only after the ack

    async def main():
        ledger = Ledger(sys.argv[1], sync=sys.argv[2])
        await ledger.start()
        n = 0
        while True:  # until SIGKILL
            await asyncio.gather(*(one(ledger, n + i) for i in range(25)))
            n += 25

    asyncio.run(main())
""")


@pytest.mark.parametrize("sync", ["full", "normal"])
def test_acknowledged_events_survive_sigkill(tmp_path, sync):
    path = tmp_path / "crash.db"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), sync], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    acked = {}
    try:
        for line in child.stdout:
            event_id, seq = line.split()
            acked[event_id] = int(seq)
            if len(acked) >= 300:
                break
        assert child.poll() is None, child.stderr.read()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        rest, _ = child.communicate()
    for line in rest.splitlines():  # acks printed before the kill landed
        parts = line.split()
        if len(parts) == 2 and len(parts[0]) == 32:
            acked[parts[0]] = int(parts[1])
    assert child.returncode == -signal.SIGKILL
    stored = dict(raw(path).execute("SELECT event_id, seq FROM events").fetchall())
    missing = {e: s for e, s in acked.items() if stored.get(e) != s}
    assert not missing, f"{len(missing)} acknowledged events lost"
    assert len(acked) >= 300


# --- the byte bound, reclaimed space, counts, the snapshot's reads --------------------------

BOUND = 16 * MIB


def big(i: int = 0, size: int = MIB - 4096, ts_ms: int = int(T0 * 1000)) -> Event:
    return event(f"big.{i % 2}", ts_ms=ts_ms, payload={"blob": "x" * size})


def file_bytes(path: Path) -> int:
    return sum(os.path.getsize(p) for p in (path, Path(f"{path}-wal")) if p.exists())


def test_drop_oldest_keeps_the_file_under_the_bound_and_reports_unforwarded_drops(tmp_path, capfd):
    path = tmp_path / "l.db"
    drops = []

    async def main():
        async with opened(path, max_bytes=BOUND, forwarding=True) as ledger:
            ledger.on_forced_drop = lambda *report: drops.append(report)
            seqs = [await ledger.append(big(i)) for i in range(3)]
            await ledger.store_forward_cursor(seqs[2])  # a forwarder acknowledged seq 1..3
            seqs += [await ledger.append(big(i)) for i in range(3, 40)]
            assert file_bytes(path) <= BOUND, file_bytes(path)
            assert os.path.getsize(f"{path}-wal") <= WAL_LIMIT + 2 * WRITE_CHUNK_BYTES
            kept = stored_seqs(path)
            assert kept == seqs[-len(kept):] and 5 <= len(kept) < 16  # the oldest went, in order
            await next_loop_turn()  # the reports arrive on the loop after each commit
            assert sum(d[0] for d in drops) == 40 - len(kept) == ledger.pruned["bytes"]
            assert sum(d[1] for d in drops) == 40 - len(kept) - 3  # all but the 3 forwarded ones
            assert drops[-1][2] == seqs[-len(kept)] - 1  # the highest seq dropped
            assert sum((await ledger.counts_by_type(2**62)).values()) == len(kept)
        async with opened(path, max_bytes=BOUND, forwarding=True) as ledger:
            # the unforwarded drops are kept with the deletions: a restart still knows them
            assert await ledger.forward_dropped() == 40 - len(kept) - 3
        return len(kept)

    kept = run(main())
    # the log tells every drop, exactly: the first line at once, the rest summed by close
    lines = [orjson.loads(line) for line in capfd.readouterr().err.splitlines() if "ledger_dropped_oldest" in line]
    assert len(lines) >= 2 and sum(r["events"] for r in lines) == 40 - kept, lines
    assert sum(r["unforwarded"] for r in lines) == 40 - kept - 3 and lines[-1]["last_seq"] == 40 - kept


@pytest.mark.parametrize("policy", ["drop_oldest", "reject"])
def test_the_bound_holds_for_many_small_events_between_page_measures(tmp_path, policy):
    # 2 KB events in commits of 100: the pages are measured once per chunk's worth of
    # writes, so the estimate in between must keep the file under the bound too
    path = tmp_path / "l.db"

    async def main():
        async with opened(path, max_bytes=BOUND, full_policy=policy, sync="normal") as ledger:
            refused = 0
            for batch in range(200):  # 40 MB offered, 2.5 times the bound
                results = await asyncio.gather(*(ledger.append(big(batch * 100 + i, size=2000)) for i in range(100)),
                                               return_exceptions=True)
                refused += sum(isinstance(r, LedgerFull) for r in results)
                assert file_bytes(path) <= BOUND, (batch, file_bytes(path))
            stored = len(stored_seqs(path))
            assert stored > 2000  # the room below the bound was used (about 2,300 fit), not refused early
            if policy == "reject":
                assert refused > 10_000 and stored == 20_000 - refused
            else:
                assert refused == 0 and ledger.pruned["bytes"] == 20_000 - stored

    run(main())


def test_reject_refuses_at_the_bound_and_accepts_again_once_retention_freed_space(tmp_path):
    path = tmp_path / "l.db"

    async def main():
        async with opened(path, max_bytes=BOUND, full_policy="reject", retention_events=2) as ledger:
            stored = 0
            with pytest.raises(LedgerFull):
                for i in range(40):
                    await ledger.append(big(i))
                    stored += 1
            assert 5 <= stored < 16
            assert len(stored_seqs(path)) == stored  # nothing stored was dropped
            await ledger.prune()  # count retention keeps 2: space for more
            assert await ledger.append(big()) > 0

    run(main())


def test_an_event_bigger_than_the_bound_is_refused_even_under_drop_oldest(tmp_path):
    async def main():
        async with opened(tmp_path / "l.db", max_bytes=BOUND) as ledger:
            first = await ledger.append(event())
            with pytest.raises(LedgerFull):
                await ledger.append(big(size=BOUND))
            assert stored_seqs(tmp_path / "l.db") == [first]  # nothing dropped for it

    run(main())


def test_count_and_age_retention_keep_events_not_yet_forwarded(tmp_path):
    clock = Clock()

    async def main():
        async with opened(tmp_path / "l.db", retention_events=2, retention_days=1, now=clock,
                          forwarding=True) as ledger:
            seqs = [await ledger.append(event()) for _ in range(10)]
            assert await ledger.prune() == 0  # nothing forwarded yet: nothing goes
            await ledger.store_forward_cursor(seqs[3])
            assert await ledger.prune() == 4  # count retention stops at the cursor
            clock.t += 3 * 86_400  # everything is old now
            assert await ledger.prune() == 0
            await ledger.store_forward_cursor(seqs[8])
            assert await ledger.prune() == 5
            assert stored_seqs(tmp_path / "l.db") == [seqs[9]]
            assert ledger.pruned == {"count": 8, "age": 1, "bytes": 0}

    run(main())


def test_pruned_space_goes_back_to_the_file_system(tmp_path):
    path = tmp_path / "l.db"

    async def main():
        async with opened(path, retention_events=1) as ledger:
            for i in range(30):
                await ledger.append(big(i))
            grown = os.path.getsize(path)
            await ledger.prune()
            # incremental vacuum runs in small steps between batches
            await until(lambda: os.path.getsize(path) < 8 * MIB, why="the file shrunk")
            assert grown > 25 * MIB and os.path.getsize(path) < 8 * MIB, (grown, os.path.getsize(path))

    run(main())
    assert raw(path).execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental


def pre_bound_database(path: Path, rows: int, ts_ms: int = int(T0 * 1000)) -> None:
    """A database as the previous version made it: no auto_vacuum, no count tables."""
    db = raw(path)
    db.execute("PRAGMA journal_mode = WAL")
    for statement in EVENTS_SCHEMA:
        db.execute(statement)
    db.execute("BEGIN")
    db.executemany("INSERT INTO events (event_id, type, source, timestamp, payload, metadata, canonical, broadcast)"
                   " VALUES (?, ?, 'old', ?, '{}', NULL, 0, 0)",
                   [(f"e{i}", f"type.{i % 3}", ts_ms + i * 7_000) for i in range(rows)])
    db.execute("COMMIT")
    db.close()


def test_an_older_database_gets_counts_and_incremental_vacuum_in_place(tmp_path):
    path = tmp_path / "old.db"
    pre_bound_database(path, 300)

    async def main():
        async with opened(path) as ledger:
            assert await ledger.counts_by_type(2**62) == {"type.0": 100, "type.1": 100, "type.2": 100}
            assert ledger.reclaimable
            await ledger.append(event("type.0"))
            assert (await ledger.counts_by_type(2**62))["type.0"] == 101

    run(main())
    assert raw(path).execute("PRAGMA auto_vacuum").fetchone()[0] == 2
    assert raw(path).execute("SELECT count(*) FROM events").fetchone()[0] == 301


def test_a_big_older_database_is_not_converted_but_says_so(tmp_path, monkeypatch, capfd):
    path = tmp_path / "old.db"
    pre_bound_database(path, 50)
    monkeypatch.setattr("edgelink.ledger.schema.CONVERT_MAX_BYTES", 1024)

    async def main():
        async with opened(path) as ledger:
            assert not ledger.reclaimable
            assert sum((await ledger.counts_by_type(2**62)).values()) == 50

    run(main())
    assert '"event":"ledger_space_not_returned"' in capfd.readouterr().err
    assert raw(path).execute("PRAGMA auto_vacuum").fetchone()[0] == 0


def test_counts_by_type_at_any_time_match_the_events(tmp_path):
    path = tmp_path / "l.db"
    base = int(T0 * 1000)
    # uneven timestamps across many minutes, several per minute, some on minute edges
    stamps = [base + (i * 7919) % (40 * BUCKET_MS) for i in range(400)] + [base + 5 * BUCKET_MS] * 3

    async def main():
        async with opened(path, retention_events=300) as ledger:
            for i, ts in enumerate(stamps):
                await ledger.append(event(f"t{i % 4}", ts_ms=ts))
            await ledger.prune()  # deletes keep the counts right too
            db = raw(path)
            probes = [base - 1, base, base + 5 * BUCKET_MS - 1, base + 5 * BUCKET_MS, base + 17 * BUCKET_MS + 123,
                      base + 39 * BUCKET_MS, base + 40 * BUCKET_MS, 2**62, *stamps[::37]]
            for t in probes:
                want = dict(db.execute("SELECT type, count(*) FROM events WHERE timestamp <= ? GROUP BY type", (t,)))
                assert await ledger.counts_by_type(t) == want, t

    run(main())


def test_recent_summarises_long_fields_without_reading_them(tmp_path):
    async def main():
        async with opened(tmp_path / "l.db") as ledger:
            small = event(payload={"a": 1}, metadata={"m": "x" * 100})
            # metadata is capped at 4 KiB on ingest now; rows stored before the cap can hold more
            long = dataclasses.replace(event(payload={"blob": "y" * 20_000}), metadata={"m": "z" * 9000})
            await ledger.append(small)
            await ledger.append(long)
            newest, oldest = await ledger.recent(2**62, 2, max_field_bytes=8192)
            assert newest.payload == {"truncated": True, "bytes": 20_011}
            assert newest.metadata == {"truncated": True, "bytes": 9_008}
            assert oldest.payload == {"a": 1} and oldest.metadata == {"m": "x" * 100}
            assert (await ledger.recent(2**62, 1))[0].payload == long.payload  # no cap: whole

    run(main())


def test_a_deleted_database_is_noticed_through_the_epoch_record(tmp_path, capfd):
    path = tmp_path / "l.db"

    async def epoch():
        async with opened(path) as ledger:
            return ledger.epoch

    first = run(epoch())
    assert Path(f"{path}.epoch").read_text().strip() == first
    assert run(epoch()) == first and "ledger_epoch_changed" not in capfd.readouterr().err
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        p.unlink(missing_ok=True)
    second = run(epoch())
    err = capfd.readouterr().err
    assert second != first and '"event":"ledger_epoch_changed"' in err and first in err
    assert Path(f"{path}.epoch").read_text().strip() == second
