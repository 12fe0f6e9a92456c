"""Event fan-out over /ws (API.md §5, §6) against the installed ``edgelink serve``: the
broadcast frame, client events, replay with ``since_seq`` (no gap, no duplicate, truncation)
and a slow consumer that must not hold back the others.

Absence is checked by order, not by waiting: after something that must NOT reach a client,
a broadcast "marker" is ingested, and the client's very next frame must be the marker.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import os
import socket
import sqlite3
import struct
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import websockets

from conftest import post_event, still_serving, until, wait_until, ws_url

TS = 1_700_000_000_000
ALERT = {"alert_id": "al-1", "severity": "warning", "message": "fan speed low", "timestamp": TS}
NARRATION = {"action": "fade", "reason": "end of cue", "next_step": "stop", "timestamp": TS}
FRAME_KEYS = {"channel", "event_id", "seq", "type", "source", "timestamp", "payload", "metadata"}


def run(coro, timeout: float = 60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def connect(gw, query: str = "", **kw: Any):
    """A client past its control frame; it reads without client-side flow control, so
    that it is never the slow one."""
    ws = await websockets.connect(ws_url(gw, f"token={gw.token}&{query}"), max_queue=None, **kw)
    first = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
    assert first["channel"] == "control" and first["type"] == "connected", first
    return ws, first


async def next_frame(ws, timeout: float = 10) -> dict:
    return orjson.loads(await asyncio.wait_for(ws.recv(), timeout))


def publish(gw, event_type: str, payload: Any, *, broadcast: bool = True, source: str = "madre",
            metadata: Any = None) -> dict:
    """An event ingested (broadcast unless told not to): its answer and ``http_status``, 201 or 422."""
    extra = {"metadata": metadata} if metadata is not None else {}
    r = post_event(gw, event_type, payload, source, broadcast=broadcast, **extra)
    assert r.status in (201, 422), r.body
    return r.json() | {"http_status": r.status}


async def apublish(gw, *args: Any, **kw: Any) -> dict:
    return await asyncio.to_thread(publish, gw, *args, **kw)


def ledger_by_id(db: Path) -> dict[str, tuple]:
    """event_id -> (seq, type, source, broadcast), read from the SQLite file itself."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return {r[1]: (r[0], r[2], r[3], bool(r[4])) for r in conn.execute(
            "SELECT seq, event_id, type, source, broadcast FROM events")}
    finally:
        conn.close()


def expected_frame(answer: dict, payload: Any, metadata: Any, timestamp: int) -> dict:
    return {"channel": "event", "event_id": answer["event_id"], "seq": answer["seq"], "type": answer["type"],
            "source": answer["source"], "timestamp": timestamp, "payload": payload, "metadata": metadata}


async def expect_marker(gw, clients: list, label: str) -> dict:
    """Broadcast a marker; every client's next frame must be it (nothing slipped in before)."""
    marker = await apublish(gw, "system.alert", dict(ALERT, alert_id=f"marker-{label}"))
    for ws in clients:
        frame = await next_frame(ws)
        assert frame["event_id"] == marker["event_id"], (label, frame)
    return marker


# --- fan-out ---------------------------------------------------------------------------------


