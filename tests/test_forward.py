"""The forwarder loop (edgelink/forward/forwarder.py) against a fake engine on a real
ledger file: window, order, cursor and retention rules, without sockets. Plus the
settings checks and the lazy import of the engines' libraries."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import holds, until
from edgelink import forward
from edgelink.config import ConfigError, Settings
from edgelink.forward.engine import Acks, EngineError, Message, safe_type
from edgelink.forward.forwarder import BACKOFF_MAX, BACKOFF_MIN, Forwarder, backoff, type_filter
from edgelink.gateway.events import build_event
from edgelink.gateway.metrics import Registry
from edgelink.ledger import WAL_LIMIT, WRITE_CHUNK_BYTES, Ledger


class FakeEngine:
    """Records what is sent; acks when told (or at once with ``auto``), through the
    engines' own ack counting (``Acks``)."""

    def __init__(self, world: "World"):
        self.world = world
        self.acks: Acks | None = None
        self.sent: list[int] = []  # seqs, by index in acks
        self.closed = False

    async def connect(self, edge_id: str, timeout: float) -> None:
        self.world.connects += 1
        if self.world.refuse:
            raise EngineError("unreachable", "refused by the test")
        self.acks = Acks(asyncio.get_running_loop())

    async def send(self, messages: list[Message]) -> None:
        if self.closed:
            raise EngineError("disconnected", "closed")
        for msg in messages:
            index = self.acks.add()
            self.world.sent.append(msg)
            self.sent.append(msg.seq)
            if self.world.auto and msg.seq not in self.world.lose:
                self.acks.ack(index)
        self.world.max_unacked = max(self.world.max_unacked, self.acks.sent - self.acks.acked)

    @property
    def pending(self) -> list[int]:
        """Seqs sent and not acked yet (in an unbroken prefix)."""
        return self.sent[self.acks.acked:]

    def ack(self, seq: int) -> None:
        self.acks.ack(self.sent.index(seq))

    def refuse(self, seq: int) -> None:
        self.acks.refuse(self.sent.index(seq), EngineError("rejected", "refused by the test"))

    def fail_all(self) -> None:
        self.acks.fail(EngineError("disconnected", "cut by the test"))

    async def close(self) -> None:
        self.closed = True
        if self.acks is not None:
            self.fail_all()


class World:
    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.engines: list[FakeEngine] = []
        self.connects = 0
        self.refuse = False
        self.auto = True
        self.lose: set[int] = set()
        self.max_unacked = 0

    def make(self) -> FakeEngine:
        engine = FakeEngine(self)
        self.engines.append(engine)
        return engine

    @property
    def engine(self) -> FakeEngine:
        return self.engines[-1]


async def fill(ledger: Ledger, n: int, type_: str = "custom.event") -> None:
    now_ms = int(time.time() * 1000)  # recent: only the count bound may prune them
    await asyncio.gather(*(ledger.append(build_event(type_, "t", {"i": i}, None, False, now_ms))
                           for i in range(n)))


def forwarder(ledger: Ledger, world: World, window: int = 8, **kw: Any) -> Forwarder:
    kw.setdefault("ack_timeout", 5.0)
    return Forwarder(ledger, world.make, Registry(), engine="fake", url="fake://", edge_id="box", window=window,
                     rng=lambda: 0.0, **kw)


def run_with_ledger(tmp_path: Path, body) -> Any:
    async def main() -> Any:
        ledger = Ledger(str(tmp_path / "l.db"), sync="normal")
        await ledger.start()
        try:
            return await body(ledger)
        finally:
            await ledger.close()
    return asyncio.run(main())


