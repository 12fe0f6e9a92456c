"""The hot pure pieces of a request, each timed alone with pytest-benchmark.

    .venv/bin/pytest bench/micro --benchmark-only

Each benchmark also checks its result, so a figure is never the cost of a wrong answer.
"""

from __future__ import annotations

import h11
import orjson
import pytest

from edgelink.api import health as health_api
from edgelink.api import modules as modules_api
from edgelink.app import build_router
from edgelink.gateway.breaker import Breaker
from edgelink.gateway.events import (
    SCHEMAS,
    SchemaRejected,
    parse_ingest,
    schema_problem,
)
from edgelink.gateway.sessions import SessionStore
from edgelink.http.messages import HTTPError, json_response
from edgelink.jsonbounds import parse_json

from .inputs import (
    ALERT_PAYLOAD,
    BODY_1K_BRACKETY,
    BODY_1K_FLAT,
    INGEST_BODY,
    INVALID_INGEST_BODY,
    run_sync,
)

NOW_MS = 1_763_776_000_123
ALERT = SCHEMAS["system.alert"]

# --------------------------------------------------------------------------- event validation


def test_decode_ingest_body(benchmark):
    raw = orjson.dumps(INGEST_BODY)
    assert benchmark(orjson.loads, raw) == INGEST_BODY


@pytest.mark.parametrize("doc", [BODY_1K_FLAT, BODY_1K_BRACKETY], ids=["flat", "brackety"])
def test_orjson_loads_1k(benchmark, doc):
    raw = orjson.dumps(doc)
    assert 900 < len(raw) < 1300
    assert benchmark(orjson.loads, raw) == doc


@pytest.mark.parametrize("doc", [BODY_1K_FLAT, BODY_1K_BRACKETY], ids=["flat", "brackety"])
def test_parse_json_depth_checked_1k(benchmark, doc):
    # the same parse behind the depth limit every client body goes through (API.md §1)
    raw = orjson.dumps(doc)
    assert benchmark(parse_json, raw) == doc


def test_schema_problem_valid(benchmark):
    assert benchmark(schema_problem, ALERT, ALERT_PAYLOAD) is None


def test_schema_problem_invalid(benchmark):
    problem = benchmark(schema_problem, ALERT, INVALID_INGEST_BODY["payload"])
    assert problem == "payload.timestamp: expected int, got bool"


def test_parse_ingest_valid(benchmark):
    event = benchmark(parse_ingest, INGEST_BODY, NOW_MS)
    assert event.canonical and not event.broadcast and event.seq is None


def test_parse_ingest_invalid(benchmark):
    def rejected() -> SchemaRejected | None:
        try:
            parse_ingest(INVALID_INGEST_BODY, NOW_MS)
        except SchemaRejected as exc:
            return exc
        return None

    assert benchmark(rejected).detail == "payload.timestamp: expected int, got bool"


# --------------------------------------------------------------------------- routing

@pytest.fixture(scope="module")
def router():
    return build_router()


def test_route_static(benchmark, router):
    route, params = benchmark(router.match, "POST", "/events/ingest")
    assert route.template == "/events/ingest" and params == {}


def test_route_templated(benchmark, router):
    route, params = benchmark(router.match, "GET", "/operator/session/3f2a9c1e")
    assert route.template == "/operator/session/{session_id}" and params == {"session_id": "3f2a9c1e"}


def test_route_not_found(benchmark, router):
    def miss() -> int:
        try:
            router.match("GET", "/no/such/path")
        except HTTPError as exc:
            return exc.status
        return 200

    assert benchmark(miss) == 404


# --------------------------------------------------------------------------- JSON of the common responses

def test_encode_health_body(benchmark):
    # edgelink encodes this body once at import; this is what encoding it per request would cost
    assert benchmark(orjson.dumps, health_api._BODY) == health_api._OK


def test_health_handler(benchmark):
    request = type("Req", (), {"runtime": type("Runtime", (), {"stopping": False})()})()
    response = benchmark(lambda: run_sync(health_api.health(request)))
    assert response.status == 200 and response.body == health_api._OK


def test_encode_ingest_201(benchmark):
    event = parse_ingest(INGEST_BODY, NOW_MS).with_seq(123_456)

    def answer():  # as edgelink.api.events.ingest builds it
        return json_response({
            "status": "received", "event_id": event.event_id, "seq": event.seq, "source": event.source,
            "type": event.type, "canonical": event.canonical, "broadcast": event.broadcast,
        }, 201)

    response = benchmark(answer)
    assert response.status == 201 and orjson.loads(response.body)["seq"] == 123_456


