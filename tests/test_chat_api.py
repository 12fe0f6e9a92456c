"""Chat with fallback and the Context-7 session endpoints (API.md §4), over real sockets:
the installed ``edgelink serve`` in front of real loopback switch and madre servers
(``FakeModule``), whose URLs reach the gateway through the environment.

Modules a test does not use point at a closed loopback port.
"""

from __future__ import annotations

import collections
import select
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import (
    TOKEN,
    Gateway,
    RawClient,
    Reply,
    assert_error,
    log_records,
    metric,
    module_env,
    received,
    wait_until,
)
from fakemodule import ERROR_500, HANG, HEALTHY, NOT_JSON, FakeModule

SWITCH_PATH = "/switch/route-v5"
MADRE_PATH = "/madre/chat"
CID = "corr-chat-0123456789"
CHAT_FIELDS = {"session_id", "response", "model_used", "provider", "latency_ms", "correlation_id", "status",
               "degraded"}
OUTGOING_FIELDS = {"message", "session_id", "user_id", "context_summary", "metadata", "correlation_id"}


# --- helpers ---------------------------------------------------------------------------


def chat(gw: Gateway, body: Any, path: str = "/operator/chat", **kw: Any) -> Reply:
    headers = {"X-Correlation-ID": CID, **kw.pop("headers", {})}
    return gw.post(path, body, headers=headers, **kw)


def locs(reply: Reply) -> list[list[Any]]:
    body = assert_error(reply, 422, "validation_error")
    assert all(isinstance(d["msg"], str) and d["msg"] for d in body["detail"])
    return [d["loc"] for d in body["detail"]]


@pytest.fixture
def switch(fake) -> FakeModule:
    module = fake("switch")
    module.reply(SWITCH_PATH, {"response": "hello from switch", "model_used": "deepseek-r1"})
    return module


@pytest.fixture
def madre(fake) -> FakeModule:
    module = fake("madre")
    module.reply(MADRE_PATH, {"response": "hello from madre", "model": "llama-small"})
    return module


# --- auth and the happy path --------------------------------------------------------------


def test_chat_and_session_endpoints_need_the_token(gateway) -> None:
    for method, path in (("POST", "/operator/chat"), ("POST", "/operator/api/chat"),
                         ("GET", "/operator/session/abc"), ("DELETE", "/operator/session/abc"),
                         ("GET", "/vx11/context-7/sessions")):
        body = {"message": "hi"} if method == "POST" else None
        assert_error(gateway.request(method, path, body, token=False), 401, "auth_required")
        assert_error(gateway.request(method, path, body, headers={"X-VX11-Token": "wrong"}), 403, "forbidden")


@pytest.mark.parametrize("path", ["/operator/chat", "/operator/api/chat"])
def test_chat_answers_from_switch(switch, madre, gateway_factory, path) -> None:
    gw = gateway_factory(module_env({"switch": switch, "madre": madre}))
    reply = chat(gw, {"message": "hi there", "user_id": "u-1", "metadata": {"channel": "web", "n": 1}}, path)
    assert reply.status == 200, reply.body
    assert reply.headers["x-correlation-id"] == CID
    body = reply.json()
    assert set(body) == CHAT_FIELDS
    assert isinstance(body["session_id"], str) and uuid.UUID(body["session_id"]).version == 4
    assert body["response"] == "hello from switch"
    assert body["model_used"] == "deepseek-r1"
    assert body["provider"] == "switch"
    assert type(body["latency_ms"]) in (int, float) and 0 <= body["latency_ms"] < 30_000
    assert body["correlation_id"] == CID
    assert body["status"] == "ok"
    assert body["degraded"] is False

    [call] = received(switch, SWITCH_PATH)
    assert call.method == "POST"
    assert set(call.json) == OUTGOING_FIELDS
    assert call.json == {"message": "hi there", "session_id": body["session_id"], "user_id": "u-1",
                         "context_summary": "user: hi there", "metadata": {"channel": "web", "n": 1},
                         "correlation_id": CID}
    assert call.headers["x-correlation-id"] == CID
    assert call.headers["x-vx11-token"] == TOKEN
    assert received(madre, MADRE_PATH) == []

    # Without optional fields they are sent as Tentáculo Link sent them ("local", {}), and the
    # gateway makes a correlation id.
    reply = gw.post(path, {"message": "again"})
    assert reply.status == 200
    generated = reply.headers["x-correlation-id"]
    assert reply.json()["correlation_id"] == generated
    last = received(switch, SWITCH_PATH)[-1]
    assert last.json["user_id"] == "local" and last.json["metadata"] == {}
    assert last.json["correlation_id"] == generated and last.headers["x-correlation-id"] == generated
    assert last.json["session_id"] != body["session_id"]  # a new session