def test_forwards_everything_in_order_and_stores_the_cursor(tmp_path: Path) -> None:
    world = World()

    async def body(ledger: Ledger) -> None:
        await fill(ledger, 1000)
        fw = forwarder(ledger, world, window=16)
        await fw.start()
        await until(lambda: fw.acked_seq == 1000)
        await fw.stop()
        assert await ledger.forward_cursor() == 1000
        # counted per burst, still one per event; every ack's latency is in the histogram
        assert fw.forwarded.values[()] == fw.acked.values[()] == 1000
        counts, total = fw.ack_latency.values[()]
        assert sum(counts) == 1000 and total[0] >= 0

    run_with_ledger(tmp_path, body)
    assert [m.seq for m in world.sent] == list(range(1, 1001))
    first = orjson.loads(world.sent[0].body)
    assert first["edge_id"] == "box" and first["seq"] == 1 and first["payload"] == {"i": first["payload"]["i"]}
    assert set(first) == {"edge_id", "epoch", "seq", "event_id", "type", "source", "timestamp", "payload",
                          "metadata", "canonical"}
    assert world.sent[0].msg_id == f"box:{first['epoch']}:1"


def test_window_bounds_unacked_events_and_acks_move_the_cursor_in_order(tmp_path: Path) -> None:
    world = World()
    world.auto = False

    async def body(ledger: Ledger) -> None:
        await fill(ledger, 50)
        fw = forwarder(ledger, world, window=8)
        await fw.start()
        await until(lambda: len(world.sent) == 8)
        await holds(lambda: len(world.sent) == 8, 0.05, "the window is full: nothing more goes out")
        world.engine.ack(2)
        world.engine.ack(3)
        await holds(lambda: fw.acked_seq == 0 and len(world.sent) == 8, 0.05,
                    "seq 1 not acked: the cursor stays")
        world.engine.ack(1)
        await until(lambda: fw.acked_seq == 3)
        assert await ledger.forward_cursor() == 3
        await until(lambda: len(world.sent) == 11)  # three slots freed once the cursor is stored
        await fw.stop()

    run_with_ledger(tmp_path, body)
    assert world.max_unacked <= 8


