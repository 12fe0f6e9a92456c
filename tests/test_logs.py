"""Logs (API.md §7): RFC 3339 ``ts``, syslog priorities under journald, one JSON type per
field across events, refused auth and invalid JSON at warning (rate-limited per client),
and ``handler_failed`` with its traceback."""

from __future__ import annotations

import asyncio
import io
import re
import socket
import subprocess
from datetime import datetime, timezone

import orjson
import pytest
import websockets

from conftest import EDGELINK, TOKEN, log_records, wait_for_log, wait_until
from edgelink.config import Settings
from edgelink.dispatch import Dispatcher
from edgelink.http.messages import Request
from edgelink.http.router import Router
from edgelink.log import TRACEBACK_MAX_CHARS, Logger, Throttle, log, rfc3339, traceback_text
from edgelink.runtime import Runtime

RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_ts_is_rfc3339_utc_with_milliseconds():
    assert rfc3339(1796155200.123) == "2026-12-01T20:00:00.123Z"
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"
    stream = io.StringIO()
    Logger(stream=stream, journal=False).info("x")
    record = orjson.loads(stream.getvalue())
    assert RFC3339_MS.match(record["ts"])
    parsed = datetime.fromisoformat(record["ts"].replace("Z", "+00:00"))
    assert abs((datetime.now(timezone.utc) - parsed).total_seconds()) < 60


def test_journal_lines_carry_their_syslog_priority():
    stream = io.StringIO()
    logger = Logger(level="debug", stream=stream, journal=True)
    for level in ("debug", "info", "warning", "error"):
        logger.log(level, "e")
    prefixes = [line[:3] for line in stream.getvalue().splitlines()]
    assert prefixes == ["<7>", "<6>", "<4>", "<3>"]
    assert orjson.loads(stream.getvalue().splitlines()[2][3:])["level"] == "warning"
    plain = io.StringIO()
    Logger(stream=plain, journal=False).warning("e")
    assert plain.getvalue().startswith("{")


def test_real_process_under_journald_prefixes_every_line(tmp_path):
    # not start_gateway: it waits for lines that start with "{"
    log_path = tmp_path / "journal.log"
    env = {"PATH": "/usr/bin:/bin", "JOURNAL_STREAM": "8:12345", "VX11_GATEWAY_TOKEN": TOKEN,
           "EDGELINK_DB": str(tmp_path / "j.db"), "EDGELINK_PROBE_INTERVAL": "0", "EDGELINK_HOST": "127.0.0.1"}
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([EDGELINK, "serve", "--port", "0"], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        def started() -> bool:
            assert proc.poll() is None, log_path.read_text()
            return b'"event":"started"' in log_path.read_bytes()
        wait_until(started, 20, "the started line")
        lines = log_path.read_text().splitlines()
        started = next(line for line in lines if '"event":"started"' in line)
        assert started.startswith("<6>{")
        port = orjson.loads(started[3:])["port"]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /vx11/routes HTTP/1.1\r\nHost: x\r\nX-VX11-Token: wrong\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 403")
        wait_until(lambda: '"request_refused"' in log_path.read_text(), why="the request_refused line")
        refused = next(line for line in log_path.read_text().splitlines() if '"request_refused"' in line)
        assert refused.startswith("<4>{")
    finally:
        proc.terminate()
        proc.wait(30)
    assert all(re.match(r"^<[3-7]>\{", line) for line in log_path.read_text().splitlines())


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__)


