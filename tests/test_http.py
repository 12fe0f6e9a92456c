"""The HTTP transport over real sockets: framing, keep-alive, limits and bad input.

Every bad-input test ends by checking that the gateway still serves another client and
that the refusal was logged once.
"""

from __future__ import annotations

import os
import random
import select
import signal
import socket
import subprocess
import time
import uuid

import orjson
import pytest

from conftest import EDGELINK, RawClient, health_ok, recv_all, trickle, wait_until

GET_HEALTH = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"


def refusals(gw, error: str) -> int:
    count = 0
    for line in gw.logs().splitlines():
        if line.startswith("{"):
            rec = orjson.loads(line)
            if rec.get("event") == "request_refused" and rec.get("error") == error:
                count += 1
    return count


def wait_for_refusals(gw, error: str, timeout: float = 5) -> int:
    """The count of ``request_refused`` lines for ``error``, once there is one."""
    return wait_until(lambda: refusals(gw, error), timeout, f"a request_refused {error} log line")


def test_health_shape_and_correlation_id(shared_gateway):
    r = shared_gateway.get("/health", token=False, headers={"X-Correlation-ID": "abc-123"})
    assert r.status == 200
    body = r.json()
    assert body["status"] == "ok" and body["module"] == "tentaculo_link" and body["version"] == "7.0"
    assert isinstance(body["edgelink"], str)
    assert r.headers["x-correlation-id"] == "abc-123"
    assert r.headers["content-type"] == "application/json"
    assert shared_gateway.get("/v1/health", token=False).json() == body


def test_correlation_id_replaced_when_too_long_or_unprintable(shared_gateway):
    for bad in ("x" * 129, "has space"):
        cid = shared_gateway.get("/health", headers={"X-Correlation-ID": bad}).headers["x-correlation-id"]
        assert cid != bad and len(cid) == 32
        int(cid, 16)
        # a uuid4 hex, as API.md §1 says, although made without the uuid module
        assert uuid.UUID(cid).version == 4 and uuid.UUID(cid).hex == cid


def test_keep_alive_serves_many_requests_on_one_connection(shared_gateway):
    client = RawClient(shared_gateway.connect())
    for _ in range(5):
        client.send(GET_HEALTH)
        status, headers, body = client.read_response()
        assert status == 200 and orjson.loads(body)["status"] == "ok"


def test_pipelined_requests_answered_in_order(shared_gateway):
    client = RawClient(shared_gateway.connect())
    client.send(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Correlation-ID: one\r\n\r\n"
                b"GET /missing HTTP/1.1\r\nHost: t\r\nX-Correlation-ID: two\r\n\r\n"
                b"DELETE /v1/health HTTP/1.1\r\nHost: t\r\nX-Correlation-ID: three\r\n\r\n")
    answers = [client.read_response() for _ in range(3)]
    assert [a[0] for a in answers] == [200, 404, 405]
    assert [a[1]["x-correlation-id"] for a in answers] == ["one", "two", "three"]


def test_long_pipeline_answered_in_order_across_sync_and_task_handlers(gateway):
    # /health is answered without a task, a bounded number per loop turn; ingest awaits the
    # ledger in a task. Order and every answer must survive the mix.
    body = orjson.dumps({"source": "pipe", "type": "custom.note", "payload": {"n": 1}})
    ingest = (b"POST /events/ingest HTTP/1.1\r\nHost: t\r\nX-VX11-Token: %s\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\nX-Correlation-ID: ingest-%%d\r\n\r\n%s" % (gateway.token.encode(), len(body), body))
    burst = b"".join(
        (ingest % i) if i % 25 == 24 else b"GET /health HTTP/1.1\r\nHost: t\r\nX-Correlation-ID: get-%d\r\n\r\n" % i
        for i in range(150))
    client = RawClient(gateway.connect())
    client.send(burst)
    answers = [client.read_response() for _ in range(150)]
    assert [a[1]["x-correlation-id"] for a in answers] == [
        f"ingest-{i}" if i % 25 == 24 else f"get-{i}" for i in range(150)]
    assert [a[0] for a in answers] == [201 if i % 25 == 24 else 200 for i in range(150)]
    health_ok(gateway)


