"""The ledger and the snapshot under hostile input, against the real ``edgelink serve``.

Each test drives one attack over loopback and checks what API.md §1 and §5 promise:
peak RSS (VmHWM) under the 80 MB budget, the database file (main + WAL) within
``EDGELINK_LEDGER_MAX_BYTES``, refusals with their status codes, and a gateway that
still serves a well-behaved client afterwards.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest
import websockets

from conftest import (
    EDGELINK,
    TOKEN,
    Gateway,
    assert_error,
    clean_env,
    health_ok,
    log_records,
    metric_sum,
    post_event,
    start_gateway,
)

MIB = 1024 * 1024
BUDGET_MIB = 80
BOUND = 16 * MIB  # the smallest EDGELINK_LEDGER_MAX_BYTES allowed
# What the file may exceed the bound by: the -shm index is outside it, and the pages of
# one chunk may land before the next check sees them.
FILE_SLACK = MIB
BIG_PAYLOAD = {"blob": "x" * 1_040_000}  # a non-canonical event just under the 1 MiB body limit


def db_bytes(db: Path) -> int:
    return sum(os.path.getsize(p) for p in (db, Path(f"{db}-wal")) if p.exists())


def post_big(gw: Gateway, i: int, payload: dict = BIG_PAYLOAD):
    return gw.post("/events/ingest", {"source": "attacker", "type": f"blob.{i % 3}", "payload": payload})


def serves_and_stores(gw: Gateway) -> None:
    """``/health`` answers and a small event is still stored."""
    health_ok(gw)
    small = post_event(gw, "system.alert", {"alert_id": "a", "severity": "low", "message": "m", "timestamp": 1},
                       source="ok")
    assert small.status == 201, small.body


def test_byte_bound_drop_oldest_holds_the_file_and_the_memory(gateway_factory):
    gw = gateway_factory({"EDGELINK_LEDGER_MAX_BYTES": str(BOUND)})
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda i: post_big(gw, i), range(60)))  # ~60 MiB offered
    assert [r.status for r in replies] == [201] * 60, {r.status for r in replies}
    size = db_bytes(gw.db)
    assert size <= BOUND + FILE_SLACK, size
    assert gw.peak_rss_mib() < BUDGET_MIB, gw.peak_rss_mib()
    # the oldest went; what is left is counted consistently
    snap = gw.get("/operator/snapshot").json()
    kept = sum(snap["events"]["counts_by_type"].values())
    assert 5 <= kept < 16, kept
    dropped = metric_sum(gw, 'edgelink_ledger_pruned_events_total{reason="bytes"}')
    assert dropped == 60 - kept
    assert any(r["event"] == "ledger_dropped_oldest" for r in log_records(gw.log_path))
    serves_and_stores(gw)


def test_byte_bound_reject_answers_507_counted_and_logged_once(gateway_factory):
    gw = gateway_factory({"EDGELINK_LEDGER_MAX_BYTES": str(BOUND), "EDGELINK_LEDGER_FULL": "reject"})
    statuses = [post_big(gw, i) for i in range(30)]
    accepted = [r for r in statuses if r.status == 201]
    refused = [r for r in statuses if r.status != 201]
    assert 5 <= len(accepted) < 16 and len(refused) >= 10, [r.status for r in statuses]
    for reply in refused:
        assert_error(reply, 507, "ledger_full")
    assert db_bytes(gw.db) <= BOUND + FILE_SLACK
    assert metric_sum(gw, 'edgelink_budget_refusals_total{budget="ledger"}') == len(refused)
    assert [r["event"] for r in log_records(gw.log_path)].count("ledger_full") == 1
    # nothing refused was stored, and nothing stored was dropped
    snap = gw.get("/operator/snapshot").json()
    assert sum(snap["events"]["counts_by_type"].values()) == len(accepted)
    assert gw.peak_rss_mib() < BUDGET_MIB, gw.peak_rss_mib()
    assert gw.get("/health").status == 200


def test_a_websocket_event_meeting_a_full_ledger_gets_an_error_frame_and_stays(gateway_factory):
    gw = gateway_factory({"EDGELINK_LEDGER_MAX_BYTES": str(BOUND), "EDGELINK_LEDGER_FULL": "reject"})
    for size in (1_040_000, 65536, 4096, 256, 16, 0):  # fill it to the last bytes
        for i in range(200):
            if post_big(gw, i, {"blob": "x" * size}).status != 201:
                break
    event = {"type": "system.alert", "payload": {"alert_id": "w", "severity": "low", "message": "m",
                                                 "timestamp": 1}}

    async def client() -> list[dict]:
        async with websockets.connect(f"ws://127.0.0.1:{gw.port}/ws?token={TOKEN}") as ws:
            frames = [orjson.loads(await ws.recv())]  # connected
            await ws.send(orjson.dumps(event).decode())
            frames += [orjson.loads(await ws.recv()) for _ in range(2)]  # the echo, then the refusal
            await ws.send("{not json")  # still connected and served
            frames.append(orjson.loads(await ws.recv()))
            return frames

    connected, echo, refusal, after = asyncio.run(client())
    assert connected["type"] == "connected" and echo == event
    assert (refusal["channel"], refusal["type"], refusal["error"], refusal["event_type"]) == (
        "control", "error", "ledger_full", "system.alert")
    assert after == {"channel": "control", "type": "error", "error": "invalid_json"}
    refused = metric_sum(gw, 'edgelink_budget_refusals_total{budget="ledger"}')
    assert gw.post("/events/ingest", {**event, "source": "t"}).status == 507  # the same event over HTTP
    assert metric_sum(gw, 'edgelink_budget_refusals_total{budget="ledger"}') == refused + 1
    assert not any(r["event"] == "websocket_failed" for r in log_records(gw.log_path))


def test_concurrent_snapshots_of_big_events_stay_small(gateway_factory):
    gw = gateway_factory()
    for i in range(20):
        assert post_big(gw, i).status == 201
    before = gw.peak_rss_mib()

    def snapshot(_: int) -> tuple[int, int, list]:
        reply = gw.get("/operator/snapshot")
        return reply.status, len(reply.body), reply.json()["events"]["recent"]

    with ThreadPoolExecutor(6) as pool:  # several clients, several calls each
        answers = list(pool.map(snapshot, range(30)))
    for status, size, recent in answers:
        assert status == 200 and size <= 256 * 1024, (status, size)
        assert len(recent) == 20
        for event in recent:
            assert event["payload"] == {"truncated": True, "bytes": len(b'{"blob":"') + 1_040_000 + 2}
    peak = gw.peak_rss_mib()
    assert peak < BUDGET_MIB, (before, peak)
    serves_and_stores(gw)


def test_snapshot_stays_under_256_kib_with_many_types_and_fields_just_under_8_kib(gateway_factory):
    gw = gateway_factory()
    for i in range(300):  # many long type names: counts_by_type alone would be ~80 KiB
        assert gw.post("/events/ingest", {"source": "s", "type": f"{i:03}" + "t" * 250, "payload": {}}).status == 201
    payload = {"blob": "y" * 8000}
    metadata = {"m": "z" * 4000}
    for i in range(20):
        assert gw.post("/events/ingest", {"source": "s", "type": "big", "payload": payload,
                                          "metadata": metadata}).status == 201
    reply = gw.get("/operator/snapshot")
    assert reply.status == 200 and len(reply.body) <= 256 * 1024, len(reply.body)
    events = reply.json()["events"]
    assert len(events["counts_by_type"]) == 256 and events["counts_by_type"]["big"] == 20
    assert events["other_types"] == 300 + 20 - sum(events["counts_by_type"].values())
    recent = events["recent"]
    assert len(recent) == 20
    assert any(e["payload"] == payload for e in recent)  # only as many summarised as needed
    assert any(e["payload"] == {"truncated": True, "bytes": len(b'{"blob":""}') + 8000} for e in recent)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 24 MiB tmpfs: a disk that really fills up (needs root to mount)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_answers_503_stores_nothing_unacknowledged_and_recovers(tmp_path, small_disk):
    db = small_disk / "edgelink.db"
    gw = start_gateway(tmp_path, {"EDGELINK_DB": str(db)})
    try:
        filler = small_disk / "filler"
        filler.write_bytes(b"\0" * (20 * MIB))  # leave about 4 MiB
        acked, refused = 0, 0
        for i in range(20):
            reply = post_big(gw, i)
            assert reply.status in (201, 503), (reply.status, reply.body)
            if reply.status == 201:
                acked += 1
            else:
                assert_error(reply, 503, "ledger_unavailable")
                assert reply.headers.get("retry-after") == "1"
                refused += 1
        assert refused >= 10, (acked, refused)
        assert gw.get("/health").status == 200
        # snapshot reads still work, and show exactly what was acknowledged
        counts = gw.get("/operator/snapshot").json()["events"]["counts_by_type"]
        assert sum(counts.values()) == acked
        assert [r["event"] for r in log_records(gw.log_path)].count("ledger_unavailable") == 1
        filler.unlink()  # space returns: ingest recovers by itself
        reply = post_big(gw, 99)
        assert reply.status == 201, reply.body
        serves_and_stores(gw)
        counts = gw.get("/operator/snapshot").json()["events"]["counts_by_type"]
        assert sum(counts.values()) == acked + 2
        assert any(r["event"] == "ledger_recovered" for r in log_records(gw.log_path))
    finally:
        gw.proc.kill()
        gw.proc.wait()
    rows = sqlite3.connect(db).execute("SELECT count(*) FROM events").fetchone()[0]
    assert rows == acked + 2


@pytest.fixture
def ext4_disk(tmp_path: Path):
    """A loop-mounted ext4 file system, where ``chattr +i`` makes a file refuse writes
    even through descriptors already open (needs root, mkfs.ext4 and chattr)."""
    if os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("mkfs.ext4", "chattr")):
        pytest.skip("needs root, mkfs.ext4 and chattr")
    image, mount = tmp_path / "ext4.img", tmp_path / "ext4"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(64 * MIB)
    if subprocess.run(["mkfs.ext4", "-q", str(image)]).returncode or \
            subprocess.run(["mount", "-o", "loop", str(image), str(mount)]).returncode:
        pytest.skip("cannot make or mount an ext4 image here")
    try:
        yield mount
    finally:
        subprocess.run(["chattr", "-R", "-i", str(mount)], check=False, capture_output=True)
        subprocess.run(["umount", str(mount)], check=False)


def test_a_read_only_ledger_answers_503_and_recovers_when_writable_again(tmp_path, ext4_disk):
    db = ext4_disk / "edgelink.db"
    gw = start_gateway(tmp_path, {"EDGELINK_DB": str(db)})
    try:
        serves_and_stores(gw)
        # the database and its WAL refuse writes (not the -shm index, which is mapped)
        files = [str(db), f"{db}-wal"]
        subprocess.run(["chattr", "+i", *files], check=True)
        for i in range(5):
            assert_error(post_big(gw, i, {"n": i}), 503, "ledger_unavailable")
        assert gw.get("/health").status == 200
        subprocess.run(["chattr", "-i", *files], check=True)
        serves_and_stores(gw)
        counts = gw.get("/operator/snapshot").json()["events"]["counts_by_type"]
        assert counts == {"system.alert": 2}  # the refused events were not stored
        assert metric_sum(gw, "edgelink_ledger_write_failures_total") >= 1
    finally:
        gw.proc.kill()
        gw.proc.wait()


def run_edgelink(tmp_path: Path, db: Path, *args: str) -> subprocess.CompletedProcess:
    env = clean_env(VX11_GATEWAY_TOKEN=TOKEN, EDGELINK_DB=str(db), EDGELINK_HOST="127.0.0.1")
    return subprocess.run([EDGELINK, *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=30)


def assert_one_line_refusal(done: subprocess.CompletedProcess, db: Path) -> None:
    assert done.returncode == 1, (done.returncode, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "EDGELINK_DB" in lines[0] and str(db) in lines[0], lines[0]
    assert "Traceback" not in done.stderr + done.stdout


def test_a_file_that_is_not_sqlite_stops_the_start_in_one_line(tmp_path):
    db = tmp_path / "garbage.db"
    db.write_bytes(b"this is not a database\n" * 200)
    assert_one_line_refusal(run_edgelink(tmp_path, db, "serve", "--port", "0"), db)
    assert_one_line_refusal(run_edgelink(tmp_path, db, "probe"), db)
    assert db.read_bytes() == b"this is not a database\n" * 200  # left as it was, for the operator


def test_a_truncated_database_stops_the_start_in_one_line(tmp_path):
    db = tmp_path / "cut.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE filler (x BLOB)")
    conn.executemany("INSERT INTO filler VALUES (?)", [(os.urandom(4000),) for _ in range(200)])
    conn.commit()
    conn.close()
    os.truncate(db, os.path.getsize(db) // 2)
    assert_one_line_refusal(run_edgelink(tmp_path, db, "serve", "--port", "0"), db)


def test_a_deleted_database_is_noticed_at_the_next_start(tmp_path):
    db = tmp_path / "kept.db"
    first = start_gateway(tmp_path, {"EDGELINK_DB": str(db)}, name="first")
    assert first.post("/events/ingest", {"source": "s", "type": "t", "payload": {}}).status == 201
    epoch = [r for r in log_records(first.log_path) if r["event"] == "started"][0]["epoch"]
    assert first.stop() == 0
    assert Path(f"{db}.epoch").read_text().strip() == epoch
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        path.unlink(missing_ok=True)
    second = start_gateway(tmp_path, {"EDGELINK_DB": str(db)}, name="second")
    try:
        records = log_records(second.log_path)
        warning = [r for r in records if r["event"] == "ledger_epoch_changed"]
        assert len(warning) == 1 and warning[0]["level"] == "warning", records
        assert warning[0]["previous_epoch"] == epoch
        started = [r for r in records if r["event"] == "started"][0]
        assert started["epoch"] != epoch and warning[0]["epoch"] == started["epoch"]
    finally:
        second.stop()
    # a third start on the same file is quiet again
    third = start_gateway(tmp_path, {"EDGELINK_DB": str(db)}, name="third")
    try:
        assert not [r for r in log_records(third.log_path) if r["event"] == "ledger_epoch_changed"]
    finally:
        third.stop()


def add_made_up_types(db: Path, count: int) -> None:
    """``count`` events of as many distinct types, an hour old, written into a stopped
    gateway's ledger through its own triggers (ingesting them over HTTP takes minutes)."""
    now = int(time.time() * 1000)
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO events (event_id, type, source, timestamp, payload, metadata, canonical, broadcast)"
            " VALUES (?, ?, 's', ?, '{}', NULL, 0, 0)",
            ((f"id{i}", f"made.up.type.{i:06}.{'x' * 40}", now - 3_600_000 + i) for i in range(count)))
    conn.close()


