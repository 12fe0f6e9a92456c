"""Hostile input against the transport of the real ``edgelink serve`` process (issue 11).

Each test drives one attack class with a few variations and then checks the two promises
of API.md §1 "Memory and disk budget": the process's peak RSS (``VmHWM``) stays under the
80 MB budget, and a well-behaved client is still served afterwards. Where the attack ends
with the attackers closing, the current RSS (``VmRSS``) must come back down too.
"""

from __future__ import annotations

import select
import socket
import time

import orjson
import pytest

from conftest import RawClient, metric_sum, module_env, trickle, wait_until

BUDGET_MIB = 80
HEALTH = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"


def served(gw) -> None:
    client = RawClient(gw.connect())
    client.send(HEALTH)
    assert client.read_response()[0] == 200
    client.sock.close()


def assert_within_budget(gw) -> None:
    assert gw.peak_rss_mib() < BUDGET_MIB, f"peak RSS {gw.peak_rss_mib():.1f} MiB"
    served(gw)


def never_reading(gw) -> socket.socket:
    sock = gw.connect()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


def flood(sock: socket.socket, data: bytes, seconds: float = 2.0) -> int:
    """Send ``data`` without reading until it is all out or the server stops reading."""
    sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + seconds
    while sent < len(data) and time.monotonic() < deadline:
        try:
            sent += sock.send(data[sent:sent + 65536])
        except BlockingIOError:
            if not select.select([], [sock], [], 0.5)[1]:
                break  # the server stopped reading us for 0.5 s: that is the point
        except (BrokenPipeError, ConnectionResetError):
            break
    return sent


def pipelined(path: str, total: int, token: str | None = None) -> bytes:
    auth = f"X-VX11-Token: {token}\r\n" if token else ""
    one = f"GET {path} HTTP/1.1\r\nHost: t\r\n{auth}\r\n".encode()
    return one * (total // len(one))


@pytest.fixture
def gw(gateway_factory):
    return gateway_factory(module_env())


@pytest.mark.parametrize("path", ["/openapi.json", "/metrics", "/vx11/status", "/health"])
def test_pipelined_requests_from_clients_that_never_read(gw, path):
    # 256 KiB of small pipelined GETs per client, each answer up to ~100 KB: answered
    # regardless of the client reading, they once took 670 MiB for one client.
    data = pipelined(path, 256 * 1024)
    for clients in (1, 3, 10):
        socks = [never_reading(gw) for _ in range(clients)]
        for sock in socks:
            flood(sock, data)
        gw.wait_idle()  # it has answered all it would answer
        assert_within_budget(gw)
        for sock in socks:
            sock.close()
    wait_until(lambda: gw.status_kib("VmRSS") / 1024 < BUDGET_MIB, why="memory given back")
    assert_within_budget(gw)


def test_many_connections_pipelining_a_large_document(gw):
    # Per-connection bounds times many connections: what one holds must stay small (the
    # answer that did not fit the kernel's buffer, shared when it is a cached document).
    data = pipelined("/openapi.json", 64 * 1024)
    socks = [never_reading(gw) for _ in range(200)]
    for sock in socks:
        flood(sock, data, seconds=0.5)
    gw.wait_idle()  # it has answered all it would answer
    assert_within_budget(gw)
    for sock in socks:
        sock.close()
    wait_until(lambda: gw.status_kib("VmRSS") / 1024 < BUDGET_MIB, why="memory given back")


def test_pipelined_requests_with_a_token(gw):
    data = pipelined("/vx11/routes", 256 * 1024, gw.token) + pipelined("/openapi.json", 256 * 1024, gw.token)
    socks = [never_reading(gw) for _ in range(3)]
    for sock in socks:
        flood(sock, data)
    gw.wait_idle()  # it has answered all it would answer
    assert_within_budget(gw)
    for sock in socks:
        sock.close()


def test_clients_that_never_read_are_dropped_counted_and_logged_once(gateway_factory):
    gw = gateway_factory(module_env(EDGELINK_SEND_TIMEOUT="1", EDGELINK_WRITE_BUFFER_HIGH="16384"))
    socks = [never_reading(gw) for _ in range(3)]
    for sock in socks:
        flood(sock, pipelined("/openapi.json", 64 * 1024))
    wait_until(lambda: metric_sum(gw, 'edgelink_budget_refusals_total{budget="write_buffer"}') >= 3,
               why="three connections dropped")
    assert metric_sum(gw, 'edgelink_budget_refusals_total{budget="write_buffer"}') == 3
    drops = [line for line in gw.logs().splitlines() if '"event":"connection_dropped"' in line]
    assert len(drops) == 3  # once per connection, not once per pipelined request
    assert_within_budget(gw)


@pytest.mark.parametrize("token", [False, True])
def test_large_bodies_held_open(gateway_factory, token):
    # Each client sends all but the last byte of a body at the limit and waits. Without a
    # token nothing is buffered (the body is read and dropped); with one, a body is held
    # until it is complete, and the number of connections bounds how many.
    gw = gateway_factory(module_env(EDGELINK_BODY_TIMEOUT="20"))
    clients = 70 if not token else 20
    auth = b"X-VX11-Token: %s\r\n" % gw.token.encode() if token else b""
    body = b"x" * (1024 * 1024 - 1)
    socks = []
    for _ in range(clients):
        sock = gw.connect()
        sock.sendall(b"POST /events/ingest HTTP/1.1\r\nHost: t\r\n%sContent-Length: %d\r\n\r\n"
                     % (auth, len(body) + 1))
        flood(sock, body, seconds=3)
        socks.append(sock)
    gw.wait_idle()  # it has read all it would read
    assert_within_budget(gw)
    for sock in socks:
        sock.close()


def test_bodies_of_many_clients_add_up_to_the_budget(gateway_factory):
    # 120 authenticated clients each announce a body at the limit and send all but its last
    # byte: 120 MiB held, were each connection bounded only by itself. EDGELINK_MAX_BODIES
    # (8 MiB) bounds them all together: the rest are refused before their body is read.
    gw = gateway_factory(module_env(EDGELINK_BODY_TIMEOUT="20"))
    body = b"x" * (1024 * 1024 - 1)
    head = (b"POST /events/ingest HTTP/1.1\r\nHost: t\r\nX-VX11-Token: %s\r\nContent-Length: %d\r\n\r\n"
            % (gw.token.encode(), len(body) + 1))
    held, refused = [], 0
    for _ in range(120):
        sock = gw.connect()
        sock.sendall(head)
        sock.settimeout(0.3)
        try:
            answer = sock.recv(65536)  # a refusal comes at once; a reserved body gets no answer yet
        except TimeoutError:
            flood(sock, body, seconds=3)
            held.append(sock)
            continue
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:80]
        assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "gateway_overloaded"
        refused += 1
        sock.close()
    gw.wait_idle()  # it has read all it would read
    assert len(held) == 8 and refused == 112  # 8 MiB of 1 MiB bodies
    assert_within_budget(gw)
    assert metric_sum(gw, 'edgelink_budget_refusals_total{budget="bodies"}') == refused
    for sock in held:  # the last byte: each body is complete, answered (not JSON: 400), released
        sock.sendall(b"x")
        assert RawClient(sock).read_response()[0] == 400
        sock.close()
    assert gw.post("/events/ingest", {"source": "t", "type": "system.alert", "payload": {
        "alert_id": "a", "severity": "info", "message": "m", "timestamp": 1}}).status == 201


