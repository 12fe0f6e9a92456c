"""The WebSocket transport over real sockets, driven with the `websockets` client library."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import time
from urllib.parse import quote

import orjson
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import RawClient, log_records, start_gateway, wait_for_log, ws_url


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def connected(gw, query: str = "", **kw):
    ws = await websockets.connect(ws_url(gw, query), additional_headers={"X-VX11-Token": gw.token}, **kw)
    first = orjson.loads(await ws.recv())
    assert first["channel"] == "control" and first["type"] == "connected"
    return ws, first


def test_connect_with_header_or_query_token(shared_gateway):
    async def go():
        ws, first = await connected(shared_gateway, "client_id=alpha")
        epoch = first.pop("epoch")
        assert len(epoch) == 32 and int(epoch, 16) >= 0
        assert first == {"channel": "control", "type": "connected", "client_id": "alpha",
                         "last_seq": 0, "replayed": 0, "truncated": False}
        await ws.close()
        async with websockets.connect(ws_url(shared_gateway, f"token={shared_gateway.token}")) as ws2:
            assert orjson.loads(await ws2.recv())["type"] == "connected"
    run(go())


@pytest.mark.parametrize("token,status", [(None, 401), ("wrong", 403)])
def test_handshake_refused_without_or_with_wrong_token(shared_gateway, token, status):
    async def go():
        query = f"token={token}" if token else ""
        with pytest.raises(InvalidStatus) as info:
            await websockets.connect(ws_url(shared_gateway, query))
        assert info.value.response.status_code == status
        body = orjson.loads(info.value.response.body)
        assert body["status_code"] == status
    run(go())


def _handshake(gw, headers: dict[str, str], path: str = "/ws") -> tuple[int, dict[str, str], bytes]:
    client = RawClient(gw.connect())
    lines = [f"GET {path} HTTP/1.1", "Host: t"] + [f"{k}: {v}" for k, v in headers.items()]
    client.send(("\r\n".join(lines) + "\r\n\r\n").encode())
    return client.read_response()


def test_invalid_handshakes_get_http_errors(shared_gateway):
    good = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(), "X-VX11-Token": shared_gateway.token}
    status, headers, body = _handshake(shared_gateway, {**good, "Sec-WebSocket-Version": "8"})
    assert status == 426 and headers["sec-websocket-version"] == "13"
    status, _, body = _handshake(shared_gateway, {**good, "Sec-WebSocket-Key": "short"})
    assert status == 400 and orjson.loads(body)["error"] == "bad_request"
    status, _, _ = _handshake(shared_gateway, {k: v for k, v in good.items() if k != "Connection"})
    assert status == 400
    status, _, _ = _handshake(shared_gateway, good, path="/nowhere")
    assert status == 404
    status, headers, _ = _handshake(shared_gateway, good)
    assert status == 101 and headers["upgrade"].lower() == "websocket"


def test_plain_get_on_ws_endpoint_is_426(shared_gateway):
    assert shared_gateway.get("/ws").status == 426


def test_echo_invalid_json_and_binary(shared_gateway):
    async def go():
        ws, _ = await connected(shared_gateway)
        await ws.send('{"hello": "world"}')
        assert orjson.loads(await ws.recv()) == {"hello": "world"}
        await ws.send("not json {")
        assert orjson.loads(await ws.recv()) == {"channel": "control", "type": "error", "error": "invalid_json"}
        await ws.send(b"\x00\x01binary")
        assert orjson.loads(await ws.recv())["type"] == "error"
        await ws.send('{"still": "connected"}')
        assert orjson.loads(await ws.recv()) == {"still": "connected"}
        await ws.close()
    run(go())


def test_frame_over_limit_closes_1009(shared_gateway):
    async def go():
        ws, _ = await connected(shared_gateway, max_size=None)
        await ws.send("x" * (100 * 1024))
        with pytest.raises(ConnectionClosed):
            while True:
                await ws.recv()
        assert ws.close_code == 1009
        # others are still served
        ws2, _ = await connected(shared_gateway)
        await ws2.close()
    run(go())


def test_fragmented_message_over_limit_closes_1009(shared_gateway):
    async def go():
        ws, _ = await connected(shared_gateway)
        await ws.send(("y" * 20_000 for _ in range(5)))  # 100 kB in five fragments
        with pytest.raises(ConnectionClosed):
            while True:
                await ws.recv()
        assert ws.close_code == 1009
    run(go())


def test_client_close_handshake(shared_gateway):
    async def go():
        ws, _ = await connected(shared_gateway)
        await ws.close(1000, "bye")
        assert ws.close_code == 1000
    run(go())


def test_server_pings_and_closes_a_client_that_never_pongs(gateway_factory):
    gw = gateway_factory({"EDGELINK_WS_PING_INTERVAL": "0.3"})

    async def go():
        # A responsive client survives several ping periods.
        ok, _ = await connected(gw)
        await asyncio.sleep(1.5)  # real time: five ping periods pass
        await ok.send('{"alive": true}')
        assert orjson.loads(await ok.recv()) == {"alive": True}
        await ok.close()
        # A raw client that never answers pings is closed by the server.
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET /ws?token={gw.token} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        started = time.monotonic()
        data = b""
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            if not chunk:
                break
            data += chunk
            # a close frame: opcode 0x8
            if b"\x88" in data.split(b"\r\n\r\n", 1)[-1]:
                break
        assert b"\x89" in data  # at least one ping (opcode 0x9) was sent first
        assert time.monotonic() - started < 10
        writer.close()
    run(go())


def test_sigterm_closes_websockets_with_1001_and_exits_zero(gateway):
    async def go():
        ws, _ = await connected(gateway)
        gateway.proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        assert ws.close_code == 1001
    run(go())
    assert gateway.proc.wait(20) == 0


def test_origin_checked_when_cors_configured(gateway_factory):
    gw = gateway_factory({"EDGELINK_CORS_ORIGINS": "https://ui.example"})

    async def go():
        with pytest.raises(InvalidStatus) as info:
            await websockets.connect(ws_url(gw, f"token={gw.token}"), origin="https://evil.example")
        assert info.value.response.status_code == 403
        async with websockets.connect(ws_url(gw, f"token={gw.token}"), origin="https://ui.example") as ws:
            assert orjson.loads(await ws.recv())["type"] == "connected"
    run(go())


def test_invalid_since_seq_is_reported_and_closed(shared_gateway):
    async def go():
        async with websockets.connect(ws_url(shared_gateway, f"token={shared_gateway.token}&since_seq=abc")) as ws:
            msg = orjson.loads(await ws.recv())
            assert msg["error"] == "invalid_since_seq"
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1008
    run(go())


def test_refused_handshake_carries_the_correlation_id_header(shared_gateway):
    status, headers, body = _handshake(shared_gateway, {
        "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(), "X-Correlation-ID": "ws-cid-1"})
    assert status == 401
    assert headers["x-correlation-id"] == "ws-cid-1" and orjson.loads(body)["correlation_id"] == "ws-cid-1"


@pytest.mark.parametrize("enabled", [False, True])
def test_permessage_deflate_only_when_enabled(gateway_factory, enabled):
    gw = gateway_factory({"EDGELINK_WS_COMPRESSION": "true" if enabled else "false"})

    async def go():
        async with websockets.connect(ws_url(gw, f"token={gw.token}"), compression="deflate") as ws:
            negotiated = ws.response.headers.get("Sec-WebSocket-Extensions", "")
            assert ("permessage-deflate" in negotiated) is enabled
            assert orjson.loads(await ws.recv())["type"] == "connected"
            await ws.send('{"echo": "' + "z" * 2000 + '"}')
            assert orjson.loads(await ws.recv()) == {"echo": "z" * 2000}
            # shared broadcast frames, small and large, live and replayed, either way
            alerts = [{"alert_id": "a", "severity": "info", "message": "m" * n, "timestamp": 1} for n in (10, 1900)]
            for alert in alerts:
                assert gw.post("/events/ingest", {"source": "s", "type": "system.alert", "payload": alert,
                                                  "broadcast": True}).status == 201
                assert orjson.loads(await ws.recv())["payload"] == alert
        async with websockets.connect(ws_url(gw, f"token={gw.token}&since_seq=0"), compression="deflate") as ws:
            assert orjson.loads(await ws.recv())["replayed"] == 2
            assert [orjson.loads(await ws.recv())["payload"] for _ in alerts] == alerts
    run(go())


@pytest.mark.parametrize("since", ["99999999999999999999", str(2**63), "1_0", "\u0661\u0662", "-1", "+5", " 5",
                                   "0x10", "1.0"])
def test_since_seq_that_is_not_ascii_digits_or_beyond_2_63_closes_1008(shared_gateway, since):
    async def go():
        url = ws_url(shared_gateway, f"token={shared_gateway.token}&since_seq={quote(since)}")
        async with websockets.connect(url) as ws:
            msg = orjson.loads(await ws.recv())
            assert msg["error"] == "invalid_since_seq", msg
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1008
    run(go())


def test_since_seq_up_to_2_63_minus_1_is_accepted(gateway):
    async def go():
        async with websockets.connect(ws_url(gateway, f"token={gateway.token}&since_seq={2**63 - 1}")) as ws:
            msg = orjson.loads(await ws.recv())
            # beyond last_seq: another ledger's seq, replayed from the oldest (none stored here)
            assert (msg["type"], msg["replayed"], msg["truncated"]) == ("connected", 0, True)
            await ws.send('{"ping": 1}')
            assert orjson.loads(await ws.recv()) == {"ping": 1}
    run(go())
    assert "websocket_failed" not in gateway.logs()


def test_reload_that_changes_the_token_closes_old_clients_1008(tmp_path):
    envfile = tmp_path / "edgelink.env"
    envfile.write_text("VX11_GATEWAY_TOKEN=first-token\n")
    gw = start_gateway(tmp_path, {"EDGELINK_ENV_FILE": str(envfile)})

    async def go():
        old = await websockets.connect(ws_url(gw, "token=first-token&client_id=old"))
        assert orjson.loads(await old.recv())["type"] == "connected"
        envfile.write_text("VX11_GATEWAY_TOKEN=second-token\n")
        seen = len(log_records(gw.log_path))
        gw.proc.send_signal(signal.SIGHUP)
        await asyncio.to_thread(wait_for_log, gw.log_path, "reloaded", gw.proc, 10, seen)
        with pytest.raises(ConnectionClosed):
            while True:  # it may still get what was in flight, never anything after the close
                await asyncio.wait_for(old.recv(), 10)
        assert old.close_code == 1008
        new = await websockets.connect(ws_url(gw, "token=second-token&client_id=new"))
        assert orjson.loads(await new.recv())["type"] == "connected"
        # a reload that keeps the token keeps its clients
        seen = len(log_records(gw.log_path))
        gw.proc.send_signal(signal.SIGHUP)
        await asyncio.to_thread(wait_for_log, gw.log_path, "reloaded", gw.proc, 10, seen)
        await new.send('{"still": "here"}')
        assert orjson.loads(await asyncio.wait_for(new.recv(), 10)) == {"still": "here"}
        await new.close()
    try:
        run(go())
    finally:
        gw.stop()


def test_wsproto_is_imported_at_the_first_upgrade_not_at_start() -> None:
    # about 15 ms and a few hundred KiB of every start-up, for gateways no WebSocket reaches
    code = ("import sys, edgelink.serve, edgelink.app, edgelink.hub, edgelink.api.ws; "
            "bad = [m for m in sys.modules if m.split('.')[0] == 'wsproto' or m == 'edgelink.http.websocket']; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_upgrade_hands_the_uvloop_socket_over_to_the_websocket_protocol():
    """``transport.set_protocol`` on uvloop's own transport, over a real socket: after the
    101 the socket's events go to the WebSocket protocol, which answers the frames."""
    import uvloop
    from memtransport import App

    from edgelink.config import Settings
    from edgelink.http.server import HttpServer
    from edgelink.http.upgrade import WebSocketProtocol

    async def go() -> None:
        app = App()
        server = HttpServer(app, Settings())
        await server.start("127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws") as ws:
            await ws.send("hello")
            assert await ws.recv() == "echo:hello"
            [conn] = server.connections
            assert isinstance(conn, WebSocketProtocol)
            assert type(conn.transport).__module__.startswith("uvloop")
            assert conn.transport.get_protocol() is conn
            await ws.send("again")
            assert await ws.recv() == "echo:again"
        await server.shutdown(5)
        assert app.ws_messages == ["hello", "again"]

    uvloop.run(asyncio.wait_for(go(), 60))