def test_broadcast_reaches_every_client_with_the_exact_frame(gateway):
    async def go():
        clients = [(await connect(gateway, f"client_id=fan{i}"))[0] for i in range(5)]
        before = int(time.time() * 1000)
        meta = {"correlation_id": "c-9", "origin": "test"}
        answer = await apublish(gateway, "system.alert", ALERT, metadata=meta, source="hermes")
        assert answer["broadcast"] is True
        frames = [await next_frame(ws) for ws in clients]
        assert set(frames[0]) == FRAME_KEYS  # no internal fields (canonical, broadcast, ...)
        timestamp = frames[0]["timestamp"]
        assert isinstance(timestamp, int) and before <= timestamp <= int(time.time() * 1000) + 1
        for frame in frames:
            assert frame == expected_frame(answer, ALERT, meta, timestamp)
        # metadata absent -> null
        answer = await apublish(gateway, "switch.tension.updated",
                               {"value": 3, "components": {"a": 1}, "timestamp": TS})
        for ws in clients:
            frame = await next_frame(ws)
            assert frame == expected_frame(answer, {"value": 3, "components": {"a": 1}, "timestamp": TS}, None,
                                           frame["timestamp"])

        # what must not go out: broadcast false, a non-canonical type asking for it, a rejected event
        quiet = await apublish(gateway, "system.alert", ALERT, broadcast=False)
        assert quiet["http_status"] == 201 and quiet["broadcast"] is False
        custom = await apublish(gateway, "custom.thing", {"k": 1}, broadcast=True)
        assert custom["http_status"] == 201 and custom["broadcast"] is False
        rejected = await apublish(gateway, "system.alert", {"alert_id": "x"}, broadcast=True)
        assert rejected["http_status"] == 422
        await expect_marker(gateway, clients, "after-quiet")

        # a client that left does not disturb the others
        await clients.pop().close()
        await expect_marker(gateway, clients, "after-leave")
        for ws in clients:
            await ws.close()
    run(go())
    still_serving(gateway)


def test_client_events_are_echoed_stored_and_sent_to_every_client(gateway):
    async def go():
        (a, _), (b, _), (c, _) = [await connect(gateway, f"client_id={n}") for n in "abc"]

        # envelope form
        envelope = {"type": "system.alert", "payload": ALERT, "source": "operator-ui", "metadata": {"k": "v"}}
        text = orjson.dumps(envelope).decode()
        await a.send(text)
        assert await asyncio.wait_for(a.recv(), 10) == text  # the echo, verbatim
        from_a = [await next_frame(ws) for ws in (a, b, c)]  # the sender included, after its echo
        assert from_a[0] == from_a[1] == from_a[2]
        frame = from_a[0]
        assert set(frame) == FRAME_KEYS
        assert (frame["channel"], frame["type"], frame["source"], frame["payload"], frame["metadata"]) == \
            ("event", "system.alert", "operator-ui", ALERT, {"k": "v"})
        assert isinstance(frame["seq"], int) and frame["seq"] >= 1

        # flat form: type plus the payload fields at top level; source defaults to ws:<client_id>
        flat = {"type": "shub.action.narrated", **NARRATION}
        text = orjson.dumps(flat).decode()
        await b.send(text)
        assert await asyncio.wait_for(b.recv(), 10) == text
        from_b = [await next_frame(ws) for ws in (a, b, c)]
        assert from_b[0] == from_b[1] == from_b[2]
        assert from_b[0]["payload"] == NARRATION and from_b[0]["source"] == "ws:b"
        assert from_b[0]["metadata"] is None and from_b[0]["seq"] > frame["seq"]
        # as Tentáculo Link broadcast a flat event: its fields at the top level too
        assert set(from_b[0]) == FRAME_KEYS | set(NARRATION)
        assert all(from_b[0][k] == v for k, v in NARRATION.items() if k not in FRAME_KEYS)

        # nothing else: one broadcast per event
        await expect_marker(gateway, [a, b, c], "after-valid")

        rows = ledger_by_id(gateway.db)
        assert rows[frame["event_id"]] == (frame["seq"], "system.alert", "operator-ui", True)
        assert rows[from_b[0]["event_id"]] == (from_b[0]["seq"], "shub.action.narrated", "ws:b", True)
        stored = len(rows)

        # an invalid canonical event: echoed, reported to its sender only, not stored, not broadcast
        for bad in ({"type": "system.alert", "payload": {"alert_id": "x"}},
                    {"type": "system.alert", **ALERT, "timestamp": True},
                    {"type": "switch.tension.updated", "payload": "not an object"}):
            text = orjson.dumps(bad).decode()
            await c.send(text)
            assert await asyncio.wait_for(c.recv(), 10) == text
            err = await next_frame(c)
            assert err["channel"] == "control" and err["type"] == "error", err
            assert err["error"] == "schema_validation_failed" and err["event_type"] == bad["type"], err
            assert isinstance(err["detail"], str) and err["detail"]
        # plain JSON that is not an event, and a non-canonical one: echo only
        for other in ({"hello": "world"}, [1, 2], {"type": "custom.chat", "payload": {"m": 1}}):
            text = orjson.dumps(other).decode()
            await c.send(text)
            assert await asyncio.wait_for(c.recv(), 10) == text
        # invalid JSON: an error frame, and the client stays connected
        await c.send("{not json")
        assert await next_frame(c) == {"channel": "control", "type": "error", "error": "invalid_json"}
        await expect_marker(gateway, [a, b, c], "after-invalid")
        assert len(ledger_by_id(gateway.db)) == stored + 1  # only the marker

        # cardinality counted each accepted event once: 2 client events and 2 markers
        card = gateway.get("/debug/events/cardinality").json()
        assert card["events"]["system.alert"]["count"] == 1 + 2
        assert card["events"]["shub.action.narrated"]["count"] == 1
        for ws in (a, b, c):
            await ws.close()
    run(go())
    still_serving(gateway)


