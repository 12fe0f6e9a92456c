"""docs/forwarding.md's central consumer, run as it is written against a real JetStream
(API.md §9): it keeps every event of two boxes exactly once, also across idle stretches
of the stream (nats-py's fetch then raises a TimeoutError, of nats' kind or the built-in
one) and a restart of the consumer itself."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from brokers import Nats
from conftest import stays, wait_until
from test_forward_brokers import forward_env, ingest_many, wait_status

pytestmark = pytest.mark.brokers

DOC = Path(__file__).resolve().parent.parent / "docs" / "forwarding.md"


def consumer_code() -> str:
    text = DOC.read_text()
    section = text[text.index("## A central consumer"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def stored(db: Path) -> set[tuple]:
    if not db.exists():
        return set()
    with sqlite3.connect(db) as conn:
        return set(conn.execute("SELECT edge_id, epoch, seq FROM events"))


def wait_stored(db: Path, count: int, consumer: subprocess.Popen, timeout: float = 60) -> set[tuple]:
    """The keys stored in the consumer's database, once there are ``count``."""
    def enough() -> set[tuple] | None:
        assert consumer.poll() is None, consumer.stderr.read()
        try:
            keys = stored(db)
        except sqlite3.OperationalError:  # the consumer holds the write lock right now
            return None
        return keys if len(keys) >= count else None
    try:
        return wait_until(enough, timeout, "events stored", every=0.2)
    except AssertionError as e:
        if "not in" not in str(e):
            raise
        raise AssertionError(f"{len(stored(db))} of {count} events stored") from None


def test_the_documented_consumer_keeps_every_event_once_across_idle_stretches(gateway_factory,
                                                                              tmp_path: Path) -> None:
    broker = Nats(tmp_path).start()
    broker.add_stream()
    script = tmp_path / "consumer.py"
    script.write_text(consumer_code())
    db = tmp_path / "central.db"
    env = {**os.environ, "NATS_URL": broker.url, "CENTRAL_DB": str(db)}

    def consume() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script)], env=env, stderr=subprocess.PIPE, text=True)

    consumer = consume()
    try:
        boxes = [gateway_factory(forward_env(broker.url, EDGELINK_EDGE_ID=f"box{i}")) for i in (1, 2)]
        for gw in boxes:
            ingest_many(gw, 300, threads=2)
        wait_stored(db, 600, consumer)
        # idle: at least three of the consumer's fetches time out, and it lives through them
        stays(lambda: consumer.poll() is None, 7, "the consumer died on an idle stream")
        for gw in boxes:
            ingest_many(gw, 200, threads=2)
        wait_stored(db, 1000, consumer)
        consumer.send_signal(signal.SIGKILL)  # the consumer restarts: unacked messages come again
        consumer.wait(10)
        for gw in boxes:
            ingest_many(gw, 100, threads=1)
            wait_status(gw, lambda st: st["acked_seq"] == 600)
        consumer = consume()
        keys = wait_stored(db, 1200, consumer)
        # idle again: fetches time out while nothing comes
        stays(lambda: consumer.poll() is None, 5, "the consumer died on an idle stream")
        for gw, box in zip(boxes, ("box1", "box2")):
            epoch = gw.get("/vx11/forward/status").json()["epoch"]
            assert {k for k in keys if k[0] == box} == {(box, epoch, seq) for seq in range(1, 601)}
        assert len(stored(db)) == 1200
    finally:
        consumer.kill()
        consumer.wait(10)
        broker.kill()