def test_http10_answered_and_closed(shared_gateway):
    client = RawClient(shared_gateway.connect())
    client.send(b"GET /health HTTP/1.0\r\n\r\n")
    status, _, body = client.read_response()
    assert status == 200 and orjson.loads(body)["status"] == "ok"
    assert client.closed_by_peer()


def test_head_has_length_but_no_body(shared_gateway):
    client = RawClient(shared_gateway.connect())
    client.send(b"HEAD /health HTTP/1.1\r\nHost: t\r\n\r\n")
    client.sock.settimeout(5)
    while b"\r\n\r\n" not in client.buf:
        client._fill()
    head, _, rest = client.buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"content-length: 76" in head.lower() or b"content-length:" in head.lower()
    # The next response on the same connection starts right after the head: no body bytes.
    client.buf = rest
    client.send(GET_HEALTH)
    assert client.read_response()[0] == 200


def test_not_found_and_method_not_allowed_are_json_errors(shared_gateway):
    r = shared_gateway.get("/nope")
    assert r.status == 404 and r.json()["error"] == "not_found" and r.json()["status_code"] == 404
    r = shared_gateway.post("/health", {"x": 1})
    assert r.status == 405 and r.json()["error"] == "method_not_allowed"
    assert r.headers["allow"] == "GET, HEAD"