def test_snapshot_of_200000_made_up_types_costs_o_types_and_lists_the_256_most_frequent(gateway_factory):
    # 200,000 distinct types, as clients may choose them
    gw = gateway_factory()
    gw.stop()
    add_made_up_types(gw.db, 200_000)
    gw = gateway_factory({"EDGELINK_DB": str(gw.db)})
    for i in range(300):  # a few frequent ones, over HTTP
        assert gw.post("/events/ingest", {"source": "s", "type": f"frequent.{i % 3}", "payload": {}}).status == 201

    def snapshot(_: int) -> dict:
        reply = gw.get("/operator/snapshot", timeout=120)
        assert reply.status == 200 and len(reply.body) <= 256 * 1024, (reply.status, len(reply.body))
        return reply.json()["events"]

    with ThreadPoolExecutor(3) as pool:  # three at once
        answers = list(pool.map(snapshot, range(3)))
    peak = gw.peak_rss_mib()
    print(f"\n3 snapshots of 200,000 types: peak RSS {peak:.1f} MiB")
    assert peak < BUDGET_MIB, peak
    for events in answers:
        counts = events["counts_by_type"]
        assert len(counts) == 256
        assert counts["frequent.0"] == counts["frequent.1"] == counts["frequent.2"] == 100
        assert events["other_types"] == 200_300 - sum(counts.values()) == 200_000 - 253
    serves_and_stores(gw)


def test_snapshot_of_long_multibyte_type_names_stays_under_256_kib(gateway_factory):
    gw = gateway_factory()
    for i in range(300):  # 256 characters of 4 UTF-8 bytes each: 1 KiB a name
        name = f"{i:03}" + "\N{GRINNING FACE}" * 253
        assert gw.post("/events/ingest", {"source": "s", "type": name, "payload": {}}).status == 201
    reply = gw.get("/operator/snapshot")
    assert reply.status == 200 and len(reply.body) <= 256 * 1024, len(reply.body)
    events = reply.json()["events"]
    assert 200 < len(events["counts_by_type"]) < 256  # the rarest left out to fit, and counted
    assert events["other_types"] == 300 - len(events["counts_by_type"])
