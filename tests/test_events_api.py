"""POST /events/ingest, the ledger file, the debug views and the operator snapshot
(API.md §1, §5) over real sockets against the installed ``edgelink serve``.

The ledger is the truth: where a test says "nothing stored" or "stored", it reads the
SQLite file itself (read-only, next to the running gateway, which keeps it in WAL mode).
"""

from __future__ import annotations

import http.client
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import RawClient, ms_after, post_event, still_serving, wait_until

TS = 1_700_000_000_000

# One realistic valid payload per canonical type (API.md §5).
VALID: dict[str, dict[str, Any]] = {
    "system.alert": {"alert_id": "al-1", "severity": "high", "message": "disk 91% full", "timestamp": TS},
    "system.correlation.updated": {"correlation_id": "co-1", "related_events": ["e1", "e2"], "strength": 0.75,
                                   "timestamp": TS},
    "forensic.snapshot.created": {"snapshot_id": "sn-1", "reason": "operator request", "timestamp": TS},
    "madre.decision.explained": {"decision_id": "de-1", "summary": "routed to switch", "confidence": 0.9,
                                 "timestamp": TS},
    "switch.tension.updated": {"value": 42, "components": {"cpu": 0.4, "queue": 3}, "timestamp": TS},
    "shub.action.narrated": {"action": "mix", "reason": "cue reached", "next_step": "render", "timestamp": TS},
}
MAX_BYTES = {
    "system.alert": 2048, "system.correlation.updated": 2048, "forensic.snapshot.created": 1024,
    "madre.decision.explained": 3072, "switch.tension.updated": 1024, "shub.action.narrated": 2048,
}
# required field -> a value of a wrong JSON kind
WRONG_KIND: dict[str, dict[str, Any]] = {
    "system.alert": {"alert_id": 1, "severity": ["high"], "message": None, "timestamp": "1700000000000"},
    "system.correlation.updated": {"correlation_id": 7, "related_events": "e1,e2", "strength": "0.5",
                                   "timestamp": 1.5},
    "forensic.snapshot.created": {"snapshot_id": {}, "reason": 3, "timestamp": [TS]},
    "madre.decision.explained": {"decision_id": 1.0, "summary": {"t": 1}, "confidence": "high", "timestamp": None},
    "switch.tension.updated": {"value": 4.5, "components": [1, 2], "timestamp": "now"},
    "shub.action.narrated": {"action": 0, "reason": [], "next_step": False, "timestamp": {}},
}
NUMERIC_FIELDS = {
    "system.alert": ["timestamp"],
    "system.correlation.updated": ["strength", "timestamp"],
    "forensic.snapshot.created": ["timestamp"],
    "madre.decision.explained": ["confidence", "timestamp"],
    "switch.tension.updated": ["value", "timestamp"],
    "shub.action.narrated": ["timestamp"],
}
CANONICAL = list(VALID)


def compact_size(payload: Any) -> int:
    return len(orjson.dumps(payload))


def sized_payload(event_type: str, size: int) -> dict[str, Any]:
    """A valid payload of ``event_type`` whose compact JSON is exactly ``size`` bytes."""
    payload = dict(VALID[event_type], note="")
    payload["note"] = "n" * (size - compact_size(payload))
    assert compact_size(payload) == size
    return payload