def test_chunked_body_is_read_and_connection_kept(shared_gateway):
    client = RawClient(shared_gateway.connect())
    client.send(b"POST /health HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    assert client.read_response()[0] == 405
    client.send(GET_HEALTH)
    assert client.read_response()[0] == 200


def test_expect_100_continue(shared_gateway):
    client = RawClient(shared_gateway.connect())
    client.send(b"POST /vx11/intent/nope HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nExpect: 100-continue\r\n"
                b"X-VX11-Token: " + shared_gateway.token.encode() + b"\r\n\r\n")
    status, _, _ = client.read_response()
    assert status == 100
    client.send(b"{}")
    status, _, body = client.read_response()
    assert status == 404 and orjson.loads(body)["error"] == "unknown_intent"


@pytest.mark.parametrize("target,token,status,error", [
    ("/vx11/intent/chat", None, 401, "auth_required"),
    ("/vx11/intent/chat", "wrong", 403, "forbidden"),
    ("/no/such/route", None, 404, "not_found"),
    ("/health", None, 405, "method_not_allowed"),
])
def test_expect_100_continue_only_after_route_and_token(shared_gateway, target, token, status, error):
    client = RawClient(shared_gateway.connect())
    auth = b"X-VX11-Token: %s\r\n" % token.encode() if token else b""
    client.send(b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nExpect: 100-continue\r\n%s\r\n"
                % (target.encode(), auth))
    got, headers, body = client.read_response()
    assert got == status and orjson.loads(body)["error"] == error  # no 100 first
    assert headers["connection"] == "close" and client.closed_by_peer()
    health_ok(shared_gateway)


def test_expect_100_continue_over_limit_refused_without_continue(gateway_factory):
    gw = gateway_factory({"EDGELINK_MAX_BODY": "1000"})
    client = RawClient(gw.connect())
    client.send(b"POST /health HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
    status, _, body = client.read_response()
    assert status == 413 and orjson.loads(body)["error"] == "payload_too_large"
    assert client.closed_by_peer()


@pytest.mark.parametrize("garbage", [
    b"\x00\x01\x02\xff garbage\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET /health HTTP/9.9 extra\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: t\r\nNoColonHere\r\n\r\n",
])
def test_malformed_requests_get_400_and_close(gateway, garbage):
    client = RawClient(gateway.connect())
    client.send(garbage)
    status, _, body = client.read_response()
    assert status == 400 and orjson.loads(body)["error"] == "bad_request"
    assert client.closed_by_peer()
    health_ok(gateway)
    assert wait_for_refusals(gateway, "bad_request") == 1


def test_header_block_over_limit_gets_431(gateway):
    client = RawClient(gateway.connect())
    client.send(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
    status, _, body = client.read_response()
    assert status == 431 and orjson.loads(body)["error"] == "headers_too_large"
    health_ok(gateway)
    assert wait_for_refusals(gateway, "headers_too_large") == 1


def test_body_over_limit_refused_from_content_length_before_reading(gateway_factory):
    gw = gateway_factory({"EDGELINK_MAX_BODY": "1000"})
    client = RawClient(gw.connect())
    # Only the head is sent: the answer must not wait for the body.
    client.send(b"POST /health HTTP/1.1\r\nHost: t\r\nContent-Length: 1001\r\n\r\n")
    status, _, body = client.read_response(timeout=5)
    assert status == 413 and orjson.loads(body)["status_code"] == 413
    health_ok(gw)


def test_chunked_body_over_limit_refused_while_reading(gateway_factory):
    gw = gateway_factory({"EDGELINK_MAX_BODY": "1000"})
    client = RawClient(gw.connect())
    client.send(b"POST /health HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"200\r\n" + b"x" * 0x200 + b"\r\n"
    client.send(chunk * 2)  # 1024 bytes: over the limit, terminator never sent
    status, _, _ = client.read_response(timeout=5)
    assert status == 413
    assert client.closed_by_peer()
    health_ok(gw)


def test_content_length_longer_than_body_times_out(gateway_factory):
    gw = gateway_factory({"EDGELINK_HEADER_TIMEOUT": "1"})
    client = RawClient(gw.connect())
    client.send(b"POST /health HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123456789")
    status, _, body = client.read_response(timeout=10)
    assert status == 408 and orjson.loads(body)["error"] == "request_timeout"
    assert client.closed_by_peer()
    health_ok(gw)


def test_content_length_shorter_than_body_extra_bytes_are_a_bad_request(shared_gateway):
    client = RawClient(shared_gateway.connect())
    client.send(b"POST /health HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}trailing-junk\r\n\r\n")
    assert client.read_response()[0] == 405
    assert client.read_response()[0] == 400
    assert client.closed_by_peer()
    health_ok(shared_gateway)


def test_slow_header_sender_is_cut_off_at_header_timeout(gateway_factory):
    gw = gateway_factory({"EDGELINK_HEADER_TIMEOUT": "2"})
    sock = gw.connect()
    started = time.monotonic()
    status = None
    trickle(sock, GET_HEALTH[:-2], 0.25)  # one byte per 0.25 s, never finishing the header block
    data = recv_all(sock, timeout=5)
    status = int(data.split()[1]) if data.startswith(b"HTTP/1.1") else None
    assert status == 408
    assert time.monotonic() - started < 2 + 10  # cut off, not served to the end
    health_ok(gw)


def test_keep_alive_idle_connection_closed(gateway_factory):
    gw = gateway_factory({"EDGELINK_KEEPALIVE_TIMEOUT": "0.5"})
    client = RawClient(gw.connect())
    client.send(GET_HEALTH)
    assert client.read_response()[0] == 200
    assert client.closed_by_peer(timeout=5)


def test_idle_connection_without_request_closed_at_header_timeout(gateway_factory):
    gw = gateway_factory({"EDGELINK_HEADER_TIMEOUT": "0.5"})
    client = RawClient(gw.connect())
    assert client.closed_by_peer(timeout=5)


def test_connection_limit(gateway_factory):
    gw = gateway_factory({"EDGELINK_MAX_CONNECTIONS": "3"})
    idle_fds = gw.open_fds()  # no client connected yet
    held = [gw.connect() for _ in range(3)]
    for s in held:  # make sure each is accepted and counted before the next one
        s.sendall(GET_HEALTH)
        RawClient(s).read_response()
    extra = RawClient(gw.connect())
    status, _, body = extra.read_response()
    assert status == 503 and orjson.loads(body)["error"] == "too_many_connections"
    for s in held:
        s.close()
    wait_until(lambda: gw.open_fds() <= idle_fds, why="the closed connections' slots free")
    health_ok(gw)


def proc_state(pid: int) -> str:
    """The state letter of ``/proc/<pid>/stat`` (``T``: stopped by a signal)."""
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rpartition(")")[2].split()[0]


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_client_that_never_reads_does_not_make_the_server_buffer(gateway):
    sock = gateway.connect()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    before = _rss_kb(gateway.proc.pid)
    sent = 0
    request = GET_HEALTH * 100
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and sent < 50_000_000:
        try:
            sent += sock.send(request)
        except BlockingIOError:  # the server stopped reading us: that is the point
            select.select([], [sock], [], 0.5)
    # The server stopped reading well before 50 MB of requests (~430k responses) arrived.
    assert sent < 50_000_000
    growth_kb = _rss_kb(gateway.proc.pid) - before
    assert growth_kb < 20_000, f"server RSS grew by {growth_kb} kB"
    health_ok(gateway)
    sock.close()


def test_client_vanishing_mid_request_is_harmless(gateway):
    for partial in (b"GET /hea", b"POST /health HTTP/1.1\r\nHost: t\r\nContent-Length: 50\r\n\r\n{\"a\""):
        s = gateway.connect()
        s.sendall(partial)
        s.close()
    s = gateway.connect()
    s.sendall(GET_HEALTH)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()  # RST right after the request
    health_ok(gateway)
    assert "Traceback" not in gateway.logs()


def test_no_traceback_reaches_client_or_log_after_bad_input(gateway):
    for junk in (b"\r\n\r\n", b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\n",
                 b"GET / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"):
        s = gateway.connect()
        s.sendall(junk)
        data = recv_all(s, timeout=5)
        assert b"Traceback" not in data
        s.close()
    health_ok(gateway)
    assert "Traceback" not in gateway.logs()


def test_sigterm_exits_zero_and_logs_stop(gateway):
    assert gateway.stop(signal.SIGTERM) == 0
    events = [orjson.loads(l)["event"] for l in gateway.logs().splitlines() if l.startswith("{")]
    assert events[-2:] == ["stopping", "stopped"]


def test_refuses_to_start_with_auth_on_and_no_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VX11_", "ENABLE_AUTH"))}
    proc = subprocess.run([EDGELINK, "serve", "--port", "0"], env=env, capture_output=True,
                          text=True, timeout=30, cwd=tmp_path)
    assert proc.returncode != 0
    assert "VX11_TENTACULO_LINK_TOKEN" in proc.stderr


def test_refuses_to_start_with_a_bad_value_naming_the_setting(tmp_path):
    env = dict(os.environ, VX11_GATEWAY_TOKEN="t", EDGELINK_MAX_BODY="lots")
    proc = subprocess.run([EDGELINK, "serve", "--port", "0"], env=env, capture_output=True,
                          text=True, timeout=30, cwd=tmp_path)
    assert proc.returncode != 0 and "EDGELINK_MAX_BODY" in proc.stderr


@pytest.mark.parametrize("path", ["/debug/events/cardinality", "/operator/snapshot"])
def test_protected_routes_need_the_token(shared_gateway, path):
    r = shared_gateway.get(path, token=False)
    assert r.status == 401 and r.json()["error"] == "auth_required"
    r = shared_gateway.get(path, headers={"X-VX11-Token": "nope"})
    assert r.status == 403 and r.json()["error"] == "forbidden"
    assert shared_gateway.get(path).status == 200


def test_auth_can_be_turned_off(gateway_factory):
    gw = gateway_factory({"ENABLE_AUTH": "false", "VX11_GATEWAY_TOKEN": ""})
    assert gw.get("/debug/events/cardinality", token=False).status == 200


def test_cors_preflight_and_echo(gateway_factory):
    gw = gateway_factory({"EDGELINK_CORS_ORIGINS": "https://ui.example, http://localhost:3000"})
    r = gw.request("OPTIONS", "/events/ingest", token=False, headers={
        "Origin": "https://ui.example", "Access-Control-Request-Method": "POST"})
    assert r.status == 204
    assert r.headers["access-control-allow-origin"] == "https://ui.example"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "X-VX11-Token" in r.headers["access-control-allow-headers"]
    assert r.headers["access-control-allow-credentials"] == "true"
    r = gw.request("OPTIONS", "/events/ingest", token=False, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert r.status == 403 and "access-control-allow-origin" not in r.headers
    r = gw.get("/health", headers={"Origin": "http://localhost:3000"})
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert gw.get("/health", headers={"Origin": "https://evil.example"}).headers.get(
        "access-control-allow-origin") is None


def test_cors_off_by_default(shared_gateway):
    r = shared_gateway.request("OPTIONS", "/health", token=False, headers={
        "Origin": "https://ui.example", "Access-Control-Request-Method": "GET"})
    assert r.status == 405 and "access-control-allow-origin" not in r.headers


def test_client_that_never_reads_is_dropped_after_the_send_timeout(gateway_factory):
    gw = gateway_factory({"EDGELINK_SEND_TIMEOUT": "1", "EDGELINK_WRITE_BUFFER_HIGH": "4096"})
    sock = gw.connect()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # pipeline requests and never read the answers
        try:
            sock.send(GET_HEALTH * 100)
        except BlockingIOError:
            select.select([], [sock], [], 0.5)
        except (BrokenPipeError, ConnectionResetError):
            break

    def dropped() -> bool:
        try:
            sock.send(GET_HEALTH)
        except BlockingIOError:
            pass
        except (BrokenPipeError, ConnectionResetError):
            return True
        return False

    wait_until(dropped, 15, "the connection dropped by the gateway")
    health_ok(gw)
    assert '"event":"connection_dropped"' in gw.logs()


def test_cors_preflight_headers_appear_once(gateway_factory):
    gw = gateway_factory({"EDGELINK_CORS_ORIGINS": "https://ui.example"})
    client = RawClient(gw.connect())
    client.send(b"OPTIONS /events/ingest HTTP/1.1\r\nHost: t\r\nOrigin: https://ui.example\r\n"
                b"Access-Control-Request-Method: POST\r\n\r\n")
    client.sock.settimeout(5)
    while b"\r\n\r\n" not in client.buf:
        client._fill()
    head = client.buf.split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 204")
    assert head.count(b"access-control-allow-origin:") == 1  # browsers reject a repeated one
    assert head.count(b"vary:") == 1


@pytest.mark.parametrize("line", [b"GET /ws?token=sekrit-123 HTTP/1.1 junk\r\n\r\n",
                                  b"GET /health HTTP/1.1\r\nX-VX11-Token : sekrit-123\r\n\r\n"])
def test_malformed_requests_never_log_or_echo_what_they_carried(gateway, line):
    client = RawClient(gateway.connect())
    client.send(line)
    status, _, body = client.read_response()
    assert status == 400 and b"sekrit" not in body
    wait_for_refusals(gateway, "bad_request")
    assert "sekrit" not in gateway.logs()


def test_invented_methods_share_one_metric_label(gateway):
    for method in ("FOO1", "FOO2", "BARBAZ"):
        assert gateway.request(method, "/nowhere").status == 404
    metrics = gateway.get("/metrics").body.decode()
    assert "FOO1" not in metrics and "BARBAZ" not in metrics
    assert 'edgelink_http_requests_total{route="unmatched",method="other",status="404"} 3' in metrics


def test_a_trickled_body_is_cut_off_at_the_body_timeout(gateway_factory):
    gw = gateway_factory({"EDGELINK_BODY_TIMEOUT": "1", "EDGELINK_HEADER_TIMEOUT": "10"})
    sock = gw.connect()
    sock.sendall(b"POST /events/ingest HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n")
    started = time.monotonic()
    trickle(sock, b"x" * 40, 0.2)  # one byte every 0.2 s: each arrives well within the header timeout
    data = recv_all(sock, timeout=5)
    assert data.startswith(b"HTTP/1.1 408")
    assert time.monotonic() - started < 8
    health_ok(gw)


# --- hostile framing and stalls (issue 11) ------------------------------------------------


def nested(levels: int) -> bytes:
    """A JSON object whose nesting depth is ``levels`` (the object itself is level 1)."""
    return b'{"a":' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}"


@pytest.mark.parametrize("path,body", [
    ("/events/ingest", b'{"type":"x.y","source":"madre","payload":%s}'),
    ("/operator/chat", b'{"message":"hi","metadata":%s}'),
    ("/vx11/intent/task", b'{"task":%s}'),
])
@pytest.mark.parametrize("levels", [65, 300, 1000])
def test_json_nested_deeper_than_64_is_invalid_json(shared_gateway, path, body, levels):
    r = shared_gateway.post(path, raw=body % nested(levels - 1))
    assert r.status == 400, r.body
    assert r.json()["error"] == "invalid_json" and "64" in r.json()["detail"]


def test_json_nested_64_deep_or_brackets_in_strings_are_not_refused(shared_gateway):
    for raw in (b'{"task":%s}' % nested(63), b'{"task":"%s"}' % (b"[{" * 500),
                b'{"task":"\\"%s"}' % (b"[" * 100)):
        r = shared_gateway.post("/vx11/intent/task", raw=raw)
        assert r.status == 502 and r.json()["error"] == "upstream_unavailable", r.body  # parsed, then sent on


def test_websocket_message_nested_too_deep_gets_invalid_json_and_stays_open(shared_gateway):
    import asyncio

    import websockets

    async def go():
        async with websockets.connect(f"ws://127.0.0.1:{shared_gateway.port}/ws",
                                      additional_headers={"X-VX11-Token": shared_gateway.token}) as ws:
            assert orjson.loads(await ws.recv())["type"] == "connected"
            await ws.send(nested(300).decode())
            frame = orjson.loads(await ws.recv())
            assert frame == {"channel": "control", "type": "error", "error": "invalid_json"}
            await ws.send('{"hello": 1}')
            assert orjson.loads(await ws.recv()) == {"hello": 1}  # the echo: still connected

    asyncio.run(asyncio.wait_for(go(), 30))


def test_content_length_with_transfer_encoding_is_answered_then_closed(shared_gateway):
    client = RawClient(shared_gateway.connect())
    client.send(b"POST /health HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n0\r\n\r\n")
    status, headers, _ = client.read_response()
    assert status == 405 and headers["connection"] == "close"
    assert client.closed_by_peer()
    health_ok(shared_gateway)


@pytest.mark.parametrize("target", [b"http://127.0.0.1/health", b"HTTP://gw.example:8000/health?x=1",
                                    b"https://gw/v1/health"])
def test_absolute_form_targets_are_served_like_origin_form(shared_gateway, target):
    client = RawClient(shared_gateway.connect())
    client.send(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % target)
    status, _, body = client.read_response()
    assert status == 200 and orjson.loads(body)["module"] == "tentaculo_link"


@pytest.mark.parametrize("size,complete", [(20 * 1024, True), (9 * 1024, True), (12 * 1024, False),
                                           (64 * 1024, True)])
def test_request_line_over_8_kib_is_414(gateway, size, complete):
    client = RawClient(gateway.connect())
    line = b"GET /" + b"a" * size + (b" HTTP/1.1\r\nHost: t\r\n\r\n" if complete else b"")
    try:
        client.send(line)
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused before it was all sent; the answer is still there to read
    status, _, body = client.read_response()
    assert status == 414 and orjson.loads(body)["error"] == "uri_too_long"
    assert client.closed_by_peer()
    assert refusals(gateway, "uri_too_long") == 1
    health_ok(gateway)


def test_request_line_under_the_limit_with_a_large_header_block_is_431(shared_gateway):
    client = RawClient(shared_gateway.connect())
    client.send(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n")
    assert client.read_response()[0] == 431


def test_refusal_is_not_lost_to_a_reset_when_the_body_was_sent(gateway_factory):
    gw = gateway_factory({"EDGELINK_MAX_BODY": "1000"})
    sock = gw.connect()
    body = b"x" * 500_000
    sock.sendall(b"POST /events/ingest HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body))
    try:
        sock.sendall(body)  # the server answers 413 at the headers and drains the rest
    except (BrokenPipeError, ConnectionResetError):
        pass
    time.sleep(0.3)  # real time: a reset, if the server sent one, has arrived and discarded the answer
    status, _, reply = RawClient(sock).read_response()
    assert status == 413 and orjson.loads(reply)["error"] == "payload_too_large"


def test_request_sent_while_the_gateway_was_stopped_is_answered(gateway_factory):
    gw = gateway_factory({"EDGELINK_KEEPALIVE_TIMEOUT": "1"})
    client = RawClient(gw.connect())
    client.send(GET_HEALTH)
    assert client.read_response()[0] == 200  # now an idle keep-alive connection
    os.kill(gw.proc.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: proc_state(gw.proc.pid) == "T", why="the gateway stopped")
        body = b'{"type":"x.y","source":"madre","payload":{}}'
        client.send(b"POST /events/ingest HTTP/1.1\r\nHost: t\r\nX-VX11-Token: %s\r\nContent-Length: %d\r\n\r\n%s"
                    % (gw.token.encode(), len(body), body))
        time.sleep(2.5)  # real time: the keep-alive timer is long overdue when the process resumes
    finally:
        os.kill(gw.proc.pid, signal.SIGCONT)
    status, _, reply = client.read_response()
    assert status in (200, 201, 202), reply


def test_unauthenticated_body_is_refused_and_not_buffered(gateway):
    client = RawClient(gateway.connect())
    body = b"x" * 200_000
    client.send(b"POST /events/ingest HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    status, _, reply = client.read_response()
    assert status == 401 and orjson.loads(reply)["error"] == "auth_required"
    client.send(GET_HEALTH)  # the body was read and dropped: the connection is still usable
    assert client.read_response()[0] == 200


def test_budget_refusals_are_counted_in_metrics(gateway_factory):
    gw = gateway_factory({"EDGELINK_MAX_BODY": "1000", "EDGELINK_MAX_CONNECTIONS": "2"})
    idle_fds = gw.open_fds()  # no client connected yet
    for raw in (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n",
                b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"b" * 20_000 + b"\r\n\r\n",
                b"POST /events/ingest HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n"):
        sock = gw.connect()
        sock.sendall(raw)
        RawClient(sock).read_response()
        sock.close()
    held = [gw.connect() for _ in range(2)]
    for s in held:
        s.sendall(GET_HEALTH)
        RawClient(s).read_response()
    assert RawClient(gw.connect()).read_response()[0] == 503
    for s in held:
        s.close()
    wait_until(lambda: gw.open_fds() <= idle_fds, why="the closed connections' slots free")
    text = gw.get("/metrics", token=False).body.decode()
    for budget in ("request_line", "header_block", "body", "connections"):
        assert f'edgelink_budget_refusals_total{{budget="{budget}"}} 1' in text, (budget, text)


def _nofile(pid: int) -> tuple[int, int]:
    for line in open(f"/proc/{pid}/limits"):
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no Max open files")


def test_fd_limit_raised_to_what_the_limits_need(gateway_factory):
    gw = gateway_factory({"EDGELINK_MAX_CONNECTIONS": "300"}, launcher=["prlimit", "--nofile=64:4096", "--"])
    soft, hard = _nofile(gw.proc.pid)
    assert hard == 4096 and soft >= 2 * 300 + 64 and soft < hard
    assert '"event":"fd_limit_raised"' in gw.logs()


def test_fd_limit_too_low_is_a_warning_naming_both_figures(gateway_factory):
    gw = gateway_factory({}, launcher=["prlimit", "--nofile=48:64", "--"])
    rec = next(orjson.loads(line) for line in gw.logs().splitlines() if '"fd_limit_low"' in line)
    assert rec["limit"] == 64 and rec["needed"] > 2000 and rec["level"] == "warning"
    assert _nofile(gw.proc.pid) == (64, 64)
    health_ok(gw)


def test_accept_loop_survives_running_out_of_descriptors(gateway_factory):
    gw = gateway_factory({}, launcher=["prlimit", "--nofile=64:64", "--"])
    first = RawClient(gw.connect())
    first.send(GET_HEALTH)
    assert first.read_response()[0] == 200
    idle_fds = gw.open_fds()
    held = [gw.connect() for _ in range(100)]  # past the limit: accept() gets EMFILE
    wait_until(lambda: gw.open_fds() >= 64, why="every descriptor in use")
    first.send(GET_HEALTH)  # existing connections keep being served meanwhile
    assert first.read_response()[0] == 200
    for s in held:
        s.close()
    # descriptors free again (accepted at EMFILE, a connection would be closed at once)
    wait_until(lambda: gw.open_fds() <= idle_fds, why="the closed connections' descriptors given back")
    health_ok(gw)


def _depth_of(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth_of, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth_of, value), default=0)
    return 0


@pytest.mark.parametrize("doc", [
    {}, [], "x", 1, {"a": [[[]]]}, {"s": "[[[[{{{{"}, {"s": "]]]]}}"}, {"s": 'q"[[[', "t": ["\\", ["\\\\\""]]},
    [{"k": "\\\"]", "v": [["\\\\"], {"x": "}"}]}], {"deep": nested(70)[:-1].decode()},
])
def test_json_depth_scan_matches_the_parsed_depth(doc):
    from edgelink.jsonbounds import json_depth

    assert json_depth(orjson.dumps(doc)) == _depth_of(doc)


def test_date_header_is_imf_fixdate() -> None:
    # the gateway formats it itself (no email.utils at start-up): the same text for any second
    from email.utils import formatdate

    from edgelink.http.wire import http_date

    rng = random.Random(7)
    for seconds in [0, 784111777, 951782400, 1764633599, 2**31 - 1] + [rng.randrange(2**34) for _ in range(2000)]:
        assert http_date(seconds).decode() == formatdate(seconds, usegmt=True)