# --- replay --------------------------------------------------------------------------------


def _read_seqs(frames: list[dict]) -> list[int]:
    assert all(f["channel"] == "event" and set(f) == FRAME_KEYS for f in frames), frames
    return [f["seq"] for f in frames]


def test_replay_since_seq(gateway):
    k = 12
    answers = [publish(gateway, "system.alert", dict(ALERT, alert_id=f"r{i}")) for i in range(k)]
    assert [a["seq"] for a in answers] == list(range(1, k + 1))
    # events that are not broadcast take seqs but are never replayed
    publish(gateway, "system.alert", ALERT, broadcast=False)
    publish(gateway, "custom.thing", {"x": 1}, broadcast=True)
    last_seq = k + 2

    async def go():
        clients = {}
        for since in (0, 1, 5, k - 1, k, k + 1, k + 2, k + 50):
            ws, first = await connect(gateway, f"client_id=r{since}&since_seq={since}")
            # beyond last_seq: another ledger's seq, replayed from the oldest (API.md §6)
            beyond = since > last_seq
            after = 0 if beyond else since
            expected = max(0, k - after)
            assert first.pop("epoch")
            assert first == {"channel": "control", "type": "connected", "client_id": f"r{since}",
                             "last_seq": last_seq, "replayed": expected, "truncated": beyond}, since
            frames = [await next_frame(ws) for _ in range(expected)]
            assert _read_seqs(frames) == list(range(after + 1, k + 1)), since
            for frame in frames:
                assert frame["event_id"] == answers[frame["seq"] - 1]["event_id"]
                assert frame["payload"] == dict(ALERT, alert_id=f"r{frame['seq'] - 1}")
            clients[since] = ws
        # without since_seq: nothing replayed
        plain, first = await connect(gateway, "client_id=plain")
        assert (first["replayed"], first["truncated"], first["last_seq"]) == (0, False, last_seq)
        clients[None] = plain

        # then live events follow, the same for everyone
        live = await apublish(gateway, "system.alert", dict(ALERT, alert_id="live"))
        assert live["seq"] == last_seq + 1
        for since, ws in clients.items():
            frame = await next_frame(ws)
            assert frame["seq"] == live["seq"] and frame["event_id"] == live["event_id"], since
            await ws.close()
    run(go())
    still_serving(gateway)


