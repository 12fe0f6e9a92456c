"""What a Tentáculo Link v7-era client sends, and gets as v7 gave it (API.md §12, issue 22).

Each test speaks as a seed-era module, operator UI or deployment does: v7's environment
names, request shapes and headers, against the real gateway and loopback modules. The
deliberate differences are in docs/migrating-from-v7.md (tests/test_migration_guide.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from conftest import TOKEN, assert_error, module_env, received, wait_until
from edgelink.config import ConfigError, load_settings
from fakemodule import unused_port
from test_ws_events import connect, next_frame, publish, run

SWITCH_PATH = "/switch/route-v5"
TS = 1_700_000_000_000
ALERT = {"alert_id": "a-1", "severity": "L3", "message": "disk almost full", "timestamp": TS}


def _without(env: dict[str, str], *names: str) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in names}


# --- 1: modules moved by port, and the chat router's base URLs -------------------------


def test_modules_moved_with_v7_port_and_base_url_names(fake, gateway_factory) -> None:
    hermes, madre, switch = fake("hermes"), fake("madre"), fake("switch")
    switch.reply(SWITCH_PATH, {"response": "from switch", "model_used": "m"})
    closed = unused_port()
    # Tentáculo Link's minimal .env moves hermes by port; the chat router names madre by its
    # base URL (over a stale port); switch's own URL wins over both of its other names.
    env = _without(module_env(), "HERMES_URL", "MADRE_URL") | {
        "HERMES_PORT": str(hermes.port),
        "MADRE_PORT": str(closed), "MADRE_BASE_URL": madre.url,
        "SWITCH_URL": switch.url, "SWITCH_BASE_URL": f"http://127.0.0.1:{closed}", "SWITCH_PORT": str(closed),
    }
    gw = gateway_factory(env)
    status = gw.get("/vx11/status", token=False).json()
    for name, module in (("hermes", hermes), ("madre", madre), ("switch", switch)):
        assert status["modules"][name]["status"] == "ok", (name, status["modules"][name])
        assert status["modules"][name]["url"] == module.url
        assert status["ports"][name] == module.port
    assert received(hermes, "/health") and received(madre, "/health")
    reply = gw.post("/operator/chat", {"message": "hola"})
    assert reply.status == 200 and reply.json()["response"] == "from switch"


def test_a_bad_v7_port_stops_the_start_naming_it() -> None:
    base = {"VX11_GATEWAY_TOKEN": TOKEN}
    assert load_settings(env=base | {"OPERATOR_PORT": "9011"}).modules[-1].url == "http://127.0.0.1:9011"
    for value in ("abc", "0", "70000"):
        with pytest.raises(ConfigError) as exc:
            load_settings(env=base | {"MADRE_PORT": value})
        assert "MADRE_PORT" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_settings(env=base | {"SWITCH_BASE_URL": "switch:8002"})
    assert "SWITCH_BASE_URL" in str(exc.value)


# --- 2, 3, and the session view: chat as the operator UI sends it ----------------------


def test_chat_body_and_reply_as_v7_gave_them(fake, gateway_factory) -> None:
    switch = fake("switch")
    switch.reply(SWITCH_PATH, {"response": "hola", "model_used": "deepseek-r1", "tokens": 42,
                               "sources": ["doc-1", "doc-2"], "status": "done", "provider": "spoofed"})
    gw = gateway_factory(module_env({"switch": switch}))
    # the UI sends no user_id; a null metadata is what a v7 pydantic model let through
    for body in ({"message": "Hola, ¿cómo estás?"}, {"message": "otra", "metadata": None, "user_id": None}):
        reply = gw.post("/operator/chat", body)
        assert reply.status == 200, reply.body
        sent = received(switch, SWITCH_PATH)[-1].json
        assert sent["user_id"] == "local" and sent["metadata"] == {}, sent
        answer = reply.json()
        # the module's other fields reach the caller; the gateway's own win a clash
        assert answer["tokens"] == 42 and answer["sources"] == ["doc-1", "doc-2"]
        assert answer["status"] == "ok" and answer["provider"] == "switch"
    # the UI's own metadata is passed on as it is
    gw.post("/operator/chat", {"message": "hola", "session_id": "session-001", "metadata": {"source": "ui"}})
    assert received(switch, SWITCH_PATH)[-1].json["metadata"] == {"source": "ui"}

    session = gw.get("/operator/session/session-001").json()
    assert session["user_id"] == "local"
    assert session["summary"] == "user: hola\nassistant: hola"
    assert session["summary"] == received(switch, SWITCH_PATH)[-1].json["context_summary"] + "\nassistant: hola"


# --- 4: the snapshot's state key ------------------------------------------------------


def test_snapshot_has_v7_state_key(fake, gateway_factory) -> None:
    madre = fake("madre")
    gw = gateway_factory(module_env({"madre": madre}, EDGELINK_PROBE_INTERVAL="0.2"))
    snapshot = wait_until(lambda: "madre" in (s := gw.get("/operator/snapshot").json()).get("state", {}) and s,
                          30, "madre probed")
    state = snapshot["state"]
    # what a UI reading snapshot.state.madre.status finds
    assert state["madre"] == {"status": "ok"}
    assert state["switch"] == {"status": snapshot["modules"]["switch"]["status"]} == {"status": "unreachable"}
    assert set(state) == set(snapshot["modules"])


# --- 5: the cleanup call of v7's troubleshooting guide --------------------------------


def test_context7_cleanup(fake, gateway_factory) -> None:
    switch = fake("switch")
    switch.reply(SWITCH_PATH, {"response": "ok"})
    gw = gateway_factory(module_env({"switch": switch}, CONTEXT7_TTL_SECONDS="1"))
    assert_error(gw.request("POST", "/vx11/context-7/cleanup", token=False), 401, "auth_required")
    for sid in ("old-1", "old-2"):
        assert gw.post("/operator/chat", {"message": "hi", "session_id": sid}).status == 200
    # the 1 s TTL passes: the two sessions are expired (hidden, not swept yet)
    wait_until(lambda: gw.get("/vx11/context-7/sessions").json()["total"] == 0, why="the sessions expired")
    assert gw.post("/operator/chat", {"message": "hi", "session_id": "fresh"}).status == 200
    reply = gw.request("POST", "/vx11/context-7/cleanup")  # as curl -X POST sends it: no body
    assert reply.status == 200, reply.body
    assert reply.json() == {"status": "ok", "removed": 2, "total": 1}
    reply = gw.post("/vx11/context-7/cleanup", {})  # and with an empty JSON object
    assert reply.json() == {"status": "ok", "removed": 0, "total": 1}
    assert gw.get("/vx11/context-7/sessions").json()["total"] == 1


# --- 7: CORS allows the headers a preflight asks for ----------------------------------


def test_cors_preflight_allows_requested_headers(gateway_factory) -> None:
    gw = gateway_factory({"EDGELINK_CORS_ORIGINS": "http://localhost:3000"})
    asked = "content-type, x-requested-with, X-VX11-Token, bad header"
    reply = gw.request("OPTIONS", "/operator/chat", token=False, headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": asked})
    assert reply.status == 204
    allowed = {h.strip().lower() for h in reply.headers["access-control-allow-headers"].split(",")}
    assert {"content-type", "x-requested-with", "x-vx11-token", "x-correlation-id"} <= allowed
    assert "bad header" not in allowed and "*" not in allowed
    assert reply.headers["access-control-allow-origin"] == "http://localhost:3000"
    refused = gw.request("OPTIONS", "/operator/chat", token=False, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-requested-with"})
    assert refused.status == 403 and "access-control-allow-headers" not in refused.headers


# --- 8: a client of an older ledger ---------------------------------------------------


def test_since_seq_beyond_last_seq_replays_from_the_oldest(gateway) -> None:
    seqs = [publish(gateway, "system.alert", dict(ALERT, alert_id=f"x{i}"))["seq"] for i in range(3)]

    async def go() -> None:
        ws, first = await connect(gateway, "client_id=old-ledger&since_seq=500")
        assert (first["last_seq"], first["replayed"], first["truncated"]) == (3, 3, True)
        assert [(await next_frame(ws))["seq"] for _ in seqs] == seqs
        await ws.close()
    run(go())


# --- 9: what v7 did that a side-by-side run showed ------------------------------------


def test_dashboard_is_posted_and_status_carries_the_modules_health_fields(fake, gateway_factory) -> None:
    shub, madre = fake("shubniggurath"), fake("madre")
    shub.reply("/shub/dashboard", {"tracks": 3})
    shub.reply("/health", {"status": "ok", "module": "shubniggurath", "version": "7.0"})
    madre.reply("/health", {"status": "degraded", "module": "madre", "uptime_s": 12, "url": "spoofed",
                            "blob": "x" * 5000, "db": "ok"})
    gw = gateway_factory(module_env({"shubniggurath": shub, "madre": madre}, SHUB_ENABLED="true"))

    reply = gw.get("/shub/dashboard")
    assert reply.status == 200 and reply.json() == {"tracks": 3}
    [call] = received(shub, "/shub/dashboard")
    assert (call.method, call.json) == ("POST", {})

    for path, key in (("/vx11/status", "modules"), ("/vx11/overview", "modules_health")):
        health = gw.get(path).json()[key]
        madre_health = health["madre"]
        # the module's own fields (within 4 KiB), the gateway's winning a clash
        assert (madre_health["module"], madre_health["uptime_s"], madre_health["db"]) == ("madre", 12, "ok")
        assert madre_health["status"] == "ok" and madre_health["url"] == madre.url
        assert "blob" not in madre_health
        assert health["shubniggurath"]["module"] == "shubniggurath"
        assert "module" not in health["switch"]  # unreachable: only the gateway's fields


def test_flat_ws_event_is_broadcast_flat_to_every_client_the_sender_included(gateway) -> None:
    async def go() -> None:
        sender, _ = await connect(gateway, "client_id=operator-ui")
        other, _ = await connect(gateway, "client_id=madre")
        text = orjson.dumps({"type": "system.alert", **ALERT}).decode()
        await sender.send(text)
        assert await asyncio.wait_for(sender.recv(), 10) == text  # the echo first
        frames = [await next_frame(ws) for ws in (sender, other)]
        assert frames[0] == frames[1]
        frame: dict[str, Any] = frames[0]
        assert frame["channel"] == "event" and frame["type"] == "system.alert" and frame["payload"] == ALERT
        assert (frame["alert_id"], frame["severity"], frame["message"]) == ("a-1", "L3", "disk almost full")
        for ws in (sender, other):
            await ws.close()
    run(go())