# --- fallback to madre --------------------------------------------------------------------


FAILURES = ["down", "hang", "error_500", "not_json", "no_text", "blank_text", "client_error"]


@pytest.mark.parametrize("failure", FAILURES)
def test_chat_falls_back_to_madre(switch, madre, gateway_factory, tmp_path: Path, failure: str) -> None:
    args: list[str] = []
    fakes = {"switch": switch, "madre": madre}
    if failure == "down":
        del fakes["switch"]
    elif failure == "hang":
        switch.behave(SWITCH_PATH, HANG)
        config = tmp_path / "chat.toml"
        config.write_text("[routes.chat]\ntimeout = 0.5\n")  # keeps the default fallback
        args = ["--config", str(config)]
    elif failure == "error_500":
        switch.behave(SWITCH_PATH, ERROR_500)
    elif failure == "not_json":
        switch.behave(SWITCH_PATH, NOT_JSON)
    elif failure == "no_text":
        switch.reply(SWITCH_PATH, {"model_used": "deepseek-r1", "status": "ok"})
    elif failure == "blank_text":
        switch.reply(SWITCH_PATH, {"response": "   ", "model_used": "deepseek-r1"})
    elif failure == "client_error":
        switch.reply(SWITCH_PATH, {"response": "rate limited"}, status=429)
    gw = gateway_factory(module_env(fakes), args=args)

    started = time.monotonic()
    reply = chat(gw, {"message": "are you there?", "session_id": "sess-fb", "user_id": "u-2"})
    elapsed = time.monotonic() - started
    assert reply.status == 200, reply.body
    body = reply.json()
    assert set(body) == CHAT_FIELDS | {"model"}  # madre's own field passed through
    assert body["degraded"] is True and body["provider"] == "madre"
    assert body["response"] == "hello from madre" and body["model_used"] == "llama-small"
    assert body["session_id"] == "sess-fb" and body["correlation_id"] == CID and body["status"] == "ok"

    [fallback] = received(madre, MADRE_PATH)
    assert fallback.method == "POST" and fallback.headers["x-correlation-id"] == CID
    assert fallback.json == {"message": "are you there?", "session_id": "sess-fb", "user_id": "u-2",
                             "context_summary": "user: are you there?", "metadata": {}, "correlation_id": CID}
    if failure != "down":
        [primary] = received(switch, SWITCH_PATH)
        assert primary.json == fallback.json  # the fallback gets the same body
    if failure == "hang":
        assert 0.4 < elapsed < 10, elapsed  # the chat route's 0.5 s timeout, not the default 15 s

    session = gw.get("/operator/session/sess-fb").json()
    assert [(m["role"], m["content"]) for m in session["messages"]] == \
        [("user", "are you there?"), ("assistant", "hello from madre")]


def test_chat_falls_back_when_the_switch_breaker_is_open(switch, madre, gateway_factory) -> None:
    gw = gateway_factory(module_env({"switch": switch, "madre": madre}, EDGELINK_BREAKER_FAILURES="1",
                                    EDGELINK_BREAKER_RECOVERY="60"))
    switch.behave(SWITCH_PATH, ERROR_500)
    first = chat(gw, {"message": "one"})
    assert first.status == 200 and first.json()["degraded"] is True
    assert gw.get("/vx11/circuit-breaker/status").json()["breakers"]["switch"]["state"] == "open"

    switch.behave(SWITCH_PATH, HEALTHY)  # healthy again, but its breaker is open
    second = chat(gw, {"message": "two"})
    assert second.status == 200
    body = second.json()
    assert body["degraded"] is True and body["provider"] == "madre" and body["response"] == "hello from madre"
    assert len(received(switch, SWITCH_PATH)) == 1  # the open breaker kept switch out of it
    assert len(received(madre, MADRE_PATH)) == 2