def test_status_handler_nine_modules(benchmark, status_request):
    # the real handler: body with nine ModuleHealth entries, ports, ISO timestamp, orjson
    response = benchmark(lambda: run_sync(modules_api.status(status_request)))
    body = orjson.loads(response.body)
    assert response.status == 200 and len(body["modules"]) == 9
    assert body["summary"] == {"healthy_modules": 9, "total_modules": 9, "all_healthy": True}


# --------------------------------------------------------------------------- breaker decisions

def test_breaker_closed_success(benchmark):
    breaker = Breaker(3, 60.0)

    def call() -> None:
        breaker.record_success(breaker.allow())

    benchmark(call)
    assert breaker.state == "closed"


def test_breaker_closed_failure(benchmark):
    breaker = Breaker(10**12, 60.0)  # a threshold never reached: every failure is counted, none trips

    def call() -> None:
        breaker.record_failure(breaker.allow())

    benchmark(call)
    assert breaker.state == "closed"


def test_breaker_open_refuses(benchmark):
    breaker = Breaker(3, 60.0)
    for _ in range(3):
        breaker.record_failure(breaker.allow())
    assert breaker.state == "open"
    assert benchmark(breaker.allow) is None


def test_breaker_open_stale_verdict(benchmark):
    breaker = Breaker(3, 60.0)
    ticket = breaker.allow()  # a call admitted while closed ...
    for _ in range(3):
        breaker.record_failure(breaker.allow())

    def late() -> None:  # ... whose failure arrives after the breaker opened: ignored
        breaker.allow()
        breaker.record_failure(ticket)

    benchmark(late)
    assert breaker.snapshot()["failure_count"] == 3


# --------------------------------------------------------------------------- Context-7 sessions

MESSAGE = ("The gateway routes each request to a module and records the answer in the session so "
           "that the next turn can see what was said before.")


@pytest.fixture()
def full_session():
    """A store with defaults (100 messages per session) and one full session: appending drops
    the oldest message, the steady state of a long chat."""
    store = SessionStore(ttl=3600.0, max_sessions=10_000, max_messages=100, max_bytes=16 * 1024 * 1024)
    sid = store.open(None, "operator")
    for i in range(100):
        store.append(sid, "user" if i % 2 == 0 else "assistant", MESSAGE)
    return store, sid


def test_session_append(benchmark, full_session):
    store, sid = full_session
    assert benchmark(store.append, sid, "user", MESSAGE) is True
    assert len(store.view(sid)["messages"]) == 100


def test_session_context_summary(benchmark, full_session):
    store, sid = full_session
    summary = benchmark(store.context_summary, sid)
    assert summary.count("\n") == 9 and summary.startswith("user: ")  # the last 10 of 100, from #90


# --------------------------------------------------------------------------- transport baseline

REQUEST = (b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUser-Agent: wrk\r\n"
           b"Accept: */*\r\n\r\n")


def test_h11_parse_get(benchmark):
    """What edgelink's transport asks of h11 per request: a fresh ``h11.Connection`` (the server
    makes one per keep-alive cycle) parsing a GET up to its end. Responses are serialized by
    the transport itself (edgelink/http/server.py), not by h11."""

    def parse() -> h11.Request:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=8192)
        conn.receive_data(REQUEST)
        request = conn.next_event()
        end = conn.next_event()
        assert type(end) is h11.EndOfMessage
        return request

    request = benchmark(parse)
    assert type(request) is h11.Request and request.target == b"/health"


def test_h11_get_cycle(benchmark):
    """One keep-alive request/response cycle through h11 alone: parse a GET, send a small JSON
    answer with edgelink's headers. What the transport would cost if h11 also serialized the
    responses, as it did before (compare with ``test_h11_parse_get``)."""
    conn = h11.Connection(h11.SERVER)
    body = health_api._OK
    headers = [(b"date", b"Sat, 22 Nov 2026 02:00:00 GMT"), (b"server", b"edgelink"),
               (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]

    def cycle() -> bytes:
        conn.receive_data(REQUEST)
        request = conn.next_event()
        end = conn.next_event()
        assert type(request) is h11.Request and type(end) is h11.EndOfMessage
        out = conn.send(h11.Response(status_code=200, headers=headers, reason=b"OK"))
        out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
        conn.start_next_cycle()
        return out

    out = benchmark(cycle)
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(body)