def test_replay_is_truncated_to_the_newest(gateway_factory):
    gw = gateway_factory({"EDGELINK_WS_REPLAY_MAX": "10"})
    answers = [publish(gw, "system.alert", dict(ALERT, alert_id=f"t{i}")) for i in range(25)]
    assert answers[-1]["seq"] == 25

    async def go():
        for since, truncated in ((0, True), (14, True), (15, False), (20, False), (25, False)):
            ws, first = await connect(gw, f"since_seq={since}")
            replayed = min(10, 25 - since)
            assert (first["replayed"], first["truncated"], first["last_seq"]) == (replayed, truncated, 25), since
            frames = [await next_frame(ws) for _ in range(replayed)]
            assert _read_seqs(frames) == list(range(26 - replayed, 26)), since  # the newest, oldest first
            assert [f["event_id"] for f in frames] == [a["event_id"] for a in answers[25 - replayed:]]
            await ws.close()
        # live events follow a truncated replay
        ws, first = await connect(gw, "since_seq=0")
        frames = [await next_frame(ws) for _ in range(first["replayed"])]
        live = await apublish(gw, "forensic.snapshot.created", {"snapshot_id": "s", "reason": "r", "timestamp": TS})
        assert (await next_frame(ws))["seq"] == live["seq"] == frames[-1]["seq"] + 1
        await ws.close()
    run(go())
    still_serving(gw)