def test_chat_unavailable_when_switch_and_madre_fail(switch, madre, gateway_factory) -> None:
    gw = gateway_factory(module_env())  # both down
    body = assert_error(chat(gw, {"message": "anyone?", "session_id": "sess-dark"}), 503, "chat_unavailable",
                        session_id="sess-dark", correlation_id=CID)
    assert "degraded" not in body
    body = assert_error(chat(gw, {"message": "anyone?"}), 503, "chat_unavailable", correlation_id=CID)
    assert isinstance(body["session_id"], str) and body["session_id"]

    # Both answering, but neither usefully.
    switch.behave(SWITCH_PATH, ERROR_500)
    madre.reply(MADRE_PATH, {"status": "busy"})
    gw2 = gateway_factory(module_env({"switch": switch, "madre": madre}))
    assert_error(chat(gw2, {"message": "anyone?", "session_id": "s2"}), 503, "chat_unavailable",
                 session_id="s2", correlation_id=CID)
    assert len(received(switch, SWITCH_PATH)) == 1 and len(received(madre, MADRE_PATH)) == 1


# --- reply text and model ---------------------------------------------------------------


def test_reply_text_and_model_are_picked_in_order(switch, madre, gateway_factory) -> None:
    gw = gateway_factory(module_env({"switch": switch, "madre": madre}))
    cases = [
        ({"response": "r", "message": "m", "text": "t", "content": "c", "model_used": "mu", "model": "mo"},
         "r", "mu"),
        ({"message": "m", "text": "t", "content": "c", "model": "mo"}, "m", "mo"),
        ({"text": "t", "content": "c"}, "t", "switch"),
        ({"content": "c", "model_used": None, "model": "mo"}, "c", "mo"),
        ({"response": "", "message": "m"}, "m", "switch"),  # an empty text is no text
        ({"response": "r", "model_used": 7, "model": "mo"}, "r", "mo"),  # a model that is not a name
        ({"response": "r", "model_used": {"name": "x"}}, "r", "switch"),
    ]
    for data, text, model in cases:
        switch.reply(SWITCH_PATH, data)
        reply = chat(gw, {"message": "q"})
        assert reply.status == 200
        body = reply.json()
        assert (body["response"], body["model_used"], body["provider"], body["degraded"]) == \
            (text, model, "switch", False), (data, body)

    # The fallback's model defaults to its provider name.
    switch.behave(SWITCH_PATH, ERROR_500)
    madre.reply(MADRE_PATH, {"content": "from madre"})
    body = chat(gw, {"message": "q"}).json()
    assert (body["response"], body["model_used"], body["provider"], body["degraded"]) == \
        ("from madre", "madre", "madre", True)


# --- validation -----------------------------------------------------------------------------


def test_chat_validation(switch, gateway_factory) -> None:
    gw = gateway_factory(module_env({"switch": switch}))
    assert locs(chat(gw, {})) == [["body", "message"]]
    assert locs(chat(gw, {"message": None})) == [["body", "message"]]
    assert locs(chat(gw, {"message": ""})) == [["body", "message"]]
    assert locs(chat(gw, {"message": 5})) == [["body", "message"]]
    assert locs(chat(gw, {"message": "x" * 32_769})) == [["body", "message"]]
    assert locs(chat(gw, {"message": "hi", "session_id": 123})) == [["body", "session_id"]]
    assert locs(chat(gw, {"message": "hi", "user_id": ["u"]})) == [["body", "user_id"]]
    assert locs(chat(gw, {"message": "hi", "metadata": "not an object"})) == [["body", "metadata"]]
    assert locs(chat(gw, {"message": "hi", "metadata": [1, 2]})) == [["body", "metadata"]]
    assert sorted(locs(chat(gw, {"session_id": 1, "metadata": 2}))) == \
        [["body", "message"], ["body", "metadata"], ["body", "session_id"]]  # every problem at once
    for not_an_object in (b'[{"message": "hi"}]', b'"hi"', b"5", b"null"):
        assert locs(chat(gw, None, raw=not_an_object)) == [["body"]], not_an_object
    for raw in (b'{"message": "hi"', b"not json", b""):
        assert_error(gw.request("POST", "/operator/chat", raw=raw, headers={"X-Correlation-ID": CID}),
                     400, "invalid_json", correlation_id=CID)
    assert switch.requests == []  # nothing invalid reached the module

    # The bound is inclusive and counted in characters, not bytes.
    for message in ("x" * 32_768, "é" * 32_768, "x"):
        reply = chat(gw, {"message": message})
        assert reply.status == 200, reply.body
        assert received(switch, SWITCH_PATH)[-1].json["message"] == message
    assert locs(chat(gw, {"message": "é" * 32_769})) == [["body", "message"]]


