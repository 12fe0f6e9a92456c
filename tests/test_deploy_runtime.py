"""The gateway under systemd's protocols, as a real process: notify, watchdog, socket
activation, and SIGHUP reload with clients connected."""

from __future__ import annotations

import asyncio
import signal
import socket
import time

import orjson
import pytest
import websockets

from conftest import log_records, start_gateway, stays, wait_for_log, wait_still, wait_until
from fakemodule import FakeModule, unused_port


def _notify_socket(tmp_path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(10)
    return sock


def _next_message(sock: socket.socket, skip_watchdog: bool = True) -> str:
    while True:
        msg = sock.recv(4096).decode()
        if not (skip_watchdog and msg == "WATCHDOG=1"):
            return msg


def test_notify_ready_watchdog_reload_stopping(tmp_path):
    notify = _notify_socket(tmp_path)
    gw = start_gateway(tmp_path, {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "200000"})
    try:
        assert _next_message(notify) == "READY=1"
        # WATCHDOG=1 every 0.1 s from the loop: several arrive within a second or two.
        pings = 0
        deadline = time.monotonic() + 5
        while pings < 3 and time.monotonic() < deadline:
            if notify.recv(4096) == b"WATCHDOG=1":
                pings += 1
        assert pings >= 3
        gw.proc.send_signal(signal.SIGHUP)
        reloading = _next_message(notify)
        assert reloading.startswith("RELOADING=1\nMONOTONIC_USEC=")
        assert _next_message(notify) == "READY=1"
        gw.proc.send_signal(signal.SIGTERM)
        assert _next_message(notify) == "STOPPING=1"
        assert gw.proc.wait(20) == 0
    finally:
        notify.close()
        if gw.proc.poll() is None:
            gw.proc.kill()


def test_socket_activation_serves_on_the_inherited_socket(tmp_path):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    # As systemd does: the socket at fd 3, LISTEN_PID naming the process that gets it.
    launcher = ["/bin/sh", "-c", 'LISTEN_PID=$$ exec "$@" 3<&0 </dev/null', "sh"]
    gw = start_gateway(tmp_path, {"LISTEN_FDS": "1", "TENTACULO_LINK_PORT": "1"}, launcher=launcher,
                       stdin=listener)
    try:
        listener.close()  # the gateway holds its own copy
        started = [r for r in log_records(gw.log_path) if r["event"] == "started"][0]
        assert started["socket_activated"] is True and started["port"] == port
        assert gw.get("/health", token=False).json()["status"] == "ok"
        status = gw.get("/vx11/status").json()
        assert status["ports"]["gateway"] == port
    finally:
        gw.stop()


def test_sighup_reload_new_module_url_keeps_connections(tmp_path):
    with FakeModule("hermes-a") as first, FakeModule("hermes-b") as second:
        config = tmp_path / "edgelink.toml"
        config.write_text(f'[modules.hermes]\nurl = "{first.url}"\n')
        envfile = tmp_path / "edgelink.env"
        envfile.write_text("VX11_GATEWAY_TOKEN=first-token\n")
        gw = start_gateway(tmp_path, {"EDGELINK_ENV_FILE": str(envfile), "MADRE_URL": f"http://127.0.0.1:{unused_port()}"},
                           args=["--config", str(config)])
        gw.token = "first-token"

        async def scenario() -> None:
            ws = await websockets.connect(f"ws://127.0.0.1:{gw.port}/ws?token=first-token")
            assert orjson.loads(await ws.recv())["type"] == "connected"
            assert gw.get("/resources").status == 200 and len(first.requests) == 1

            # A new URL and a new token, then SIGHUP.
            config.write_text(f'[modules.hermes]\nurl = "{second.url}"\n')
            envfile.write_text("VX11_GATEWAY_TOKEN=second-token\n")
            seen = len(log_records(gw.log_path))
            gw.proc.send_signal(signal.SIGHUP)
            await asyncio.to_thread(wait_for_log, gw.log_path, "reloaded", gw.proc, 10, seen)
            assert gw.get("/resources").status == 403  # the old token is gone
            gw.token = "second-token"
            assert gw.get("/resources").status == 200
            assert len(second.requests) == 1 and len(first.requests) == 1

            # The WebSocket opened with the old token is closed 1008 (API.md §6); one opened
            # with the new token is served across the next reload.
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 1008
            ws = await websockets.connect(f"ws://127.0.0.1:{gw.port}/ws?token=second-token")
            assert orjson.loads(await ws.recv())["type"] == "connected"

            # A broken file is refused and the running settings stay.
            config.write_text("[modules.hermes]\nurl = 12\n")
            seen = len(log_records(gw.log_path))
            gw.proc.send_signal(signal.SIGHUP)
            refused = await asyncio.to_thread(wait_for_log, gw.log_path, "reload_refused", gw.proc, 10, seen)
            assert "modules.hermes.url" in refused["error"]
            assert gw.get("/resources").status == 200 and len(second.requests) == 2
            await ws.send('{"after": "refusal"}')
            assert orjson.loads(await ws.recv()) == {"after": "refusal"}
            await ws.close()

        try:
            asyncio.run(asyncio.wait_for(scenario(), 60))
        finally:
            gw.stop()


def test_reload_of_restart_only_setting_is_reported(tmp_path):
    config = tmp_path / "edgelink.toml"
    config.write_text("keepalive_timeout = 5\n")
    gw = start_gateway(tmp_path, args=["--config", str(config)])
    try:
        config.write_text('keepalive_timeout = 7\nledger_sync = "normal"\n')
        gw.proc.send_signal(signal.SIGHUP)
        warning = wait_for_log(gw.log_path, "reload_needs_restart", gw.proc, 10)
        assert warning["settings"] == ["ledger_sync"]
        wait_for_log(gw.log_path, "reloaded", gw.proc, 10)
        assert gw.get("/health").status == 200
    finally:
        gw.stop()


def _history_rows(db) -> int:
    import sqlite3
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        try:
            return conn.execute("SELECT count(*) FROM copilot_runtime_services_history").fetchone()[0]
        except sqlite3.OperationalError:
            return 0


def test_reload_turns_health_recording_on_and_off(tmp_path):
    envfile = tmp_path / "edgelink.env"
    envfile.write_text("EDGELINK_PROBE_INTERVAL=0\n")
    gw = start_gateway(tmp_path, {"EDGELINK_ENV_FILE": str(envfile), "EDGELINK_HEALTH_TIMEOUT": "0.2"})
    try:
        stays(lambda: _history_rows(gw.db) == 0, 0.5, "probing off: nothing recorded")
        envfile.write_text("EDGELINK_PROBE_INTERVAL=0.2\n")
        seen = len(log_records(gw.log_path))
        gw.proc.send_signal(signal.SIGHUP)
        wait_for_log(gw.log_path, "reloaded", gw.proc, 10, seen)
        wait_until(lambda: _history_rows(gw.db) >= 20, why="two rounds of ten services")
        envfile.write_text("EDGELINK_PROBE_INTERVAL=0\n")
        seen = len(log_records(gw.log_path))
        gw.proc.send_signal(signal.SIGHUP)
        wait_for_log(gw.log_path, "reloaded", gw.proc, 10, seen)
        # a round in flight (0.2 s health timeout) may still land
        settled = wait_still(lambda: _history_rows(gw.db), 0.5, why="the last round landed")
        stays(lambda: _history_rows(gw.db) == settled, 1.0, "off means off, not back to back")
    finally:
        gw.stop()