def test_acked_events_free_their_window_while_the_ledger_writer_is_busy(tmp_path: Path) -> None:
    """The cursor after an ack is written on the loop when the database's write lock is
    free, not only through the writer thread's queue: with that thread held in a commit
    of its own, forwarding goes on past a window and the cursor is stored; once the lock
    is taken (here: another connection holds it), cursor writes queue for the writer."""
    world = World()

    async def body(ledger: Ledger) -> None:
        await fill(ledger, 100)
        release = threading.Event()
        commit = ledger._commit_writes

        def held(conn: sqlite3.Connection, jobs: list) -> None:  # the writer thread, busy
            release.wait(30)
            commit(conn, jobs)

        ledger._commit_writes = held  # type: ignore[method-assign]
        busy = asyncio.ensure_future(ledger.append(build_event("other.event", "t", {}, None, False, 0)))
        fw = forwarder(ledger, world, window=8)
        try:
            await fw.start()
            await until(lambda: fw.acked_seq == 100)  # 12 windows past the held writer
            assert await ledger.forward_cursor() == 100
        finally:
            release.set()
        fw.wake(await busy)
        await until(lambda: fw.acked_seq == 101)
        await fill(ledger, 50)
        locker = sqlite3.connect(ledger.path, isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")  # the write lock taken: cursor writes queue for the writer
        try:
            fw.wake(151)
            await until(lambda: len(world.sent) == 109)
            # acked, not stored: the window is full
            await holds(lambda: len(world.sent) == 109 and fw.acked_seq == 101, 0.1, "the window stays full")
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        await until(lambda: fw.acked_seq == 151)
        await fw.stop()

    run_with_ledger(tmp_path, body)
    assert [m.seq for m in world.sent] == list(range(1, 152))


def test_cursor_writes_on_the_loop_leave_the_wal_near_its_limit(tmp_path: Path) -> None:
    """The loop's cursor writes run no checkpoint: now and then one goes through the
    writer thread, whose commit does, so the WAL stays near WAL_LIMIT (a write per ack)."""
    world = World()

    async def body(ledger: Ledger) -> None:
        await fill(ledger, 1500)
        fw = forwarder(ledger, world, window=1)
        await fw.start()
        await until(lambda: fw.acked_seq == 1500, timeout=60)
        await fw.stop()
        assert os.path.getsize(ledger.path + "-wal") <= WAL_LIMIT + WRITE_CHUNK_BYTES

    run_with_ledger(tmp_path, body)


def test_window_bytes_bound_large_events_in_flight_but_one_always_goes(tmp_path: Path) -> None:
    world = World()
    world.auto = False
    big = "x" * 40_000

    async def body(ledger: Ledger) -> None:
        now_ms = int(time.time() * 1000)
        for i in range(20):
            await ledger.append(build_event("custom.big", "t", {"i": i, "pad": big}, None, False, now_ms))
        # a window of 16 events, but only 100 kB of them in flight: two 40 kB events
        fw = forwarder(ledger, world, window=16, window_bytes=100_000)
        await fw.start()
        await until(lambda: len(world.sent) == 2)
        # a wrong bound would have sent more by now (the window allows 16)
        await holds(lambda: len(world.sent) == 2, 0.05, "100 kB in flight: two 40 kB events")
        world.engine.ack(1)
        await until(lambda: len(world.sent) == 3)
        for seq in range(2, 21):
            await until(lambda: seq in world.engine.sent)
            world.engine.ack(seq)
        await until(lambda: fw.acked_seq == 20)
        await fw.stop()

        # one event larger than the bound still goes out, alone
        world2 = World()
        world2.auto = True
        await ledger.append(build_event("custom.big", "t", {"pad": big * 4}, None, False, now_ms))
        fw2 = forwarder(ledger, world2, window=16, window_bytes=100_000)
        await fw2.start()
        await until(lambda: fw2.acked_seq == 21)
        await fw2.stop()

    run_with_ledger(tmp_path, body)
    assert world.max_unacked <= 2


def test_a_nearly_full_window_waits_for_a_burst_of_acks(tmp_path: Path) -> None:
    world = World()
    world.auto = False

    async def body(ledger: Ledger) -> None:
        await fill(ledger, 50)
        fw = forwarder(ledger, world, window=8)  # bursts of 2
        await fw.start()
        await until(lambda: len(world.sent) == 8)
        world.engine.ack(2)  # out of order: the pump waits on seq 1 then
        await holds(lambda: fw.acked_seq == 0 and len(world.sent) == 8, 0.05, "seq 1 not acked")
        world.engine.ack(1)
        await until(lambda: fw.acked_seq == 2)
        await until(lambda: len(world.sent) == 10)  # two slots: one burst
        world.engine.ack(3)
        await holds(lambda: len(world.sent) == 10, 0.05, "one free slot is less than a burst: no wake-up yet")
        world.engine.ack(4)
        await until(lambda: fw.acked_seq == 4 and len(world.sent) == 12)
        await fw.stop()

    run_with_ledger(tmp_path, body)
    assert [m.seq for m in world.sent] == list(range(1, 13))
    assert world.max_unacked <= 8


def test_acks_count_an_unbroken_prefix_and_raise_errors_in_order() -> None:
    async def body() -> None:
        acks = Acks(asyncio.get_running_loop())
        for _ in range(6):
            acks.add()
        waiter = acks.wait(3)
        acks.ack(1)
        acks.ack(2)
        assert acks.acked == 0 and not waiter.done()  # message 0 not acked yet
        acks.ack(0)
        assert acks.acked == 3 and waiter.done()
        acks.refuse(4, EngineError("rejected", "by the test"))
        assert acks.error is None  # message 3 is not acked: the refusal is not due yet
        waiter = acks.wait(6)
        acks.ack(5)  # past the refused one: never counted
        acks.ack(3)
        assert acks.acked == 4 and waiter.done() and acks.error.kind == "rejected"

        acks = Acks(asyncio.get_running_loop())
        acks.add(), acks.add()
        acks.ack(0)
        waiter = acks.wait(2)
        acks.fail(EngineError("disconnected", "by the test"))  # a lost connection is due at once
        assert waiter.done() and acks.acked == 1 and acks.error.kind == "disconnected"
        assert acks.wait(2).done()

    asyncio.run(body())


def test_a_refused_message_stops_the_cursor_before_it_and_reconnects(tmp_path: Path) -> None:
    world = World()
    world.auto = False

    async def body(ledger: Ledger) -> None:
        await fill(ledger, 20)
        fw = forwarder(ledger, world, window=8)
        await fw.start()
        await until(lambda: len(world.sent) == 8)
        world.engine.refuse(4)
        for seq in (1, 2, 5):
            world.engine.ack(seq)
        await until(lambda: fw.acked_seq == 2)
        await holds(lambda: len(world.engines) == 1 and fw.acked_seq == 2, 0.05, "seq 3 not acked: not due yet")
        world.engine.ack(3)
        await until(lambda: len(world.engines) == 2 and world.engine.sent)
        # the cursor stops right before the refused seq 4, acks collected then are kept
        assert fw.acked_seq == 3 and "rejected" in fw.last_error
        assert world.engine.sent[0] == 4  # sent again after the cursor
        world.auto = True
        for seq in list(world.engine.pending):
            world.engine.ack(seq)
        await until(lambda: fw.acked_seq == 20)
        await fw.stop()

    run_with_ledger(tmp_path, body)


@pytest.mark.parametrize("same_turn", [False, True], ids=["acks_then_loss", "acks_with_the_loss"])
def test_a_lost_connection_resends_after_the_cursor_at_most_a_window(tmp_path: Path, same_turn: bool) -> None:
    world = World()
    world.auto = False

    async def body(ledger: Ledger) -> None:
        await fill(ledger, 40)
        fw = forwarder(ledger, world, window=8)
        await fw.start()
        await until(lambda: len(world.sent) == 8)
        for seq in range(1, 6):
            world.engine.ack(seq)
        if not same_turn:
            await until(lambda: fw.acked_seq == 5)
        # the connection drops with 6..13 unacknowledged, or (with_the_loss) in the turn of
        # the acks, with 6..8 sent and the acks stored only on the way out
        world.engine.fail_all()
        await until(lambda: len(world.engines) == 2 and len(world.engine.sent) == 8)
        assert fw.acked_seq == 5
        world.auto = True
        for seq in list(world.engine.pending):
            world.engine.ack(seq)
        await until(lambda: fw.acked_seq == 40)
        await fw.stop()
        assert fw.status()["state"] in ("connected", "backoff", "connecting")

    run_with_ledger(tmp_path, body)
    seqs = [m.seq for m in world.sent]
    assert sorted(set(seqs)) == list(range(1, 41))
    assert len(seqs) - 40 <= 8
    assert len(seqs) - 40 == (3 if same_turn else 8)  # 6..8 or 6..13 again
    assert world.engines[1].sent[0] == 6  # the second connection starts right after the cursor


def test_resends_after_a_restart_are_counted(tmp_path: Path) -> None:
    world = World()
    world.auto = False

    async def body(ledger: Ledger) -> None:
        await fill(ledger, 20)
        fw = forwarder(ledger, world, window=8)
        await fw.start()
        await until(lambda: len(world.sent) == 8)
        for seq in range(1, 6):
            world.engine.ack(seq)
        await until(lambda: fw.acked_seq == 5 and len(world.sent) == 13)
        await fw.stop()  # as a crash would leave it: 6..13 sent, not acked
        world.auto = True
        again = forwarder(ledger, world, window=8)
        await again.start()
        await until(lambda: again.acked_seq == 20)
        # 6..8 were sent when the cursor was written last: counted; 9..13 went out after
        # it, which the ledger never heard of (at most a window per crash goes uncounted)
        assert again.resent.values[()] == 3
        await again.stop()

    run_with_ledger(tmp_path, body)
    assert [m.seq for m in world.sent] == list(range(1, 14)) + list(range(6, 21))


def test_a_missing_ack_times_out_and_reconnects(tmp_path: Path) -> None:
    world = World()
    world.lose = {3}

    async def body(ledger: Ledger) -> None:
        await fill(ledger, 10)
        fw = forwarder(ledger, world, window=4, ack_timeout=0.2)
        await fw.start()
        await until(lambda: len(world.engines) >= 2)
        assert fw.acked_seq == 2  # nothing past the lost ack
        assert "timeout" in fw.last_error
        world.lose = set()
        await until(lambda: fw.acked_seq == 10)
        await fw.stop()

    run_with_ledger(tmp_path, body)


def test_refused_connections_back_off_instead_of_spinning(tmp_path: Path) -> None:
    world = World()
    world.refuse = True

    async def body(ledger: Ledger) -> None:
        await fill(ledger, 3)
        fw = forwarder(ledger, world)
        await fw.start()
        await asyncio.sleep(0.5)  # real time: how often it reconnects in half a second is the point
        connects = world.connects
        assert fw.status()["state"] in ("backoff", "connecting")
        assert "unreachable" in fw.status()["last_error"]
        world.refuse = False
        await until(lambda: fw.acked_seq == 3, timeout=15)
        await fw.stop()
        return connects

    connects = run_with_ledger(tmp_path, body)
    # 0.05, 0.1, 0.2, 0.4 s (rng 0 halves each): a handful in 0.5 s, not a hot loop
    assert 2 <= connects <= 6


def test_new_events_wake_the_forwarder(tmp_path: Path) -> None:
    world = World()

    async def body(ledger: Ledger) -> None:
        fw = forwarder(ledger, world, idle_poll=3600)
        await fw.start()
        # parked: its first (empty) read is over, so only the wake can bring the event
        await until(lambda: fw._wakeup is not None, why="the forwarder waiting for a wake-up")
        seq = await ledger.append(build_event("custom.event", "t", {}, None, False, 1))
        fw.wake(seq)
        await until(lambda: fw.acked_seq == seq, timeout=5)  # long before the idle poll
        await fw.stop()

    run_with_ledger(tmp_path, body)


def test_types_filter_skips_others_but_moves_the_cursor(tmp_path: Path) -> None:
    world = World()

    async def body(ledger: Ledger) -> None:
        for i in range(30):
            await ledger.append(build_event("keep.me" if i % 3 == 0 else "other", "t", {}, None, False, 1))
        fw = forwarder(ledger, world, types=("keep.*",))
        await fw.start()
        await until(lambda: fw.acked_seq == 30 or (fw.acked_seq == 28 and len(world.sent) == 10))
        await holds(lambda: len(world.sent) == 10, 0.05, "no other type goes out")
        await fw.stop()

    run_with_ledger(tmp_path, body)
    assert [m.seq for m in world.sent] == list(range(1, 31, 3))
    assert all(m.type == "keep.me" for m in world.sent)


def test_retention_never_prunes_unforwarded_events(tmp_path: Path) -> None:
    async def body(ledger: Ledger) -> None:
        ledger.retention_events = 5
        await fill(ledger, 20)
        await ledger.store_forward_cursor(8)
        ledger.forwarding = True
        await ledger.prune()
        rows = await ledger.forward_page(0, 100, 1 << 20)
        assert [r[0] for r in rows] == list(range(9, 21))  # 1..8 forwarded: pruned; the rest kept
        ledger.forwarding = False
        await ledger.prune()
        rows = await ledger.forward_page(0, 100, 1 << 20)
        assert [r[0] for r in rows] == list(range(16, 21))

    run_with_ledger(tmp_path, body)


def test_the_retention_pass_at_start_keeps_unforwarded_events(tmp_path: Path) -> None:
    # the pass at start runs before any forwarder: the stored cursor alone protects
    async def body(ledger: Ledger) -> None:
        await fill(ledger, 20)
        await ledger.store_forward_cursor(4)

    run_with_ledger(tmp_path, body)

    async def again() -> list[int]:
        ledger = Ledger(str(tmp_path / "l.db"), sync="normal", retention_events=5, forwarding=True)
        await ledger.start()
        try:
            await ledger.prune()  # waits for the pass at start, then runs one more
            return [r[0] for r in await ledger.forward_page(0, 100, 1 << 20)]
        finally:
            await ledger.close()

    assert asyncio.run(again()) == list(range(5, 21))


def test_byte_bound_drop_moves_the_cursor_and_counts(tmp_path: Path) -> None:
    world = World()
    world.auto = False

    async def body(ledger: Ledger) -> None:
        await fill(ledger, 10)
        fw = forwarder(ledger, world, window=4)
        await fw.start()
        await until(lambda: len(world.sent) == 4)
        assert ledger.on_forced_drop is not None
        ledger.on_forced_drop(6, 6, 6)  # what the byte bound reports after deleting 1..6
        await until(lambda: fw.acked_seq == 6)
        assert await ledger.forward_cursor() == 6
        assert fw.status()["dropped"] == 6 and fw.status()["backlog"] == 4
        world.auto = True
        for seq in range(1, 5):
            world.engine.ack(seq)
        await until(lambda: fw.acked_seq == 10)
        assert await ledger.store_forward_cursor(3) == 10  # the cursor never moves back
        await fw.stop()
        assert ledger.on_forced_drop is None

    run_with_ledger(tmp_path, body)


def test_the_dropped_count_survives_a_restart(tmp_path: Path) -> None:
    # the byte bound keeps its count of unforwarded drops with the deletions (ledger_meta, by
    # epoch): a forwarder started later reports it, not 0
    import sqlite3

    async def body(ledger: Ledger) -> None:
        await fill(ledger, 3)
        with sqlite3.connect(ledger.path) as conn:
            conn.execute("INSERT INTO ledger_meta (key, value) VALUES (?, 7)", ("forward_dropped:" + ledger.epoch,))
        fw = forwarder(ledger, World(), window=4)
        await fw.start()
        assert fw.status()["dropped"] == 7
        await fw.stop()

    run_with_ledger(tmp_path, body)


def test_page_is_bounded_by_bytes(tmp_path: Path) -> None:
    async def body(ledger: Ledger) -> None:
        for _ in range(10):
            await ledger.append(build_event("big", "t", {"x": "y" * 1000}, None, False, 1))
        assert len(await ledger.forward_page(0, 100, 3500)) == 3
        assert len(await ledger.forward_page(0, 100, 10)) == 1  # one large event still moves

    run_with_ledger(tmp_path, body)


def test_backoff_doubles_with_jitter_within_bounds() -> None:
    assert backoff(1, lambda: 1.0) == BACKOFF_MIN
    assert backoff(2, lambda: 1.0) == 2 * BACKOFF_MIN
    assert backoff(100, lambda: 1.0) == BACKOFF_MAX
    assert backoff(100, lambda: 0.0) == BACKOFF_MAX / 2


def test_type_filter_and_subject_tokens() -> None:
    assert type_filter(()) is None
    wanted = type_filter(("system.*", "custom"))
    assert wanted("system.alert") and wanted("custom") and not wanted("customer") and not wanted("systemx")
    assert safe_type("a.b c/d*e>f") == "a.b_c_d_e_f"
    # never an empty token: NATS refuses such a subject (the stream then looks missing)
    assert [safe_type(t) for t in ("a..b", ".", "a.", ".a.", "*", ">", "#", "+")] == [
        "a._.b", "_._", "a._", "_.a._", "_", "_", "_", "_"]
    long_a, long_b = safe_type("x" * 250 + "a"), safe_type("x" * 250 + "b")
    assert len(long_a) == len(long_b) == 128 and long_a != long_b  # cut, and still apart


def settings(**kw: Any) -> Settings:
    return Settings(**kw)


@pytest.mark.parametrize("edge_id", ["", "x" * 65, "a b", "é"])
def test_bad_edge_id_names_the_setting(edge_id: str) -> None:
    if not edge_id:
        assert forward.EDGE_ID.fullmatch(forward.edge_id(settings()))  # the host name, cleaned
        return
    with pytest.raises(ConfigError, match="EDGELINK_EDGE_ID"):
        forward.check(settings(edge_id=edge_id))


@pytest.mark.parametrize("url", ["http://broker:1", "amqp://x", "nats://", "kafka", "nats://h:99999"])
def test_bad_url_names_the_setting(url: str) -> None:
    with pytest.raises(ConfigError, match="EDGELINK_FORWARD_URL"):
        forward.check(settings(forward_url=url))


def test_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forward.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"edgelink\[mqtt\]"):
        forward.check(settings(forward_url="mqtt://127.0.0.1:1883"))
    with pytest.raises(ConfigError, match=r"edgelink\[nats\]"):
        forward.check(settings(forward_url="nats://127.0.0.1:4222"))


