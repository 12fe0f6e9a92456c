"""The 80 MB budget under hostile clients and modules (issue 11: sessions, WebSocket replay
and queues, module replies), against the installed ``edgelink serve``.

Each attack class runs against its own gateway, with a few variations, then checks the
process's peak RSS (``VmHWM``: it never goes down, so a spike anywhere on the way counts)
and that a well-behaved client is still served. Run with ``-s`` to see the peaks.
"""

from __future__ import annotations

import asyncio
import http.client
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import pytest
import websockets

from conftest import Gateway, assert_error, module_env
from fakemodule import MANY_CONTAINERS, MANY_STRINGS, FakeModule
from test_ws_events import _stuck_client

BUDGET_MIB = 80
TS = 1_700_000_000_000


def check_budget(gw: Gateway, attack: str) -> None:
    peak = gw.peak_rss_mib()
    print(f"\n{attack}: peak RSS {peak:.1f} MiB")
    assert peak < BUDGET_MIB, f"{attack}: peak RSS {peak:.1f} MiB over the {BUDGET_MIB} MiB budget"


def keepalive_posts(gw: Gateway, path: str, bodies: list[Any]) -> list[tuple[int, Any]]:
    """POST each body on one keep-alive connection; (status, JSON answer) for each."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=60)
    headers = {"X-VX11-Token": gw.token, "Content-Type": "application/json"}
    answers = []
    try:
        for body in bodies:
            conn.request("POST", path, body=orjson.dumps(body), headers=headers)
            resp = conn.getresponse()
            answers.append((resp.status, orjson.loads(resp.read())))
    finally:
        conn.close()
    return answers


def in_parallel(workers: int, task, *args: Any) -> list[Any]:
    with ThreadPoolExecutor(workers) as pool:
        return [f.result() for f in [pool.submit(task, *args) for _ in range(workers)]]


# --- sessions ---------------------------------------------------------------------------


def test_chats_with_huge_or_maximal_strings_stay_within_the_session_budget(gateway_factory) -> None:
    # no module answers: every chat is 503, yet the user's message is recorded first
    gw = gateway_factory(module_env())
    huge = [{"message": "hi", "user_id": "u" * 1_000_000} for _ in range(50)]
    for answers in in_parallel(3, keepalive_posts, gw, "/operator/chat", huge):  # 150 chats
        for status, body in answers:
            assert (status, body["error"]) == (422, "validation_error"), body
    assert gw.get("/vx11/context-7/sessions").json()["total"] == 0

    def maximal(worker: int) -> list[tuple[int, Any]]:
        # each the largest allowed: 32768-char message, 256-char ids, ~900 KB of metadata
        return keepalive_posts(gw, "/operator/chat", [
            {"message": "é" * 32_768, "session_id": f"{worker}-{i}".ljust(256, "s"), "user_id": "ü" * 256,
             "metadata": {"blob": "m" * 900_000}} for i in range(50)])

    with ThreadPoolExecutor(3) as pool:
        for answers in pool.map(maximal, range(3)):
            assert {status for status, _ in answers} == {503}
    # the budget (16 MiB by default) evicted the oldest sessions instead of growing
    assert 0 < gw.get("/vx11/context-7/sessions").json()["total"] < 150
    check_budget(gw, "150 chats with 1 MB user_id, then 150 with maximal strings")
    assert gw.get("/health", token=False).status == 200
    assert gw.post("/operator/chat", {"message": "well behaved"}).status == 503  # answered, not hung


# --- WebSocket replay, queues and metadata -------------------------------------------------


def max_size_event(worker: int, i: int) -> dict[str, Any]:
    """A canonical broadcast event at both bounds: 3 KiB payload, 4 KiB metadata."""
    payload = {"decision_id": f"{worker}-{i}", "summary": "", "confidence": 0.5, "timestamp": TS}
    payload["summary"] = "s" * (3072 - len(orjson.dumps(payload)))
    metadata = {"note": ""}
    metadata["note"] = "n" * (4096 - len(orjson.dumps(metadata)))
    return {"source": "madre", "type": "madre.decision.explained", "payload": payload, "broadcast": True,
            "metadata": metadata}


def store_max_size_events(gw: Gateway, count: int, workers: int = 4) -> None:
    def store(worker: int) -> None:
        answers = keepalive_posts(gw, "/events/ingest", [max_size_event(worker, i) for i in range(count // workers)])
        assert {status for status, _ in answers} == {201}, answers[:1]
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(store, range(workers)))


async def read_replay(gw: Gateway, count: int) -> list[int]:
    """A well-behaved client replaying from 0: the seqs of the ``count`` frames it gets."""
    async with websockets.connect(f"ws://127.0.0.1:{gw.port}/ws?token={gw.token}&since_seq=0",
                                  max_queue=None) as ws:
        first = orjson.loads(await asyncio.wait_for(ws.recv(), 20))
        assert first["type"] == "connected" and first["replayed"] == count, first
        return [orjson.loads(await asyncio.wait_for(ws.recv(), 20))["seq"] for _ in range(count)]


def test_a_hundred_replaying_clients_that_do_not_read(gateway_factory) -> None:
    gw = gateway_factory({"EDGELINK_LEDGER_SYNC": "normal"})
    store_max_size_events(gw, 1000)

    with ThreadPoolExecutor(10) as pool:
        stuck = list(pool.map(lambda i: _stuck_client(gw, f"client_id=stuck{i}&since_seq=0"), range(100)))
    # let every replay run as far as the clients' sockets take it
    threading.Event().wait(3)
    seqs = asyncio.run(asyncio.wait_for(read_replay(gw, 1000), 60))
    assert seqs == list(range(1, 1001))
    check_budget(gw, "1,000 max-size events, 100 since_seq=0 clients that do not read")
    for sock in stuck:
        sock.close()
    assert gw.get("/health", token=False).status == 200


def test_live_clients_that_stop_reading_while_events_are_broadcast(gateway_factory) -> None:
    # each stuck client's send queue (1 MiB, frames shared by all) fills, its transport holds
    # up to its high-water mark, and then it is closed 1013; the readers get everything
    gw = gateway_factory({"EDGELINK_LEDGER_SYNC": "normal"})
    with ThreadPoolExecutor(10) as pool:
        stuck = list(pool.map(lambda i: _stuck_client(gw, f"client_id=live{i}"), range(500)))

    async def reader_and_posts() -> list[int]:
        async with websockets.connect(f"ws://127.0.0.1:{gw.port}/ws?token={gw.token}", max_queue=None) as ws:
            assert orjson.loads(await asyncio.wait_for(ws.recv(), 20))["type"] == "connected"
            await asyncio.to_thread(store_max_size_events, gw, 400)  # 400 frames of ~7.5 KiB: 3 MiB
            return [orjson.loads(await asyncio.wait_for(ws.recv(), 20))["seq"] for _ in range(400)]

    assert asyncio.run(asyncio.wait_for(reader_and_posts(), 120)) == list(range(1, 401))
    check_budget(gw, "500 live clients that stop reading, 3 MiB of broadcast frames each")
    metrics = gw.get("/metrics", token=False).body.decode()
    assert 'edgelink_budget_refusals_total{budget="ws_queue"} 500' in metrics
    for sock in stuck:
        sock.close()
    assert gw.get("/health", token=False).status == 200


def test_big_metadata_events_and_replaying_clients(gateway_factory) -> None:
    gw = gateway_factory({"EDGELINK_LEDGER_SYNC": "normal"})
    event = max_size_event(0, 0)
    for kind in ("madre.decision.explained", "custom.thing"):  # canonical and not
        big = [dict(event, type=kind, metadata={"blob": "m" * 1_000_000}) for _ in range(50)]
        for answers in in_parallel(3, keepalive_posts, gw, "/events/ingest", big):  # 150 events
            for status, body in answers:
                assert (status, body["error"]) == (422, "validation_error"), body
    store_max_size_events(gw, 400)

    async def three_replayers() -> list[list[int]]:
        return await asyncio.gather(*(read_replay(gw, 400) for _ in range(3)))
    for seqs in asyncio.run(asyncio.wait_for(three_replayers(), 60)):
        assert seqs == list(range(1, 401))
    check_budget(gw, "300 events with 1 MB metadata, then 3 replaying clients of 400 max-size events")
    assert gw.get("/health", token=False).status == 200


# --- module replies ---------------------------------------------------------------------


@pytest.fixture(params=[MANY_CONTAINERS, MANY_STRINGS])  # [[],[],...] and ["","",...]
def costly_module(fake, request) -> FakeModule:
    module = fake("costly")
    module.behave(None, request.param)
    return module


def test_modules_answering_8_mib_too_costly_to_parse(costly_module, gateway_factory) -> None:
    gw = gateway_factory(module_env({"switch": costly_module, "hermes": costly_module,
                                     "hormiguero": costly_module},
                                    EDGELINK_BREAKER_FAILURES="1000"))
    calls = [("POST", "/vx11/intent/code"), ("GET", "/resources"), ("GET", "/hormiguero/queen/status")]

    def caller(index: int) -> None:
        method, path = calls[index]
        for _ in range(3):
            reply = gw.request(method, path, {"message": "hi"} if method == "POST" else None, timeout=60)
            body = assert_error(reply, 502, "upstream_unavailable")
            assert "containers and separators" in body["detail"], body
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(caller, range(3)))
    metrics = gw.get("/metrics", token=False).body.decode()
    assert 'edgelink_budget_refusals_total{budget="module_reply"} 9' in metrics
    check_budget(gw, "3 callers x 3 intents/proxies answered with 8 MiB of empty lists or strings")
    costly_module.behave(None, "healthy")
    costly_module.reply("/hermes/resources", {"cpu": 0.5})
    reply = gw.get("/resources")
    assert reply.status == 200 and reply.json() == {"cpu": 0.5}
