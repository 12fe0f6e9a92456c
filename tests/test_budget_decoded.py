"""What bytes cost once decoded or stored (issue 20: findings 2, 3 and 5), against the
installed ``edgelink serve``: client JSON whose structure costs far more than its size,
WebSocket messages that inflate far past the frame limit, and stored session text counted
in bytes. Each attack checks the process's peak RSS (``VmHWM``) and that a well-behaved
client is still served. Run with ``-s`` to see the peaks.
"""

from __future__ import annotations

import asyncio
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import orjson
import pytest
import websockets

from conftest import module_env
from test_budget_clients import check_budget, in_parallel, keepalive_posts
from test_streaming import StreamClient, StreamPlan, events, switch  # noqa: F401 (switch: a fixture)
from test_ws_events import _drain, _stuck_client

MIB = 1024 * 1024
WS_LIMIT = 64 * 1024
BODY = 1024 * 1024 - 512  # room for the envelope under the 1 MiB body limit


# --- client JSON that costs far more decoded than its size (finding 2) ---------------------


def empty_lists(size: int) -> list:
    return [[] for _ in range(size // 3)]  # "[]," each: ~22x decoded


def tiny_keys(size: int) -> list:
    return [{"a": 0} for _ in range(size // 8)]  # '{"a":0},' each: ~24x decoded


@pytest.mark.parametrize("shape", [empty_lists, tiny_keys])
def test_client_json_too_costly_to_decode_is_refused_413_before_decoding(gateway_factory, shape) -> None:
    gw = gateway_factory(module_env())
    costly = shape(BODY)
    bodies = {
        "/events/ingest": {"source": "s", "type": "custom.costly", "payload": {"x": costly}},
        "/operator/chat": {"message": "hi", "metadata": {"x": costly}},
        "/vx11/intent/code": {"x": costly},
    }

    def client(i: int) -> list[tuple[int, dict]]:  # each of 8 clients posts to each route, keep-alive
        path = list(bodies)[i % 3]
        return keepalive_posts(gw, path, [bodies[path]] * 3)

    with ThreadPoolExecutor(8) as pool:
        answers = [a for result in pool.map(client, range(8)) for a in result]
    for status, body in answers:
        assert (status, body["error"]) == (413, "payload_too_large"), body
        assert "once decoded" in body["detail"], body
    check_budget(gw, f"8 clients posting 1 MiB of {shape.__name__}")
    metrics = gw.get("/metrics", token=False).body.decode()
    assert 'edgelink_budget_refusals_total{budget="json_cost"} 24' in metrics
    assert gw.get("/vx11/context-7/sessions").json()["total"] == 0  # refused before anything was kept
    # the same structure, small, is fine: only the cost decides
    small = gw.post("/events/ingest", {"source": "s", "type": "custom.small", "payload": {"x": shape(1500)}})
    assert small.status == 201, small.body


def test_a_websocket_frame_too_costly_to_decode_gets_an_error_frame(gateway) -> None:
    async def go() -> list[dict]:
        async with websockets.connect(f"ws://127.0.0.1:{gateway.port}/ws?token={gateway.token}") as ws:
            assert orjson.loads(await ws.recv())["type"] == "connected"
            await ws.send(orjson.dumps(empty_lists(WS_LIMIT - 100)).decode())
            refused = orjson.loads(await asyncio.wait_for(ws.recv(), 20))
            await ws.send('{"still": "connected"}')
            return [refused, orjson.loads(await asyncio.wait_for(ws.recv(), 20))]
    refused, echo = asyncio.run(go())
    assert refused["type"] == "error" and refused["error"] == "payload_too_large", refused
    assert "once decoded" in refused["detail"]
    assert echo == {"still": "connected"}
    assert 'edgelink_budget_refusals_total{budget="json_cost"} 1' in gateway.get("/metrics").body.decode()


def log_rows(n: int) -> dict:
    """Metadata that is cheap enough to be accepted (~4x decoded) and about ``n`` bytes."""
    return {"rows": [{"id": i, "message": f"log line {i:08} with some text", "level": "info"}
                     for i in range(n // 76)]}


def test_reading_a_session_holding_15_mib_of_metadata_never_decodes_it(gateway_factory) -> None:
    gw = gateway_factory(module_env())  # no module answers: each chat is 503, its message recorded
    metadata = log_rows(BODY - 200)
    answers = keepalive_posts(gw, "/operator/chat", [{"message": "hi", "session_id": "big", "metadata": metadata}
                                                     for _ in range(16)])
    assert {status for status, _ in answers} == {503}
    before = gw.peak_rss_mib()
    sizes = in_parallel(3, lambda: len(gw.get("/operator/session/big", timeout=120).body))
    print(f"\nsession answers of {sizes[0]} bytes; peak RSS {before:.1f} MiB before reading it")
    assert all(14 * MIB < size < 17 * MIB for size in sizes), sizes  # ~the session's own byte bound
    check_budget(gw, "3 reads of a session holding 15 MiB of metadata")
    view = gw.get("/operator/session/big").json()
    assert view["messages"][-1]["metadata"] == metadata


# --- stored text counted in bytes (finding 5) ---------------------------------------------------


def emoji_deltas(count: int, per_delta: int = 16) -> list[bytes]:
    """SSE chunks of ``count`` deltas of ``per_delta`` emoji each (4 bytes each in UTF-8)."""
    line = b"data: %s\n\n" % orjson.dumps({"text": "\N{GRINNING FACE}" * per_delta})
    return [line * 1000 for _ in range(count // 1000)]


def test_streamed_chats_of_emoji_text_are_kept_within_the_session_bound_in_bytes(
        switch, gateway_factory) -> None:  # noqa: F811 (the fixture imported above)
    # 500,000 deltas of 16 emoji: 8 million characters, 32 MB of UTF-8 per chat
    switch.reply("/switch/stream", StreamPlan(emoji_deltas(500_000)))
    gw = gateway_factory(module_env({"switch": switch}))

    def chat(i: int) -> tuple[str, int]:
        client = StreamClient(gw.port)
        client.sock.settimeout(120)
        client.send("POST", "/operator/chat", {"message": "hi", "stream": True, "session_id": f"emoji{i}"},
                    gw.token)
        assert client.head()[0] == 200
        got, done_event, previous = 0, None, b""
        while (chunk := client.chunk()) is not None:  # kept: only the done event, from its start
            got += len(chunk)
            if done_event is not None:
                done_event += chunk
            elif (at := (previous[-16:] + chunk).find(b"event: done")) >= 0:
                done_event = bytearray((previous[-16:] + chunk)[at:])
            previous = chunk
        client.close()
        assert done_event is not None
        return events(bytes(done_event))[-1], got

    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(chat, range(3)))
    check_budget(gw, "3 streamed chats of 8 million emoji each")
    for (event, done), got in answers:
        assert got > 32 * MIB  # every delta relayed
        assert event == "done" and done["truncated"] is True  # what is kept is the start of what was relayed
        assert set(done["response"]) == {"\N{GRINNING FACE}"} and 0 < len(done["response"].encode()) <= 8 * MIB
    sessions = gw.get("/vx11/context-7/sessions").json()["sessions"]
    stored = 0
    for entry in sessions:
        view = gw.get(f"/operator/session/{entry['session_id']}", timeout=60).json()
        stored += sum(len(m["content"].encode()) for m in view["messages"])
    assert 0 < stored <= 16 * MIB, stored  # EDGELINK_CONTEXT7_MAX_BYTES, counted in bytes
    print(f"\nafter: RSS {gw.status_kib('VmRSS') / 1024:.1f} MiB, {stored} bytes of session text kept")


# --- WebSocket permessage-deflate (finding 3) ----------------------------------------------


def deflated(size: int) -> bytes:
    """A permessage-deflate payload (RFC 7692) that inflates to ``size`` bytes of spaces."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = b" " * MIB
    parts = [compressor.compress(chunk) for _ in range(size // MIB)]
    parts.append(compressor.flush(zlib.Z_SYNC_FLUSH))
    return b"".join(parts)[:-4]  # without the 00 00 ff ff the receiver adds back


def compressed_text_frame(payload: bytes) -> bytes:
    """One final text frame with RSV1 (compressed), masked with the all-zero key."""
    return struct.pack("!BBQ", 0xC1, 0x80 | 127, len(payload)) + b"\0\0\0\0" + payload


def test_a_small_frame_inflating_to_200_mib_closes_1009_without_holding_it(gateway_factory) -> None:
    gw = gateway_factory({"EDGELINK_WS_COMPRESSION": "true"})
    frame = compressed_text_frame(deflated(200 * MIB))  # ~200 KB on the wire

    def attack(i: int) -> list[tuple[int, bytes]]:
        sock = _stuck_client(gw, f"client_id=bomb{i}", "Sec-WebSocket-Extensions: permessage-deflate\r\n")
        try:
            sock.sendall(frame)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed before it was all sent: what matters is how
        closed, frames = _drain(sock, 20)
        sock.close()
        assert closed
        return frames

    with ThreadPoolExecutor(3) as pool:
        for frames in pool.map(attack, range(3)):
            closes = [payload for opcode, payload in frames if opcode == 8]
            assert closes and struct.unpack("!H", closes[0][:2])[0] == 1009, frames
    check_budget(gw, "3 WebSocket frames of ~200 KB deflating to 200 MiB each")

    async def well_behaved() -> None:  # a message just under the limit still inflates whole
        message = orjson.dumps({"echo": "z" * (WS_LIMIT - 100)}).decode()
        async with websockets.connect(f"ws://127.0.0.1:{gw.port}/ws?token={gw.token}",
                                      compression="deflate") as ws:
            assert orjson.loads(await ws.recv())["type"] == "connected"
            await ws.send(message)
            assert await asyncio.wait_for(ws.recv(), 20) == message
    asyncio.run(well_behaved())
    assert gw.get("/health", token=False).status == 200


def test_the_websocket_message_limit_counts_bytes_not_characters(gateway) -> None:
    async def go() -> int | None:
        async with websockets.connect(f"ws://127.0.0.1:{gateway.port}/ws?token={gateway.token}",
                                      max_size=None) as ws:
            assert orjson.loads(await ws.recv())["type"] == "connected"
            await ws.send("\N{GRINNING FACE}" * 20_000)  # 20,000 characters, 80,000 bytes
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 20)
            except websockets.ConnectionClosed:
                return ws.close_code
    assert asyncio.run(go()) == 1009


# --- the copy of a client's JSON sent on to its module ------------------------------------------


def test_the_body_sent_on_to_a_module_is_held_in_the_account_while_the_call_waits(gateway_factory, fake) -> None:
    # A client's JSON is decoded, then encoded again for its module and held until the module
    # answers: the account counts that copy too (piece json_decoded), and gives it back after.
    import threading

    from conftest import metric, wait_until
    from edgelink.jsonbounds import checked_cost
    from fakemodule import HEALTHY

    module = fake("switch")
    module.behave("/switch/route-v5", HEALTHY, delay=3)
    gw = gateway_factory(module_env({"switch": module}))
    body = {"prompt": "p" * 500_000}
    sent = orjson.dumps(body)
    answered: list[int] = []
    call = threading.Thread(target=lambda: answered.append(gw.post("/vx11/intent/code", body).status))
    call.start()
    # once the module has the call, the decoded body and its copy are held
    wait_until(lambda: module.requests, why="the call at the module")
    held = metric(gw, 'edgelink_budget_bytes{piece="json_decoded"}')
    call.join(15)
    assert answered == [200]
    assert held >= checked_cost(sent) + len(sent), (held, checked_cost(sent), len(sent))
    assert metric(gw, 'edgelink_budget_bytes{piece="json_decoded"}') == 0
