"""GET /debug/events/timeline: stored events in a time range or of one correlation id, what the
console's timeline reads (API.md §10); bounded in count, in rows scanned and in bytes."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from conftest import Gateway, assert_error, ms_after, post_event
from edgelink.api.events import TIMELINE_MAX_BYTES

TS = 1_700_000_000_000


def store(gw: Gateway, source: str, event_type: str, payload: dict[str, Any],
          metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """An event ingested and stored (201): its answer."""
    reply = post_event(gw, event_type, payload, source, metadata=metadata)
    assert reply.status == 201, reply.body
    return reply.json()


def alert(n: int, **extra: Any) -> dict[str, Any]:
    return {"alert_id": f"a-{n}", "severity": "low", "message": f"m{n}", "timestamp": TS + n, **extra}


def timeline(gw: Gateway, query: str = "") -> dict[str, Any]:
    reply = gw.get(f"/debug/events/timeline{query}")
    assert reply.status == 200, reply.body
    return reply.json()


def test_a_time_range_oldest_first_and_its_limit(gateway: Gateway) -> None:
    before = int(time.time() * 1000)
    sent = [store(gateway, "madre", "system.alert", alert(n)) for n in range(5)]
    after = int(time.time() * 1000)
    body = timeline(gateway)
    assert set(body) == {"status", "since", "until", "correlation_id", "events", "truncated"}
    assert body["since"] == 0 and before <= body["until"] and body["correlation_id"] is None
    assert [e["event_id"] for e in body["events"]] == [s["event_id"] for s in sent]
    assert body["truncated"] is False
    first = body["events"][0]
    assert set(first) == {"event_id", "seq", "type", "source", "timestamp", "payload", "metadata"}
    assert first["payload"]["timestamp"] == TS and before <= first["timestamp"] <= after

    newest = timeline(gateway, "?limit=2")
    assert [e["event_id"] for e in newest["events"]] == [s["event_id"] for s in sent[3:]]
    assert newest["truncated"] is True
    stamps = [e["timestamp"] for e in body["events"]]
    ranged = timeline(gateway, f"?since={stamps[1]}&until={stamps[3]}")["events"]
    assert {e["event_id"] for e in ranged} >= {s["event_id"] for s in sent[1:4]}
    assert all(stamps[1] <= e["timestamp"] <= stamps[3] for e in ranged)
    assert timeline(gateway, f"?until={before - 1}")["events"] == []


def test_one_correlation_id_from_payload_or_metadata(gateway: Gateway) -> None:
    flow = {"correlation_id": "flow-7"}
    in_payload = store(gateway, "hormiguero", "system.correlation.updated",
                        {"correlation_id": "flow-7", "related_events": [], "strength": 1, "timestamp": TS})
    in_metadata = store(gateway, "madre", "system.alert", alert(1), metadata=flow)
    free_form = store(gateway, "sensor", "sensor.reading", {"value": 3}, metadata=flow)
    store(gateway, "madre", "system.alert", alert(2), metadata={"correlation_id": "flow-70"})  # not it
    store(gateway, "madre", "system.alert", alert(3, note="flow-7"))  # the words, not the id
    store(gateway, "madre", "system.alert", alert(4))
    body = timeline(gateway, "?correlation_id=flow-7")
    assert body["correlation_id"] == "flow-7"
    assert [e["event_id"] for e in body["events"]] == [e["event_id"] for e in (in_payload, in_metadata, free_form)]
    assert timeline(gateway, "?correlation_id=nothing-has-it")["events"] == []


def test_the_answer_is_bounded_in_bytes(gateway_factory: Any) -> None:
    gw = gateway_factory({"EDGELINK_LEDGER_SYNC": "normal"})
    store(gw, "madre", "blob.stored", {"n": -1, "data": "y" * 20_000})  # over 8 KiB: not even read
    huge_until = ms_after(int(time.time() * 1000))  # later than the huge event
    ms_after(huge_until)  # the events from now on are later still
    big = "x" * 7000  # 60 of them are over 256 KiB: the newest that fit come back
    for n in range(60):
        store(gw, "madre", "blob.stored", {"n": n, "data": big})
    reply = gw.get("/debug/events/timeline?limit=1000")
    body = orjson.loads(reply.body)
    assert len(reply.body) <= TIMELINE_MAX_BYTES and body["truncated"] is True
    ns = [e["payload"]["n"] for e in body["events"]]
    assert 30 < len(ns) < 60 and ns == list(range(60 - len(ns), 60))
    huge = timeline(gw, f"?until={huge_until}")["events"]
    assert len(huge) == 1
    assert huge[0]["payload"]["truncated"] is True and huge[0]["payload"]["bytes"] > 20_000

    # long names cost bytes no summary saves: the oldest events give way
    long_name = "s" * 256
    for n in range(700):
        store(gw, long_name, "t" * 256, {"n": n})
    reply = gw.get("/debug/events/timeline?limit=1000")
    body = orjson.loads(reply.body)
    assert len(reply.body) <= TIMELINE_MAX_BYTES and body["truncated"] is True
    assert body["events"][-1]["payload"] == {"n": 699}  # the newest are kept


@pytest.mark.parametrize("query", ["?limit=0", "?limit=1001", "?since=x", "?until=-1", "?since=10&until=5",
                                   f"?correlation_id={'c' * 129}", "?correlation_id=a%20b",
                                   "?correlation_id=%C3%A9"])
def test_bad_queries_are_422(shared_gateway: Gateway, query: str) -> None:
    assert_error(shared_gateway.get(f"/debug/events/timeline{query}"), 422, "validation_error")


def test_auth(shared_gateway: Gateway) -> None:
    assert_error(shared_gateway.get("/debug/events/timeline", token=False), 401, "auth_required")
    assert_error(shared_gateway.get("/debug/events/timeline", headers={"X-VX11-Token": "wrong"}), 403, "forbidden")


def test_a_ledger_of_large_events_costs_the_answer_its_bound_only(gateway_factory: Any) -> None:
    """Peak RSS of the real process: 1,000 stored events of 7.5 KiB (each under the 8 KiB a field
    is summarised past) are not all read and decoded to answer ``limit=1000``."""
    gw = gateway_factory({"EDGELINK_LEDGER_SYNC": "normal"})
    data = "z" * 7500
    for n in range(1000):
        store(gw, "madre", "blob.stored", {"n": n, "data": data})
    timeline(gw, "?limit=1")  # the code paths warm
    before = gw.peak_rss_mib()
    for _ in range(5):
        body = timeline(gw, "?limit=1000")
        assert body["truncated"] is True and body["events"][-1]["payload"]["n"] == 999
    grown = gw.peak_rss_mib() - before
    print(f"peak RSS {before:.1f} MiB, +{grown:.2f} MiB answering limit=1000 five times")
    assert grown < 3