def test_credentials_stay_out_of_the_url_shown() -> None:
    t = forward.target(settings(forward_url="mqtts://u:p%40ss@broker.example:8883/5"))
    assert (t.user, t.password, t.tls, t.port) == ("u", "p@ss", True, 8883)
    assert t.safe_url == "mqtts://broker.example:8883/5"
    assert forward.target(settings(forward_url="nats://b", forward_user="a", forward_password="b")).user == "a"


def test_base_install_imports_no_broker_library() -> None:
    code = ("import sys, edgelink.serve, edgelink.runtime, edgelink.app, edgelink.forward.forwarder; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('nats', 'paho', 'aiomqtt')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_status_when_forwarding_is_off(gateway) -> None:
    assert gateway.get("/vx11/forward/status", token=False).status == 401
    st = gateway.get("/vx11/forward/status").json()
    assert st == {"enabled": False, "engine": None, "url": None, "edge_id": st["edge_id"], "epoch": st["epoch"],
                  "state": "disabled", "acked_seq": 0, "last_seq": 0, "backlog": 0, "in_flight": 0,
                  "last_error": None, "last_error_at": None, "last_ack_at": None, "dropped": 0, "dead_letters": 0,
                  "lag_seconds": 0}
    assert forward.EDGE_ID.fullmatch(st["edge_id"]) and len(st["epoch"]) == 32
    assert "edgelink_forward_" not in gateway.get("/metrics").body.decode()  # no forwarder, no series


def test_rewind_when_forwarding_is_off_or_asked_badly(gateway) -> None:
    assert gateway.post("/vx11/forward/rewind", {}, token=False).status == 401
    for body in ({"from_seq": 0}, {"from_seq": "1"}, {"from_seq": True}, {"from_seq": 2**63}, [1]):
        reply = gateway.post("/vx11/forward/rewind", body)
        assert reply.status == 422 and reply.json()["error"] == "validation_error", (body, reply.body)
    assert gateway.post("/vx11/forward/rewind", raw=b"{").status == 400
    for body in ({}, {"from_seq": 5}, None):
        reply = gateway.post("/vx11/forward/rewind", body)
        assert reply.status == 409 and reply.json()["error"] == "forwarding_disabled", reply.body
    listed = gateway.get("/vx11/forward/dead-letters")
    assert listed.status == 200 and listed.json() == {"dead_letters": [], "total": 0}
    assert gateway.get("/vx11/forward/dead-letters?limit=0").status == 422


def test_rewind_resends_from_a_seq_and_counts_the_resends(tmp_path: Path) -> None:
    world = World()

    async def body(ledger: Ledger) -> None:
        await fill(ledger, 30)
        fw = forwarder(ledger, world, window=8)
        await fw.start()
        await until(lambda: fw.acked_seq == 30)
        assert await fw.rewind(21) == {"from_seq": 21, "acked_seq": 20, "backlog": 10}
        assert await ledger.forward_cursor() == 20  # the stored cursor went back
        await until(lambda: fw.acked_seq == 30)
        assert fw.resent.values[()] == 10 and fw.rewinds.values[()] == 1
        ledger.retention_events = 1
        await ledger.prune()
        assert await fw.rewind(None) == {"from_seq": 30, "acked_seq": 29, "backlog": 1}  # the oldest stored
        await until(lambda: fw.acked_seq == 30)
        await fw.stop()

    run_with_ledger(tmp_path, body)
    assert [m.seq for m in world.sent] == list(range(1, 31)) + list(range(21, 31)) + [30]


def test_bad_edge_id_stops_the_start(tmp_path: Path) -> None:
    from conftest import start_gateway
    with pytest.raises(RuntimeError, match="EDGELINK_EDGE_ID"):
        start_gateway(tmp_path, {"EDGELINK_EDGE_ID": "no spaces allowed"})


def test_edgelink_check_runs_the_forwarding_check(tmp_path: Path) -> None:
    from conftest import EDGELINK
    env = {"PATH": "/usr/bin:/bin", "VX11_GATEWAY_TOKEN": "t", "EDGELINK_FORWARD_URL": "amqp://broker"}
    done = subprocess.run([EDGELINK, "check"], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert done.returncode == 1 and "EDGELINK_FORWARD_URL" in done.stderr, done.stderr


@pytest.mark.parametrize("msg_id", ["box1:2d997bab5e87490b86c8d3999e359b2e:123", "é:" + "a" * 200])
def test_mqtt5_msg_id_property_packs_as_paho_does(msg_id: str) -> None:
    pytest.importorskip("paho.mqtt")
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from edgelink.forward.mqtt_engine import _MsgIdProperties
    ref = Properties(PacketTypes.PUBLISH)
    ref.UserProperty = ("msg_id", msg_id)
    mine = _MsgIdProperties(msg_id)
    assert mine.pack() == ref.pack() and str(mine) == str(ref)
    back = Properties(PacketTypes.PUBLISH)
    back.unpack(mine.pack())  # a property length over 127 takes two bytes
    assert back.UserProperty == [("msg_id", msg_id)]


def test_nats_replies_taken_at_once_match_the_parser_at_every_split() -> None:
    """PubAcks taken straight from the socket's bytes (the parser's buffer empty) and
    what goes on to nats-py's parser (another frame, an unfinished one) count the same
    acks and the same refusal, wherever the stream is cut into reads."""
    pytest.importorskip("nats")
    from nats.protocol.parser import Parser

    from edgelink.forward.nats_engine import NatsEngine

    def reply(index: int, sid: int = 1) -> bytes:
        data = b'{"stream":"VX11","seq":%d}' % (100 + index)
        # as nats-server writes it: the empty reply field leaves two spaces (nats-py's
        # parser allows one or two); index 1 with one
        space = b" " if index == 1 else b"  "
        return b"MSG _INBOX.x.%d %d%s%d\r\n%s\r\n" % (index, sid, space, len(data), data)

    no_responders = b"NATS/1.0 503\r\n\r\n"
    stream = (reply(0) + reply(1) + b"PING\r\n" + reply(2) + reply(9, sid=2) + reply(3)
              + b"HMSG _INBOX.x.4 1 %d %d\r\n%s\r\n" % (len(no_responders), len(no_responders), no_responders)
              + reply(5))

    class Client:
        def __init__(self) -> None:
            self._ps = Parser(self)
            self.others: list[int] = []

        async def _process_msg(self, sid: int, *_: Any) -> None:
            self.others.append(sid)

        async def _process_ping(self) -> None:
            pass

    async def run(cut: int) -> tuple[int, str | None, list[int], int]:
        engine = NatsEngine(None)  # type: ignore[arg-type]
        engine._inbox = b"_INBOX.x"
        engine.acks = Acks(asyncio.get_running_loop())
        for _ in range(6):
            engine.acks.add()
        taken_at_once = 0
        reply_to = engine._reply_to

        def counted(token: bytes, data: bytes) -> None:
            nonlocal taken_at_once
            taken_at_once += 1
            reply_to(token, data)

        engine._reply_to = counted  # type: ignore[method-assign]
        client = Client()
        engine._bound_frames(client)  # type: ignore[arg-type]
        engine._take_replies(client, 1)  # type: ignore[arg-type]
        await client._ps.parse(stream[:cut])
        await client._ps.parse(stream[cut:])
        error = engine.acks.error
        return engine.acks.acked, error.kind if error else None, client.others, taken_at_once

    for cut in range(len(stream) + 1):
        assert asyncio.run(run(cut))[:3] == (4, "no_stream", [2]), cut
    # in one read, the two replies before the PING are taken at once, not by the parser
    # (the server's two-space form went to the parser every time before 2026-12-07)
    assert asyncio.run(run(0))[3] == 2