def test_refusals_are_warnings_and_every_field_keeps_one_type(gateway_factory):
    gw = gateway_factory({"EDGELINK_ACCESS_LOG": "true", "EDGELINK_MAX_BODY": "100"})
    assert gw.get("/vx11/routes", token=False).status == 401
    assert gw.get("/vx11/routes", headers={"X-VX11-Token": "wrong"}, token=False).status == 403
    assert gw.post("/events/ingest", raw=b"{not json").status == 400
    assert gw.post("/events/ingest", raw=b"x" * 200).status == 413  # refused by the server itself
    assert gw.get("/nope").status == 404

    async def ws_refused() -> None:
        with pytest.raises(websockets.InvalidStatus):
            await websockets.connect(f"ws://127.0.0.1:{gw.port}/ws?token=wrong")

    asyncio.run(ws_refused())
    wait_for_log(gw.log_path, "access", gw.proc)
    gw.stop()
    records = log_records(gw.log_path)
    refused = [r for r in records if r["event"] == "request_refused" and r["level"] == "warning"]
    assert [(r["status"], r["error"]) for r in refused] == [
        (401, "auth_required"), (403, "forbidden"), (400, "invalid_json"), (403, "forbidden")]
    assert refused[1]["client"] == "127.0.0.1" and refused[1]["path"] == "/vx11/routes"
    assert refused[0]["suppressed"] == 0
    assert "wrong" not in gw.logs()  # the bad token itself is never logged

    types: dict[str, set[str]] = {}
    for record in records:
        for key, value in record.items():
            types.setdefault(key, set()).add(_json_type(value))
    mixed = {key: kinds for key, kinds in types.items() if len(kinds - {"null"}) > 1}
    assert mixed == {}
    assert types["client"] == {"string"} and types["ts"] == {"string"}


def test_refusals_are_rate_limited_per_client(gateway_factory):
    gw = gateway_factory()
    for _ in range(30):
        assert gw.get("/vx11/routes", headers={"X-VX11-Token": "wrong"}, token=False).status == 403
    assert gw.get("/vx11/routes").status == 200
    gw.stop()
    refused = [r for r in log_records(gw.log_path) if r["event"] == "request_refused"]
    assert len(refused) == Throttle().burst


def test_throttle_windows_and_bounded_keys():
    now = [0.0]
    throttle = Throttle(burst=2, window=10, max_keys=3, now=lambda: now[0])
    assert [throttle.allow("a") for _ in range(5)] == [0, 0, None, None, None]
    now[0] = 10.0
    assert throttle.allow("a") == 3  # the next window's first line says how many were dropped
    for key in ("b", "c", "d", "e"):
        assert throttle.allow(key) == 0
    assert len(throttle) == 3  # the oldest windows went first
    assert throttle.allow("a") == 0  # forgotten, so a fresh window


def test_handler_failed_carries_the_traceback(monkeypatch, tmp_path):
    async def broken(req):
        raise KeyError("boom")

    router = Router()
    router.add("GET", "/broken", broken, public=True, summary="fails", tags=("test",))
    runtime = Runtime(Settings(enable_auth=False, db=str(tmp_path / "t.db")))
    stream = io.StringIO()
    monkeypatch.setattr(log, "stream", stream)
    monkeypatch.setattr(log, "journal", False)

    async def call():
        return await Dispatcher(router, runtime).handle(Request("GET", "/broken", {}, client=("10.0.0.7", 5)))

    response = asyncio.run(call())
    assert response.status == 500 and b"boom" not in response.body
    (record,) = [orjson.loads(line) for line in stream.getvalue().splitlines()
                 if orjson.loads(line)["event"] == "handler_failed"]
    assert isinstance(record["traceback"], str)
    assert record["traceback"].startswith("Traceback (most recent call last):")
    assert "in broken" in record["traceback"] and "KeyError: 'boom'" in record["traceback"]


def test_traceback_text_is_bounded():
    try:
        raise ValueError("x" * 3 * TRACEBACK_MAX_CHARS)
    except ValueError as exc:
        text = traceback_text(exc)
    assert len(text) == TRACEBACK_MAX_CHARS and text.endswith("xxx\n")  # the innermost end is kept


def test_a_request_refused_before_its_body_gets_its_access_line(gateway_factory):
    gw = gateway_factory({"EDGELINK_ACCESS_LOG": "true"})
    assert gw.post("/events/ingest", raw=b'{"source": "t"}', token=False).status == 401  # refused at admit
    assert gw.get("/health").status == 200
    wait_for_log(gw.log_path, "access", gw.proc)
    gw.stop()
    access = [(r["method"], r["path"], r["status"]) for r in log_records(gw.log_path) if r["event"] == "access"]
    assert access == [("POST", "/events/ingest", 401), ("GET", "/health", 200)]
