"""SIGTERM with work in flight: requests finish within the grace period, /health says
stopping meanwhile, new connections are refused, the process exits 0."""

from __future__ import annotations

import signal
import socket
import threading
import time

import orjson

from conftest import RawClient, module_env, received, wait_for_log, wait_until
from fakemodule import HANG, HEALTHY


def test_in_flight_request_finishes_and_health_says_stopping(fake, gateway_factory):
    madre = fake("madre")
    madre.behave("/madre/task", HEALTHY, delay=2.0)
    gw = gateway_factory(module_env({"madre": madre}))
    idle = RawClient(gw.connect())  # a keep-alive connection opened before the signal
    idle.send(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    assert idle.read_response()[0] == 200

    result = {}
    thread = threading.Thread(target=lambda: result.update(reply=gw.post("/vx11/intent/task", {"n": 1})))
    thread.start()
    wait_until(lambda: received(madre, "/madre/task"), why="the request in flight at the module")
    gw.proc.send_signal(signal.SIGTERM)
    wait_for_log(gw.log_path, "stopping", gw.proc)

    idle.send(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    status, headers, body = idle.read_response()
    assert status == 503 and orjson.loads(body)["status"] == "stopping"
    assert headers["connection"] == "close"
    try:  # the listener is closed: a new connection is refused (or reset at once)
        with socket.create_connection(("127.0.0.1", gw.port), timeout=2) as late:
            late.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            assert late.recv(100) == b""
    except (ConnectionRefusedError, ConnectionResetError):
        pass

    thread.join(10)
    assert result["reply"].status == 200 and result["reply"].json()["path"] == "/madre/task"
    assert gw.proc.wait(15) == 0


def test_a_connection_made_before_the_signal_gets_its_request_answered(gateway_factory):
    """A client that connected just before SIGTERM and sends its request just after gets an
    answer, not a closed connection: under socket activation a poller across a restart would
    otherwise lose that request (tests/test_systemd_boot.py)."""
    gw = gateway_factory()
    idle_fds = gw.open_fds()
    fresh = RawClient(gw.connect())
    wait_until(lambda: gw.open_fds() > idle_fds, why="accepted by the gateway, nothing sent yet")
    gw.proc.send_signal(signal.SIGTERM)
    wait_for_log(gw.log_path, "stopping", gw.proc)
    fresh.send(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    status, headers, body = fresh.read_response()
    assert status == 503 and orjson.loads(body)["status"] == "stopping"
    assert headers["connection"] == "close"
    assert gw.proc.wait(15) == 0


def test_grace_period_bounds_a_request_that_never_finishes(fake, gateway_factory):
    madre = fake("madre")
    madre.behave("/madre/task", HANG)
    gw = gateway_factory(module_env({"madre": madre}, EDGELINK_SHUTDOWN_GRACE="1"))
    sock = gw.connect()
    sock.sendall(b'POST /vx11/intent/task HTTP/1.1\r\nHost: t\r\nX-VX11-Token: ' + gw.token.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
    wait_until(lambda: received(madre, "/madre/task"), why="the request in flight at the module")
    started = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(15) == 0
    assert time.monotonic() - started < 8  # about the 1 s grace, not the 30 s route timeout
    assert '"event":"shutdown_grace_expired"' in gw.logs()


def test_websocket_upgrade_during_shutdown_is_refused(fake, gateway_factory):
    madre = fake("madre")
    madre.behave("/madre/task", HEALTHY, delay=2.0)
    gw = gateway_factory(module_env({"madre": madre}))
    idle = RawClient(gw.connect())
    idle.send(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    assert idle.read_response()[0] == 200
    thread = threading.Thread(target=lambda: gw.post("/vx11/intent/task", {"n": 1}))
    thread.start()
    wait_until(lambda: received(madre, "/madre/task"), why="the request in flight at the module")
    gw.proc.send_signal(signal.SIGTERM)
    wait_for_log(gw.log_path, "stopping", gw.proc)
    idle.send(b"GET /ws?token=" + gw.token.encode() + b" HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n"
              b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    status, _, body = idle.read_response()
    assert status == 503 and orjson.loads(body)["error"] == "stopping"
    thread.join(10)
    assert gw.proc.wait(15) == 0