def ledger_rows(db: Path) -> list[tuple]:
    """(seq, event_id, type, source, canonical, broadcast) of every stored event, read from
    the file itself while the gateway may be running."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(
            "SELECT seq, event_id, type, source, canonical, broadcast FROM events ORDER BY seq").fetchall()
    finally:
        conn.close()


def snapshot_counts(gw) -> dict[str, int]:
    r = gw.get("/operator/snapshot")
    assert r.status == 200
    return r.json()["events"]["counts_by_type"]


# --- accepted events -----------------------------------------------------------------


def test_ingest_every_canonical_type_and_a_non_canonical_one(gateway):
    answers = []
    for i, event_type in enumerate(CANONICAL):
        r = post_event(gateway, event_type, VALID[event_type], source=f"src-{i}", broadcast=True,
                   metadata={"trace": i})
        assert r.status == 201, r.body
        body = r.json()
        assert set(body) == {"status", "event_id", "seq", "source", "type", "canonical", "broadcast"}
        assert body["status"] == "received"
        assert body["source"] == f"src-{i}" and body["type"] == event_type
        assert body["canonical"] is True and body["broadcast"] is True
        assert isinstance(body["event_id"], str) and body["event_id"]
        assert isinstance(body["seq"], int) and not isinstance(body["seq"], bool)
        answers.append(body)
    # broadcast defaults to false
    r = post_event(gateway, "system.alert", VALID["system.alert"])
    assert r.status == 201 and r.json()["broadcast"] is False and r.json()["canonical"] is True
    answers.append(r.json())
    # a non-canonical type is accepted unchecked and never broadcast, even when asked
    for payload in ({"anything": [1, 2, {"x": None}]}, {}):
        r = post_event(gateway, "custom.sensor.reading", payload, source="probe", broadcast=True)
        assert r.status == 201, r.body
        body = r.json()
        assert body["status"] == "received" and body["type"] == "custom.sensor.reading"
        assert body["canonical"] is False and body["broadcast"] is False
        answers.append(body)

    seqs = [a["seq"] for a in answers]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and seqs[0] >= 1
    assert len({a["event_id"] for a in answers}) == len(answers)

    # the ledger file holds exactly these events, each under its seq
    rows = ledger_rows(gateway.db)
    assert [(r[0], r[1]) for r in rows] == [(a["seq"], a["event_id"]) for a in answers]
    for row, a in zip(rows, answers):
        _, _, type_, source, canonical, broadcast = row
        assert (type_, source, bool(canonical), bool(broadcast)) == (a["type"], a["source"], a["canonical"],
                                                                        a["broadcast"])
    counts = snapshot_counts(gateway)
    assert counts == {**{t: 1 for t in CANONICAL}, "system.alert": 2, "custom.sensor.reading": 2}
    still_serving(gateway)


# --- schema rejections -----------------------------------------------------------------


def _rejection_cases(event_type: str) -> list[tuple[str, Any, str]]:
    """(what, payload, a word the detail must contain) for every rule of the type."""
    valid = VALID[event_type]
    cases = []
    for field in valid:
        cases.append((f"missing {field}", {k: v for k, v in valid.items() if k != field}, field))
    for field, wrong in WRONG_KIND[event_type].items():
        cases.append((f"wrong kind {field}", {**valid, field: wrong}, field))
    for field in NUMERIC_FIELDS[event_type]:
        for flag in (True, False):
            cases.append((f"{flag} as {field}", {**valid, field: flag}, field))
    cases.append(("one byte over", sized_payload(event_type, MAX_BYTES[event_type] + 1),
                  str(MAX_BYTES[event_type])))
    return cases


@pytest.mark.parametrize("event_type", CANONICAL)
def test_schema_failures_are_rejected_and_nothing_is_stored(shared_gateway, event_type):
    gw = shared_gateway
    before_rows = ledger_rows(gw.db)
    before_counts = snapshot_counts(gw)
    for what, payload, word in _rejection_cases(event_type):
        r = post_event(gw, event_type, payload, source="rejectme", broadcast=True)
        assert r.status == 422, (what, r.body)
        body = r.json()
        assert body["status"] == "rejected" and body["reason"] == "schema_validation_failed", what
        assert body["source"] == "rejectme" and body["type"] == event_type, what
        assert isinstance(body["detail"], str) and word in body["detail"], (what, body["detail"])
        # the common error shape of §1 is kept as well
        assert body["status_code"] == 422
        assert body["correlation_id"] == r.headers["x-correlation-id"]
    assert ledger_rows(gw.db) == before_rows
    assert snapshot_counts(gw) == before_counts

    # exactly at the limit is accepted, and stored
    r = post_event(gw, event_type, sized_payload(event_type, MAX_BYTES[event_type]), source="edge")
    assert r.status == 201, r.body
    rows = ledger_rows(gw.db)
    assert rows[-1][:3] == (r.json()["seq"], r.json()["event_id"], event_type)
    assert len(rows) == len(before_rows) + 1
    still_serving(gw)


def test_size_limit_counts_compact_utf8_bytes(shared_gateway):
    """A payload sent with whitespace is measured compact; multi-byte characters count in bytes."""
    gw = shared_gateway
    payload = sized_payload("forensic.snapshot.created", 1024)
    spaced = orjson.dumps({"source": "s", "type": "forensic.snapshot.created", "payload": payload},
                          option=orjson.OPT_INDENT_2)
    assert gw.request("POST", "/events/ingest", raw=spaced).status == 201
    # "é" is two bytes in UTF-8: 1022 bytes of padding in chars becomes more than 1024 in bytes
    payload = sized_payload("forensic.snapshot.created", 1024)
    payload["note"] = payload["note"][:-1] + "é"
    assert compact_size(payload) == 1025
    r = post_event(gw, "forensic.snapshot.created", payload)
    assert r.status == 422 and r.json()["reason"] == "schema_validation_failed"


# --- envelope and transport errors --------------------------------------------------------


def _locs(reply) -> list[list]:
    body = reply.json()
    assert reply.status == 422 and body["error"] == "validation_error" and body["status_code"] == 422, body
    assert all(set(d) >= {"loc", "msg"} for d in body["detail"])
    return [d["loc"] for d in body["detail"]]


def test_envelope_errors_are_validation_errors(shared_gateway):
    gw = shared_gateway
    before = ledger_rows(gw.db)
    for not_object in ([1, 2], "text", 3, None, True):
        r = gw.request("POST", "/events/ingest", raw=orjson.dumps(not_object))
        assert _locs(r) == [["body"]], not_object
    for payload in ([1], "x", 5, True):
        assert ["body", "payload"] in _locs(post_event(gw, "system.alert", payload)), payload
    assert ["body", "payload"] in _locs(gw.post("/events/ingest", {"source": "s", "type": "system.alert"}))
    assert _locs(gw.post("/events/ingest", {"type": "system.alert", "payload": VALID["system.alert"]})) \
        == [["body", "source"]]
    assert ["body", "source"] in _locs(post_event(gw, "system.alert", VALID["system.alert"], source=12))
    assert ["body", "type"] in _locs(gw.post("/events/ingest", {"source": "s", "payload": {}}))
    assert ["body", "broadcast"] in _locs(post_event(gw, "system.alert", VALID["system.alert"], broadcast="yes"))
    assert ["body", "metadata"] in _locs(post_event(gw, "system.alert", VALID["system.alert"], metadata=[1]))
    assert ledger_rows(gw.db) == before
    still_serving(gw)


def test_malformed_bodies_are_400_not_500(shared_gateway):
    gw = shared_gateway
    before = ledger_rows(gw.db)
    for raw in (b'{"source": "s", "type": ', b"not json", b"{'source': 's'}", b""):
        r = gw.request("POST", "/events/ingest", raw=raw)
        assert r.status == 400, (raw, r.body)
        assert r.json()["error"] == "invalid_json" and r.json()["status_code"] == 400
    # invalid UTF-8 inside a string, and as a bare byte
    for raw in (b'{"source": "\xff\xfe", "type": "x", "payload": {}}',
                b'{"source": "s", "type": "system.alert", "payload": {"alert_id": "\xc3\x28"}}',
                b'\xef\xbb\xbf\x80{}'):
        r = gw.request("POST", "/events/ingest", raw=raw)
        assert r.status == 400, (raw, r.status, r.body)
        assert r.json()["error"] == "invalid_json"
    assert ledger_rows(gw.db) == before
    still_serving(gw)


def test_two_mib_body_is_413(shared_gateway):
    gw = shared_gateway
    size = 2 * 1024 * 1024
    # decided from Content-Length, before the body is sent
    client = RawClient(gw.connect())
    client.send((f"POST /events/ingest HTTP/1.1\r\nHost: t\r\nX-VX11-Token: {gw.token}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n").encode())
    status, _, body = client.read_response()
    assert status == 413 and orjson.loads(body)["error"] == "payload_too_large"
    client.sock.close()
    # a chunked body is cut off while it is read
    sock = gw.connect()
    sock.sendall((f"POST /events/ingest HTTP/1.1\r\nHost: t\r\nX-VX11-Token: {gw.token}\r\n"
                  "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b" " * (64 * 1024))
    try:
        for _ in range(size // (64 * 1024)):
            sock.sendall(chunk)
    except OSError:
        pass  # the server stopped reading and closed: expected
    client = RawClient(sock)
    status, _, body = client.read_response()
    assert status == 413 and orjson.loads(body)["error"] == "payload_too_large"
    sock.close()
    # and a real 2 MiB JSON body through a plain client
    big = orjson.dumps({"source": "s", "type": "x", "payload": {"blob": "b" * size}})
    try:
        r = gw.request("POST", "/events/ingest", raw=big)
        assert r.status == 413
    except (BrokenPipeError, ConnectionResetError):
        pass  # the 413 went out before the client finished sending; the server closed
    still_serving(gw)


@pytest.mark.parametrize("token,status,code", [(None, 401, "auth_required"), ("wrong-token", 403, "forbidden")])
def test_auth_is_required(shared_gateway, token, status, code):
    gw = shared_gateway
    before = ledger_rows(gw.db)
    body = {"source": "s", "type": "system.alert", "payload": VALID["system.alert"]}
    headers = {"X-VX11-Token": token} if token else {}
    for method, path, data in (("POST", "/events/ingest", body), ("GET", "/debug/events/cardinality", None),
                               ("GET", "/debug/events/correlations", None), ("GET", "/operator/snapshot", None)):
        r = gw.request(method, path, data, headers=headers, token=False)
        assert r.status == status, (path, r.body)
        assert r.json()["error"] == code and r.json()["status_code"] == status
    assert ledger_rows(gw.db) == before
    assert token is None or token not in gw.logs()
    still_serving(gw)


# --- the ledger survives SIGKILL ------------------------------------------------------


def _load(gw, stop: threading.Event, accepted: list, worker: int) -> None:
    """Post events on one keep-alive connection until stopped or the gateway dies."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=15)
    headers = {"X-VX11-Token": gw.token, "Content-Type": "application/json"}
    i = 0
    try:
        while not stop.is_set():
            i += 1
            kind = i % 3
            if kind == 0:
                body = {"source": f"w{worker}", "type": "custom.load", "payload": {"i": i}}
            else:
                body = {"source": f"w{worker}", "type": "system.alert", "broadcast": kind == 1,
                        "payload": dict(VALID["system.alert"], alert_id=f"{worker}-{i}")}
            try:
                conn.request("POST", "/events/ingest", body=orjson.dumps(body), headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException):
                return  # killed under us: whatever was not answered 201 may or may not be stored
            assert resp.status == 201, data
            accepted.append(orjson.loads(data))
    finally:
        conn.close()