@pytest.mark.parametrize("kind", ["headers", "body"])
def test_slowloris(gateway_factory, kind):
    gw = gateway_factory(module_env(EDGELINK_HEADER_TIMEOUT="1", EDGELINK_BODY_TIMEOUT="2"))
    socks = []
    for i in range(200):
        sock = gw.connect()
        if kind == "headers":
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"p" * 8000)
        else:
            sock.sendall(b"POST /events/ingest HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
        socks.append(sock)
    trickle(socks, b"ppp", 0.5)  # a byte now and then, never a whole request
    served(gw)  # while the attack is on
    answered = 0
    for sock in socks:
        try:
            status = RawClient(sock).read_response(timeout=5)[0]
        except (ConnectionError, OSError):
            continue
        answered += status == 408
    assert answered == 200
    assert metric_sum(gw, 'edgelink_budget_refusals_total{budget="request_time"}') == 200
    assert_within_budget(gw)
    for sock in socks:
        sock.close()


@pytest.mark.parametrize("size", [20 * 1024, 1024 * 1024])
def test_huge_request_lines(gw, size):
    line = b"GET /" + b"a" * size + b" HTTP/1.1\r\nHost: t\r\n\r\n"
    socks = [gw.connect() for _ in range(30)]
    for sock in socks:
        flood(sock, line)
    for sock in socks:
        status, _, body = RawClient(sock).read_response()
        assert status == 414 and orjson.loads(body)["error"] == "uri_too_long"
        sock.close()
    assert metric_sum(gw, 'edgelink_budget_refusals_total{budget="request_line"}') == 30
    assert_within_budget(gw)


def test_connection_flood_at_the_limit(gateway_factory):
    gw = gateway_factory(module_env(EDGELINK_MAX_CONNECTIONS="50"))
    idle_fds = gw.open_fds()  # no client connected yet
    held = [gw.connect() for _ in range(50)]
    for sock in held:
        sock.sendall(HEALTH)
        RawClient(sock).read_response()
    refused = 0
    for _ in range(100):
        sock = gw.connect()
        try:
            refused += RawClient(sock).read_response()[0] == 503
        except (ConnectionError, OSError):
            pass
        sock.close()
    assert refused == 100
    logged = [line for line in gw.logs().splitlines() if '"event":"connection_refused"' in line]
    assert 1 <= len(logged) < 10  # summarised, not one line per refused connection
    for sock in held:
        sock.close()
    wait_until(lambda: gw.open_fds() <= idle_fds, why="the closed connections' slots free")
    assert metric_sum(gw, 'edgelink_budget_refusals_total{budget="connections"}') == 100
    assert_within_budget(gw)