def test_session_and_user_ids_are_at_most_256_characters(switch, gateway_factory) -> None:
    gw = gateway_factory(module_env({"switch": switch}))
    assert locs(chat(gw, {"message": "hi", "user_id": "u" * 257})) == [["body", "user_id"]]
    assert locs(chat(gw, {"message": "hi", "session_id": "s" * 257})) == [["body", "session_id"]]
    assert sorted(locs(chat(gw, {"message": "", "session_id": "s" * 300, "user_id": "u" * 1_000_000}))) == \
        [["body", "message"], ["body", "session_id"], ["body", "user_id"]]
    assert switch.requests == []
    assert gw.get("/vx11/context-7/sessions").json()["total"] == 0  # nothing was stored
    reply = chat(gw, {"message": "hi", "session_id": "é" * 256, "user_id": "ü" * 256})
    assert reply.status == 200, reply.body
    assert gw.get("/operator/session/" + "%C3%A9" * 256).json()["user_id"] == "ü" * 256


# --- sessions ---------------------------------------------------------------------------


def test_session_history_summary_listing_and_delete(switch, gateway_factory) -> None:
    gw = gateway_factory(module_env({"switch": switch}))
    sid = "sess-five"
    for i in range(1, 6):
        switch.reply(SWITCH_PATH, {"response": f"answer {i}", "model_used": "m"})
        reply = chat(gw, {"message": f"question {i}", "session_id": sid, "user_id": "u-5",
                          "metadata": {"turn": i}})
        assert reply.status == 200 and reply.json()["session_id"] == sid

    calls = received(switch, SWITCH_PATH)
    assert [c.json["session_id"] for c in calls] == [sid] * 5
    expected = [f"user: question {i}\nassistant: answer {i}" for i in range(1, 5)] + ["user: question 5"]
    assert calls[4].json["context_summary"] == "\n".join(expected)

    reply = gw.get(f"/operator/session/{sid}")
    assert reply.status == 200
    session = reply.json()
    assert set(session) == {"session_id", "user_id", "summary", "created_at", "last_active_at", "expires_at",
                            "message_count", "messages"}
    assert session["session_id"] == sid and session["user_id"] == "u-5"
    assert session["message_count"] == 10 and len(session["messages"]) == 10
    now_ms = time.time() * 1000
    for key in ("created_at", "last_active_at"):
        assert type(session[key]) is int and abs(session[key] - now_ms) < 60_000  # epoch ms
    assert session["created_at"] <= session["last_active_at"]
    assert session["expires_at"] == pytest.approx(session["last_active_at"] + 3_600_000, abs=1)
    messages = session["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 5
    assert [m["content"] for m in messages] == [x for i in range(1, 6) for x in (f"question {i}", f"answer {i}")]
    for m in messages:
        assert set(m) == {"role", "content", "timestamp", "metadata"}
        assert type(m["timestamp"]) is int and abs(m["timestamp"] - now_ms) < 60_000
    assert [m["metadata"] for m in messages[::2]] == [{"turn": i} for i in range(1, 6)]
    assert [m["timestamp"] for m in messages] == sorted(m["timestamp"] for m in messages)

    listing = gw.get("/vx11/context-7/sessions").json()
    assert set(listing) == {"sessions", "total"} and listing["total"] == len(listing["sessions"]) == 1
    [entry] = listing["sessions"]
    assert entry == {"session_id": sid, "created_at": session["created_at"], "expires_at": session["expires_at"],
                     "message_count": 10}

    reply = gw.request("DELETE", f"/operator/session/{sid}")
    assert reply.status == 204 and reply.body == b""
    assert_error(gw.get(f"/operator/session/{sid}"), 404, "session_not_found")
    assert_error(gw.request("DELETE", f"/operator/session/{sid}"), 404, "session_not_found")
    assert gw.get("/vx11/context-7/sessions").json() == {"sessions": [], "total": 0}
    assert_error(gw.get("/operator/session/never-existed"), 404, "session_not_found")


def test_idle_session_expires_and_its_id_starts_afresh(switch, gateway_factory) -> None:
    gw = gateway_factory(module_env({"switch": switch}, CONTEXT7_TTL_SECONDS="1",
                                    CONTEXT7_CLEANUP_INTERVAL="0.2"))
    sid = "sess-idle"
    assert chat(gw, {"message": "first", "session_id": sid}).status == 200
    assert chat(gw, {"message": "second", "session_id": sid}).status == 200
    assert gw.get(f"/operator/session/{sid}").json()["message_count"] == 4
    assert metric(gw, "edgelink_context7_sessions") == 1

    wait_until(lambda: metric(gw, "edgelink_context7_sessions") == 0, why="swept, not only hidden")
    assert_error(gw.get(f"/operator/session/{sid}"), 404, "session_not_found")
    assert gw.get("/vx11/context-7/sessions").json() == {"sessions": [], "total": 0}

    reply = chat(gw, {"message": "back again", "session_id": sid})
    assert reply.status == 200 and reply.json()["session_id"] == sid
    assert received(switch, SWITCH_PATH)[-1].json["context_summary"] == "user: back again"
    session = gw.get(f"/operator/session/{sid}").json()
    assert session["message_count"] == 2
    assert [m["content"] for m in session["messages"]] == ["back again", "hello from switch"]


# --- the gateway's own fd shortage is not a module failure --------------------------------

# Execs the gateway with a low open-files limit, soft and hard alike (so it cannot raise it).
FD_LIMIT = 100
LOW_FD_LAUNCHER = [sys.executable, "-c",
                   "import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, "
                   f"({FD_LIMIT}, {FD_LIMIT})); os.execv(sys.argv[1], sys.argv[1:])"]


def test_running_out_of_fds_does_not_open_healthy_modules_breakers(switch, madre, gateway_factory,
                                                                  tmp_path: Path) -> None:
    switch.behave(SWITCH_PATH, HANG)
    config = tmp_path / "chat.toml"
    config.write_text("[routes.chat]\ntimeout = 8\n")
    gw = gateway_factory(module_env({"switch": switch, "madre": madre}, EDGELINK_MAX_CONNECTIONS="64"),
                         args=["--config", str(config)], launcher=LOW_FD_LAUNCHER)
    body = orjson.dumps({"message": "hello"})
    request = (b"POST /operator/chat HTTP/1.1\r\nHost: t\r\nX-VX11-Token: %s\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (TOKEN.encode(), len(body), body))
    clients = []
    for _ in range(60):  # more chats than fds left for calls to modules once they are accepted
        sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        sock.sendall(request)
        clients.append(RawClient(sock))
    statuses: dict[int, int] = {}
    codes: set[str] = set()
    waiting = []
    gw.wait_idle()  # the refusals are immediate; the others wait on switch until the route timeout
    answered, _, _ = select.select([c.sock for c in clients], [], [], 0)
    for client in clients:
        if client.sock not in answered:
            waiting.append(client)  # its call to switch hangs: it holds an fd
            continue
        try:
            status, _, reply = client.read_response(timeout=5)
        except ConnectionError:  # not accepted at all: the accept loop's business, not this test's
            continue
        statuses[status] = statuses.get(status, 0) + 1
        codes.add(orjson.loads(reply)["error"] if status != 200 else "ok")
        client.sock.close()
    assert statuses.get(503, 0) > 0 and waiting, (statuses, len(waiting))
    # never chat_unavailable: no module failed (a fallback may find an fd freed meanwhile)
    assert "gateway_overloaded" in codes and codes <= {"gateway_overloaded", "ok"}, codes
    # While the fds are all taken nothing more is accepted. Switch really hangs: its calls
    # time out (its own failures), and madre, whose breaker the shortage never touched,
    # answers them (unless connections accepted meanwhile took the fds again).
    answers = []
    for client in waiting:
        status, _, reply = client.read_response(timeout=20)
        answers.append(orjson.loads(reply).get("provider") if status == 200 else orjson.loads(reply)["error"])
        client.sock.close()
    assert "madre" in answers and set(answers) <= {"madre", "chat_unavailable"}, answers
    breakers = gw.get("/vx11/circuit-breaker/status").json()["breakers"]
    assert (breakers["madre"]["state"], breakers["madre"]["failure_count"]) == ("closed", 0), breakers
    assert breakers["switch"]["state"] == "open", breakers
    assert 'edgelink_budget_refusals_total{budget="file_descriptors"}' in \
        gw.get("/metrics", token=False).body.decode()
    # logged once per module until a call to it gets through again (madre may answer in
    # between and then meet the shortage again), never once per refused call
    per_module = collections.Counter(r.get("module") for r in log_records(gw.log_path)
                                     if r.get("event") == "gateway_overloaded")
    assert per_module and max(per_module.values()) <= 2, (per_module, statuses)
    reply = chat(gw, {"message": "and now?"})
    assert reply.status == 200 and reply.json()["provider"] == "madre", reply.body