@pytest.mark.parametrize("sync", ["normal", "full"])
def test_every_201_survives_sigkill_under_load(gateway_factory, sync):
    gw = gateway_factory({"EDGELINK_LEDGER_SYNC": sync})
    stop = threading.Event()
    accepted: list[dict] = []
    threads = [threading.Thread(target=_load, args=(gw, stop, accepted, w), daemon=True) for w in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 15
    # run for ~2 s, but make sure there is a real load (a busy box may be slow to start)
    time.sleep(2)  # real time: the load runs for a while before the kill
    wait_until(lambda: len(accepted) >= 50, deadline - time.monotonic(), "a real load")
    gw.proc.send_signal(signal.SIGKILL)
    gw.proc.wait(10)
    stop.set()
    for t in threads:
        t.join(20)
        assert not t.is_alive()
    assert len(accepted) >= 50, f"only {len(accepted)} events were accepted before the kill"

    gw2 = gateway_factory({"EDGELINK_DB": str(gw.db), "EDGELINK_LEDGER_SYNC": sync})
    rows = {event_id: (seq, type_, source) for seq, event_id, type_, source, _, _ in ledger_rows(gw.db)}
    missing = [a for a in accepted if a["event_id"] not in rows]
    assert not missing, f"{len(missing)} of {len(accepted)} answered events are lost, e.g. {missing[:3]}"
    for a in accepted:
        assert rows[a["event_id"]] == (a["seq"], a["type"], a["source"])
    # seq keeps increasing after the restart, past everything stored or answered
    highest = max(max(seq for seq, _, _ in rows.values()), max(a["seq"] for a in accepted))
    r = post_event(gw2, "system.alert", VALID["system.alert"], source="after-restart")
    assert r.status == 201 and r.json()["seq"] > highest
    r2 = post_event(gw2, "custom.after", {"k": 1})
    assert r2.status == 201 and r2.json()["seq"] > r.json()["seq"]
    counts = snapshot_counts(gw2)
    assert sum(counts.values()) == len(rows) + 2
    print(f"sync={sync}: {len(accepted)} answered 201 before SIGKILL, {len(rows)} stored")
    still_serving(gw2)


# --- debug views ------------------------------------------------------------------------


def test_cardinality_counts_each_accepted_event_once(gateway):
    r = gateway.get("/debug/events/cardinality")
    assert r.status == 200
    empty = r.json()
    assert empty["status"] == "ok" and empty["total_events"] == 0 and empty["events"] == {}
    assert empty["window_seconds"] == 60 and isinstance(empty["timestamp"], int)

    for i in range(3):
        assert post_event(gateway, "system.alert", dict(VALID["system.alert"], alert_id=f"a{i}"),
                      broadcast=i == 0).status == 201
    assert post_event(gateway, "switch.tension.updated", VALID["switch.tension.updated"]).status == 201
    for _ in range(2):
        assert post_event(gateway, "custom.thing", {"x": 1}, broadcast=True).status == 201
    # rejected ones are not counted
    assert post_event(gateway, "system.alert", {"alert_id": "x"}).status == 422
    assert post_event(gateway, "switch.tension.updated", dict(VALID["switch.tension.updated"], value=True)).status == 422
    assert gateway.post("/events/ingest", {"source": "s", "type": "system.alert", "payload": []}).status == 422
    assert gateway.request("POST", "/events/ingest", raw=b"{nope").status == 400

    body = gateway.get("/debug/events/cardinality").json()
    assert body["total_events"] == 6
    counts = {t: v["count"] for t, v in body["events"].items()}
    assert counts == {"system.alert": 3, "switch.tension.updated": 1, "custom.thing": 2}
    assert body["events"]["system.alert"]["rate_per_min"] == pytest.approx(3.0)
    assert body["timestamp"] >= empty["timestamp"]
    still_serving(gateway)


def test_correlation_graph(gateway):
    empty = gateway.get("/debug/events/correlations").json()
    assert empty["status"] == "ok"
    assert empty["graph"] == {"nodes": [], "edges": [], "total_nodes": 0, "total_edges": 0}

    alert = post_event(gateway, "system.alert", dict(VALID["system.alert"], correlation_id="flow-7")).json()
    decision = post_event(gateway, "madre.decision.explained", dict(VALID["madre.decision.explained"]),
                      metadata={"correlation_id": "flow-7"}).json()
    lone = post_event(gateway, "forensic.snapshot.created", VALID["forensic.snapshot.created"]).json()
    other = post_event(gateway, "shub.action.narrated", dict(VALID["shub.action.narrated"], correlation_id="flow-8")).json()
    post_event(gateway, "custom.not.a.node", {"correlation_id": "flow-7"})
    assert post_event(gateway, "system.alert", {"correlation_id": "flow-7"}).status == 422  # rejected: no node
    meta = post_event(gateway, "system.correlation.updated", {
        "correlation_id": "meta-1", "related_events": [lone["event_id"], "not-an-event", 17], "strength": 0.6,
        "timestamp": TS}).json()

    graph = gateway.get("/debug/events/correlations").json()["graph"]
    nodes = {n["id"]: n for n in graph["nodes"]}
    assert set(nodes) == {alert["event_id"], decision["event_id"], lone["event_id"], other["event_id"],
                          meta["event_id"]}
    assert graph["total_nodes"] == 5
    assert nodes[alert["event_id"]]["type"] == "system.alert"
    assert nodes[alert["event_id"]]["severity"] == "high"
    assert nodes[alert["event_id"]]["nature"] == "incident"
    assert nodes[decision["event_id"]]["nature"] == "decision" and nodes[decision["event_id"]]["severity"] is None
    assert nodes[meta["event_id"]]["nature"] == "meta"
    for n in graph["nodes"]:
        assert set(n) == {"id", "type", "timestamp", "severity", "nature"} and isinstance(n["timestamp"], int)

    edges = {frozenset((e["source"], e["target"])): e["strength"] for e in graph["edges"]}
    assert edges == {
        frozenset((alert["event_id"], decision["event_id"])): 1.0,  # shared correlation_id
        frozenset((meta["event_id"], lone["event_id"])): 0.6,  # related_events, with its strength
    }
    assert graph["total_edges"] == 2
    still_serving(gateway)


def test_snapshot_at_a_time(gateway):
    before = ms_after(int(time.time() * 1000)) - 1
    ids = []
    for i, event_type in enumerate(CANONICAL):
        r = post_event(gateway, event_type, VALID[event_type], source=f"s{i}")
        ids.append(r.json()["event_id"])
    ids.append(post_event(gateway, "custom.snap", {"k": 1}).json()["event_id"])
    for i in range(20):
        ids.append(post_event(gateway, "system.alert", dict(VALID["system.alert"], alert_id=f"x{i}")).json()["event_id"])
    assert post_event(gateway, "system.alert", {}).status == 422

    r = gateway.get(f"/operator/snapshot?t={before}")
    assert r.status == 200
    old = r.json()
    assert old["timestamp"] == before
    assert old["events"] == {"counts_by_type": {}, "other_types": 0, "recent": []}
    assert old["modules"] == {}  # probes are off in the tests: nothing recorded

    expected = {**{t: 1 for t in CANONICAL}, "custom.snap": 1, "system.alert": 21}
    for query in ("", "?t=0", "?t="):
        now_before = int(time.time() * 1000)
        snap = gateway.get(f"/operator/snapshot{query}").json()
        assert now_before <= snap["timestamp"] <= int(time.time() * 1000) + 1, query
        assert snap["events"]["counts_by_type"] == expected, query
        recent = snap["events"]["recent"]
        assert len(recent) == 20
        assert [e["event_id"] for e in recent] == ids[::-1][:20]  # newest first
        for e in recent:
            assert set(e) == {"event_id", "seq", "type", "source", "timestamp", "payload", "metadata"}
        assert recent[0]["payload"] == dict(VALID["system.alert"], alert_id="x19")

    # a time between the events splits them
    mid = recent[10]["timestamp"]
    snap = gateway.get(f"/operator/snapshot?t={mid}").json()
    got = {e["event_id"] for e in snap["events"]["recent"]}
    assert all(e["timestamp"] <= mid for e in snap["events"]["recent"])
    assert not got & {e["event_id"] for e in recent if e["timestamp"] > mid}
    assert recent[10]["event_id"] in got

    for bad in ("abc", "-1", "1.5", "99999999999999999999"):
        r = gateway.get(f"/operator/snapshot?t={bad}")
        assert r.status == 422, bad
        assert r.json()["error"] == "validation_error" and r.json()["detail"][0]["loc"] == ["query", "t"]
    still_serving(gateway)