def _keepalive_ingester(gw, count: int, answers: list, progress: list, worker: int, pad: int = 0,
                        reader: list | None = None, lead: int = 0) -> None:
    """Post ``count`` events one after the other; with ``reader`` (the seqs a client has
    received), at most ``lead`` events ahead of it."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    headers = {"X-VX11-Token": gw.token, "Content-Type": "application/json"}
    try:
        for i in range(count):
            if reader is not None:  # at most ``lead`` ahead of the reader (after 30 s, on regardless)
                with contextlib.suppress(AssertionError):
                    wait_until(lambda: len(reader) >= i - lead, 30, every=0.001)
            body = {"source": f"ing{worker}", "type": "system.alert", "broadcast": True,
                    "payload": dict(ALERT, alert_id=f"{worker}-{i}", message="m" * pad or ALERT["message"])}
            conn.request("POST", "/events/ingest", body=orjson.dumps(body), headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            assert resp.status == 201, data
            answers.append(orjson.loads(data))
            progress[0] += 1
    finally:
        conn.close()


async def _collect(ws, seqs: list[int]) -> None:
    """Append the seq of every event frame until the connection closes or is cancelled."""
    try:
        async for message in ws:
            frame = orjson.loads(message)
            assert frame["channel"] == "event", frame
            seqs.append(frame["seq"])
    except websockets.ConnectionClosed:
        pass


async def _wait_for(seqs: list[int], target: int, timeout: float) -> None:
    """Until ``seqs`` reaches ``target`` (or the timeout: the caller's check says what is missing)."""
    with contextlib.suppress(AssertionError):
        await until(lambda: seqs and seqs[-1] >= target, timeout)


async def _probe_seam(ws, first: dict, live_after: int, ingest_over: asyncio.Event) -> list[int]:
    """Read a joining client's replay and up to ``live_after`` frames after it."""
    seqs: list[int] = []
    try:
        while len(seqs) < first["replayed"] + live_after:
            try:
                seqs.append(orjson.loads(await asyncio.wait_for(ws.recv(), 0.5))["seq"])
            except asyncio.TimeoutError:
                if ingest_over.is_set():
                    break
    except websockets.ConnectionClosed:
        pass
    await ws.close()
    return seqs


def test_replay_joins_live_events_without_gap_or_duplicate(gateway_factory):
    """Clients join with since_seq while three ingesters run; each must get exactly the
    broadcast seqs after its since_seq, in order: replayed ones, then held-back and live
    ones, nothing lost or sent twice at the seam. (A race fixed in hub.py: an event
    committed before the replay read but broadcast after the client went live was sent
    twice; a join hits that window rarely, so many short "seam" probes join too.)"""
    gw = gateway_factory({"EDGELINK_WS_REPLAY_MAX": "5000"})
    per_worker, workers, max_probes = 500, 3, 200
    total = per_worker * workers  # below the replay limit: a since_seq=0 client gets everything
    answers: list[dict] = []
    progress = [0]

    async def go():
        threads = [threading.Thread(target=_keepalive_ingester, args=(gw, per_worker, answers, progress, w),
                                    daemon=True) for w in range(workers)]
        for t in threads:
            t.start()
        ingest_over = asyncio.Event()
        full = []  # (since, ws, first, seqs, task): kept to the end, checked over the whole range
        probes = []  # (since, first, task): the seam only
        n = 0
        while (any(t.is_alive() for t in threads) and len(probes) < max_probes) or len(full) < 3:
            if n % 10 == 0 and len(full) < 8:
                since = progress[0] // 2 if len(full) % 3 == 2 else 0  # some resume mid-stream
                ws, first = await connect(gw, f"since_seq={since}")
                seqs: list[int] = []
                full.append((since, ws, first, seqs, asyncio.create_task(_collect(ws, seqs))))
            else:
                since = max(0, progress[0] - 30)  # a short replay: the seam is what is probed
                ws, first = await connect(gw, f"since_seq={since}")
                probes.append((since, first, asyncio.create_task(_probe_seam(ws, first, 20, ingest_over))))
            n += 1
        for t in threads:
            await asyncio.to_thread(t.join, 30)
            assert not t.is_alive()
        ingest_over.set()
        assert len(answers) == total
        highest = max(a["seq"] for a in answers)
        assert sorted(a["seq"] for a in answers) == list(range(1, total + 1))

        def check(since: int, first: dict, seqs: list[int], upto: int) -> None:
            assert not first["truncated"]
            assert first["replayed"] <= max(0, first["last_seq"] - since)
            assert seqs == list(range(since + 1, upto + 1)), (
                f"since_seq={since} replayed={first['replayed']} last_seq={first['last_seq']}: "
                f"{len(seqs)} frames, missing {sorted(set(range(since + 1, upto + 1)) - set(seqs))[:10]}, "
                f"sent twice {sorted(s for s in set(seqs) if seqs.count(s) > 1)[:10]}")

        for since, first, task in probes:
            seqs = await task
            check(since, first, seqs, max(seqs, default=since))
            assert len(seqs) >= first["replayed"]
        joined_live = 0
        for since, ws, first, seqs, task in full:
            await _wait_for(seqs, highest, 20)
            await ws.close()
            await task
            check(since, first, seqs, highest)
            joined_live += first["last_seq"] < highest
        assert joined_live >= 2, "the clients joined after the ingest was over; nothing concurrent was tested"
        return len(full), len(probes)
    full, probes = run(go())
    print(f"{full} clients to the end and {probes} seam probes joined during the ingest")
    still_serving(gw)


# --- a slow consumer ------------------------------------------------------------------------


def _stuck_client(gw, query: str = "client_id=stuck", headers: str = "") -> socket.socket:
    """A WebSocket that completes its handshake and then never reads again; ``headers``
    are extra header lines, each ending in CRLF."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", gw.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws?token={gw.token}&{query} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  f"{headers}\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1)  # byte by byte: leave everything after the handshake unread
        assert chunk, "closed during the handshake"
        data += chunk
    assert data.startswith(b"HTTP/1.1 101"), data
    return sock


def _drain(sock: socket.socket, timeout: float) -> tuple[bool, list[tuple[int, bytes]]]:
    """Read until the server closes (EOF or reset) or ``timeout``; returns (closed, frames)."""
    sock.settimeout(1)
    data = b""
    closed = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        data += chunk
    frames = []
    pos = 0
    while pos + 2 <= len(data):
        opcode, n = data[pos] & 0x0F, data[pos + 1] & 0x7F
        pos += 2
        if n == 126:
            (n,) = struct.unpack("!H", data[pos:pos + 2])
            pos += 2
        elif n == 127:
            (n,) = struct.unpack("!Q", data[pos:pos + 8])
            pos += 8
        if pos + n > len(data):
            break
        frames.append((opcode, data[pos:pos + n]))
        pos += n
    return closed, frames


# Big enough events that 10,000 of them (~17 MB) cannot all hide in the kernel's socket
# buffers (up to 4 MiB each way) plus the gateway's write buffer and 1,000-frame queue.
STUCK_PAD = 1500


def test_slow_consumer_is_closed_and_the_others_get_everything(gateway_factory):
    gw = gateway_factory({"EDGELINK_LEDGER_SYNC": "normal"})
    total, workers = 10_000, 4
    answers: list[dict] = []
    progress = [0]

    async def go():
        stuck = await asyncio.to_thread(_stuck_client, gw)
        normal = []
        for i in range(3):
            ws, _ = await connect(gw, f"client_id=ok{i}")
            seqs: list[int] = []
            normal.append((ws, seqs, asyncio.create_task(_collect(ws, seqs))))
        started = time.monotonic()
        threads = [threading.Thread(target=_keepalive_ingester,
                                    args=(gw, total // workers, answers, progress, w, STUCK_PAD), daemon=True)
                   for w in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            await asyncio.to_thread(t.join, 60)
            assert not t.is_alive()
        ingest_seconds = time.monotonic() - started
        assert len(answers) == total
        expected = sorted(a["seq"] for a in answers)
        assert expected == list(range(1, total + 1))
        for ws, seqs, task in normal:
            await _wait_for(seqs, total, 30)
            assert seqs == expected, (f"{len(seqs)} of {total} received, close code {ws.close_code}")
            assert ws.close_code is None  # still open: never treated as slow
        # the stuck one was dropped by the server: reading it now ends in EOF/reset, after
        # far fewer than all the events
        closed, frames = await asyncio.to_thread(_drain, stuck, 20)
        stuck.close()
        events = [f for op, f in frames if op == 0x1 and f.startswith(b'{"channel":"event"')]
        assert closed, f"the server never closed the client that stopped reading ({len(events)} events read)"
        assert len(events) < total
        closes = [f for op, f in frames if op == 0x8]
        if closes:  # the close frame made it out before the socket was dropped
            assert struct.unpack("!H", closes[0][:2])[0] == 1013
        # the survivors still get live events
        marker = await apublish(gw, "system.alert", dict(ALERT, alert_id="after-slow"))
        for ws, seqs, task in normal:
            await _wait_for(seqs, marker["seq"], 10)
            assert seqs[-1] == marker["seq"]
            await ws.close()
            await task
        return ingest_seconds
    ingest_seconds = run(go(), timeout=60)
    print(f"ingested and fanned out {total} events in {ingest_seconds:.1f} s")
    still_serving(gw)
    ws_ok = run(_connect_and_close(gw))
    assert ws_ok


async def _connect_and_close(gw) -> bool:
    ws, first = await connect(gw)
    assert first["last_seq"] == total_after(gw)
    await ws.close()
    return True


def total_after(gw) -> int:
    conn = sqlite3.connect(f"file:{gw.db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute("SELECT max(seq) FROM events").fetchone()[0]
    finally:
        conn.close()


def test_first_frame_is_always_the_control_frame_while_events_flow(gateway):
    """A client joining while broadcasts flow sees `connected` first, never an event."""
    stop = threading.Event()

    def ingest_forever():
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
        body = orjson.dumps({"source": "t", "type": "system.alert", "broadcast": True, "payload": {
            "alert_id": "a", "severity": "low", "message": "m", "timestamp": 1}})
        while not stop.is_set():
            conn.request("POST", "/events/ingest", body=body,
                         headers={"X-VX11-Token": gateway.token, "Content-Type": "application/json"})
            conn.getresponse().read()
        conn.close()

    threads = [threading.Thread(target=ingest_forever) for _ in range(3)]
    for t in threads:
        t.start()

    async def join_many():
        for _ in range(60):
            async with websockets.connect(f"ws://127.0.0.1:{gateway.port}/ws?token={gateway.token}") as ws:
                first = orjson.loads(await ws.recv())
                assert first["channel"] == "control" and first["type"] == "connected", first

    try:
        asyncio.run(asyncio.wait_for(join_many(), 60))
    finally:
        stop.set()
        for t in threads:
            t.join()


# --- epoch, metadata bound, byte-bounded queues, paced replay --------------------------------


def test_a_different_epoch_replays_from_the_oldest_stored_event(gateway):
    answers = [publish(gateway, "system.alert", dict(ALERT, alert_id=f"e{i}")) for i in range(5)]

    async def go():
        ws, first = await connect(gateway, "since_seq=3")
        epoch = first["epoch"]
        assert (first["replayed"], first["truncated"]) == (2, False)
        await ws.close()
        same, first = await connect(gateway, f"since_seq=3&epoch={epoch}")
        assert (first["replayed"], first["truncated"]) == (2, False)
        assert _read_seqs([await next_frame(same) for _ in range(2)]) == [4, 5]
        await same.close()
        # seq 3 of another database file says nothing about this one: everything, truncated
        other, first = await connect(gateway, "since_seq=3&epoch=0123456789abcdef")
        assert (first["replayed"], first["truncated"], first["epoch"]) == (5, True, epoch)
        frames = [await next_frame(other) for _ in range(5)]
        assert [f["event_id"] for f in frames] == [a["event_id"] for a in answers]
        await other.close()
    run(go())


def test_metadata_is_at_most_4_kib_on_ingest_and_from_clients(gateway):
    big = {"note": "x" * 4100}
    at_limit = {"n": "y" * (4096 - len(b'{"n":""}'))}
    for event_type, payload in (("system.alert", ALERT), ("custom.thing", {"x": 1})):
        r = gateway.post("/events/ingest", {"source": "madre", "type": event_type, "payload": payload,
                                            "metadata": big})
        body = r.json()
        assert (r.status, body["error"]) == (422, "validation_error"), body
        assert body["detail"][0]["loc"] == ["body", "metadata"]
        assert publish(gateway, event_type, payload, metadata=at_limit)["http_status"] == 201

    async def go():
        sender, _ = await connect(gateway, "client_id=sender")
        other, _ = await connect(gateway, "client_id=other")
        await sender.send(orjson.dumps({"type": "system.alert", "payload": ALERT, "metadata": big}).decode())
        echo = orjson.loads(await sender.recv())
        assert echo.get("metadata") == big, echo  # the echo
        error = await next_frame(sender)
        assert (error["channel"], error["type"], error["error"]) == ("control", "error", "validation_error")
        marker = await apublish(gateway, "system.alert", dict(ALERT, alert_id="after-big"))
        assert (await next_frame(other))["seq"] == marker["seq"]  # the big one was not broadcast
        await sender.close()
        await other.close()
    run(go())
    still_serving(gateway)


def test_a_slow_consumer_is_closed_by_the_byte_bound_before_the_frame_bound(gateway_factory):
    # frames bound far away, bytes bound small: only the byte bound can close it
    gw = gateway_factory({"EDGELINK_LEDGER_SYNC": "normal", "EDGELINK_WS_QUEUE": "1000000",
                          "EDGELINK_WS_QUEUE_BYTES": "65536", "EDGELINK_WRITE_BUFFER_HIGH": "16384"})
    total = 4000

    async def go():
        stuck = await asyncio.to_thread(_stuck_client, gw)
        ok, _ = await connect(gw, "client_id=ok")
        seqs: list[int] = []
        task = asyncio.create_task(_collect(ok, seqs))
        answers: list[dict] = []
        # The ingester and the reading client share this process (and its GIL): on a busy
        # box the ingester can starve the reader until the server rightly closes it too.
        # Twenty events ahead (~32 KiB) stays within the byte bound for it, never for stuck.
        await asyncio.to_thread(_keepalive_ingester, gw, total, answers, [0], 0, STUCK_PAD, seqs, 20)
        await _wait_for(seqs, total, 30)
        assert seqs == list(range(1, total + 1)) and ok.close_code is None
        closed, frames = await asyncio.to_thread(_drain, stuck, 20)
        stuck.close()
        assert closed, "the client that stopped reading was never closed"
        closes = [f for op, f in frames if op == 0x8]
        if closes:
            assert struct.unpack("!H", closes[0][:2])[0] == 1013
        await ok.close()
        await task
    run(go(), timeout=90)
    metrics = gw.get("/metrics", token=False).body.decode()
    assert 'edgelink_budget_refusals_total{budget="ws_queue"} 1' in metrics
    assert "edgelink_ws_queued_bytes" in metrics
    assert gw.logs().count("ws_slow_consumer_closed") == 1  # logged once for the client


def test_a_replay_paced_by_a_slow_reader_keeps_up_with_live_events(gateway_factory):
    # a replay far larger than the socket buffers, read slowly while live events arrive:
    # what is held for the client overflows, and it must still get every event once, in
    # order, by the replay reading on from the ledger; never closed as a slow consumer
    gw = gateway_factory({"EDGELINK_LEDGER_SYNC": "normal", "EDGELINK_WS_QUEUE": "20",
                          "EDGELINK_WS_REPLAY_MAX": "5000"})
    before, during = 4000, 400
    answers: list[dict] = []
    _keepalive_ingester(gw, before, answers, [0], 0, STUCK_PAD)

    async def go():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", gw.port))
        ws = await websockets.connect(ws_url(gw, f"token={gw.token}&since_seq=0"), sock=sock, max_queue=4)
        first = orjson.loads(await ws.recv())
        assert first["replayed"] == before
        ingester = threading.Thread(target=_keepalive_ingester, args=(gw, during, answers, [0], 1, STUCK_PAD))
        ingester.start()
        seqs = []
        while len(seqs) < before + during:
            frame = orjson.loads(await asyncio.wait_for(ws.recv(), 20))
            seqs.append(frame["seq"])
            if len(seqs) < 300:
                await asyncio.sleep(0.005)  # real time: a reader slow at first, while the ingester runs
        await asyncio.to_thread(ingester.join, 30)
        assert seqs == list(range(1, before + during + 1))
        await ws.close()
    run(go(), timeout=90)
    assert "slow_consumer" not in gw.logs()


def test_deflate_streams_keep_their_order_while_echoes_and_broadcasts_interleave(gateway_factory):
    """The frames broadcast in one turn go out together at its end (hub.py): a connection's
    own sends (echoes) in between must still follow them, or with permessage-deflate the
    client cannot inflate what it gets. Client events and ingests flow at once."""
    gw = gateway_factory({"EDGELINK_WS_COMPRESSION": "true"})
    count = 150

    async def go():
        sender, _ = await connect(gw, "client_id=sender", compression="deflate")
        watcher, _ = await connect(gw, "client_id=watcher", compression="deflate")
        texts = [orjson.dumps({"type": "system.alert", "payload": dict(ALERT, alert_id=f"ws-{i}")}).decode()
                 for i in range(count)]

        def post(worker: int) -> list[int]:
            return [publish(gw, "system.alert", dict(ALERT, alert_id=f"in-{worker}-{i}"))["seq"]
                    for i in range(count // 3)]

        posting = [asyncio.create_task(asyncio.to_thread(post, w)) for w in range(3)]
        for text in texts:
            await sender.send(text)
        ingested = sorted(seq for seqs in await asyncio.gather(*posting) for seq in seqs)

        echoes, seen_by_sender = [], []
        while len(echoes) < count or len(seen_by_sender) < count + len(ingested):
            raw = await asyncio.wait_for(sender.recv(), 10)
            frame = orjson.loads(raw)
            if frame.get("channel") == "event":
                seen_by_sender.append(frame["seq"])
            else:
                echoes.append(raw)
        assert echoes == texts  # verbatim, in the order sent
        # in seq order, its own events included (as Tentáculo Link broadcast them)
        assert seen_by_sender == sorted(set(seen_by_sender)) and set(ingested) <= set(seen_by_sender)

        seen_by_watcher = [(await next_frame(watcher))["seq"] for _ in range(count + len(ingested))]
        assert seen_by_watcher == sorted(set(seen_by_watcher))
        assert set(ingested) <= set(seen_by_watcher)
        await expect_marker(gw, [sender, watcher], "after-interleaving")
        for ws in (sender, watcher):
            await ws.close()
    run(go())
    still_serving(gw)
