"""Health aggregation, breakers, the route table, intents and module proxies (API.md §2, §3),
over real sockets: the installed ``edgelink serve`` in front of real loopback module servers
(``FakeModule``), whose URLs reach the gateway through the environment as in production.

Modules a test does not use point at a closed loopback port. Timing assertions are loose on
purpose (a shared 2-core box); measurements are printed with a ``MEASURE`` prefix (``-s``).
"""

from __future__ import annotations

import http.client
import re
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import orjson
import pytest

from conftest import TOKEN, URL_ENV, Gateway, Reply, assert_error, module_env, received, wait_until
from edgelink.config import MODULE_DEFAULTS
from fakemodule import (
    CLOSE_AFTER_REPLY,
    CLOSE_BEFORE_REPLY,
    CLOSE_MID_REPLY,
    ERROR_500,
    HANG,
    HEALTHY,
    HUGE,
    HUGE_CHUNKED,
    NOT_HTTP,
    NOT_JSON,
)

NAMES = [name for name, _, _ in MODULE_DEFAULTS]
HEALTH_STATUSES = {"ok", "error", "unreachable", "timeout", "disabled"}
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
CID = "corr-modules-0123456789"

DEFAULT_ROUTES = {
    "chat": ("switch", "/switch/route-v5", 15.0),
    "code": ("switch", "/switch/route-v5", 20.0),
    "audio": ("hermes", "/hermes/analyze-audio", 30.0),
    "analysis": ("madre", "/madre/task", 60.0),
    "task": ("madre", "/madre/task", 30.0),
    "spawn": ("spawner", "/spawner/spawn", 30.0),
    "stream": ("switch", "/switch/stream", 60.0),
}


# --- helpers ---------------------------------------------------------------------------


def write_config(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "edgelink.toml"
    path.write_text(text)
    return ["--config", str(path)]


def intent(gw: Gateway, name: str, body: Any = None, **kw: Any) -> Reply:
    headers = {"X-Correlation-ID": CID, **kw.pop("headers", {})}
    return gw.post(f"/vx11/intent/{name}", body if body is not None else {}, headers=headers, **kw)


def concurrently(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run ``fn(i)`` in ``n`` threads released together."""
    barrier = threading.Barrier(n)

    def run(i: int) -> Any:
        barrier.wait(10)
        return fn(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def check_module_health(health: dict[str, Any]) -> None:
    # beside the module's own /health fields (API.md §12)
    assert {"status", "http_code", "latency_ms", "url", "error", "trend", "anomaly_score"} <= set(health), health
    # a gateway just started has no baseline yet (API.md §11)
    assert health["trend"] == "unknown" and health["anomaly_score"] == 0
    assert health["status"] in HEALTH_STATUSES
    assert health["http_code"] is None or (type(health["http_code"]) is int)
    assert health["latency_ms"] is None or (type(health["latency_ms"]) in (int, float) and health["latency_ms"] >= 0)
    assert isinstance(health["url"], str)
    assert health["error"] is None or isinstance(health["error"], str)


def check_status_body(body: dict[str, Any], gw: Gateway) -> None:
    assert set(body) == {"ok", "status", "module", "version", "timestamp", "ports", "modules", "summary"}
    assert body["ok"] is True and body["status"] == "ok"
    assert body["module"] == "tentaculo_link" and body["version"] == "7.0"
    assert ISO_Z.match(body["timestamp"]), body["timestamp"]
    stamp = datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00"))
    assert abs((datetime.now(timezone.utc) - stamp).total_seconds()) < 60
    assert body["ports"]["tentaculo_link"] == gw.port and body["ports"]["gateway"] == gw.port
    assert list(body["modules"]) == NAMES
    for health in body["modules"].values():
        check_module_health(health)
    summary = body["summary"]
    assert set(summary) == {"healthy_modules", "total_modules", "all_healthy"}
    assert type(summary["healthy_modules"]) is int and type(summary["total_modules"]) is int
    assert type(summary["all_healthy"]) is bool
    assert summary["all_healthy"] == (summary["healthy_modules"] == summary["total_modules"])


# --- /vx11/status ------------------------------------------------------------------------


def test_status_with_nine_healthy_modules(fake, gateway_factory) -> None:
    fakes = {name: fake(name) for name in NAMES}
    gw = gateway_factory(module_env(fakes, SHUB_ENABLED="true"))
    for path in ("/vx11/status", "/v1/status"):
        reply = gw.get(path, token=False)  # public
        assert reply.status == 200, reply.body
        assert reply.headers["content-type"].startswith("application/json")
        body = reply.json()
        check_status_body(body, gw)
        assert body["ports"] == {**{name: fakes[name].port for name in NAMES},
                                 "tentaculo_link": gw.port, "gateway": gw.port}
        for name, health in body["modules"].items():
            assert health["status"] == "ok" and health["http_code"] == 200 and health["error"] is None, health
            assert health["url"] == fakes[name].url
            assert health["latency_ms"] is not None
        assert body["summary"] == {"healthy_modules": 9, "total_modules": 9, "all_healthy": True}
    for name in NAMES:
        probes = received(fakes[name], "/health")
        assert probes and probes[0].method == "GET"
        assert probes[0].headers["x-vx11-token"] == TOKEN

    durations = [timed(lambda: gw.get("/vx11/status", token=False))[1] for _ in range(20)]
    median = statistics.median(durations)
    print(f"\nMEASURE /vx11/status nine healthy: median {median * 1000:.1f} ms, "
          f"max {max(durations) * 1000:.1f} ms over 20 calls")
    assert median < 1.0


def test_shub_is_listed_but_not_counted_unless_enabled(fake, gateway_factory) -> None:
    fakes = {name: fake(name) for name in NAMES}
    gw = gateway_factory(module_env(fakes))  # SHUB_ENABLED unset: disabled
    body = gw.get("/vx11/status", token=False).json()
    check_status_body(body, gw)
    assert body["modules"]["shubniggurath"] == {"status": "disabled", "http_code": None, "latency_ms": None,
                                                "url": fakes["shubniggurath"].url, "error": None,
                                                "trend": "unknown", "anomaly_score": 0}
    assert body["ports"]["shubniggurath"] == fakes["shubniggurath"].port
    assert body["summary"] == {"healthy_modules": 8, "total_modules": 8, "all_healthy": True}
    assert received(fakes["shubniggurath"], "/health") == []  # a disabled module is not probed

    # A disabled shub that would fail its probe does not spoil all_healthy either.
    gw2 = gateway_factory(module_env({n: m for n, m in fakes.items() if n != "shubniggurath"},
                                     SHUB_ENABLED="false"))
    body = gw2.get("/v1/status", token=False).json()
    assert body["modules"]["shubniggurath"]["status"] == "disabled"
    assert body["summary"] == {"healthy_modules": 8, "total_modules": 8, "all_healthy": True}

    gw3 = gateway_factory(module_env(fakes, SHUB_ENABLED="true"))
    body = gw3.get("/vx11/status", token=False).json()
    assert body["modules"]["shubniggurath"]["status"] == "ok"
    assert body["summary"] == {"healthy_modules": 9, "total_modules": 9, "all_healthy": True}


def test_status_reports_down_error_and_timeout_within_one_health_timeout(fake, gateway_factory) -> None:
    timeout = 0.5
    fakes = {name: fake(name) for name in NAMES if name not in ("madre", "shubniggurath")}
    fakes["switch"].behave("/health", ERROR_500)
    fakes["hermes"].behave("/health", HANG)
    gw = gateway_factory(module_env(fakes, EDGELINK_HEALTH_TIMEOUT=str(timeout)))  # madre: closed port

    durations = []
    for _ in range(5):
        reply, elapsed = timed(lambda: gw.get("/vx11/status", token=False))
        durations.append(elapsed)
        assert reply.status == 200
        body = reply.json()
        check_status_body(body, gw)
        modules = body["modules"]
        assert modules["madre"]["status"] == "unreachable"
        assert modules["madre"]["http_code"] is None and modules["madre"]["error"]
        assert modules["switch"]["status"] == "error" and modules["switch"]["http_code"] == 500
        assert modules["switch"]["error"]
        assert modules["hermes"]["status"] == "timeout" and modules["hermes"]["http_code"] is None
        assert modules["hermes"]["error"]
        assert modules["hermes"]["latency_ms"] >= timeout * 1000 * 0.8
        for name in ("hormiguero", "manifestator", "mcp", "spawner", "operator"):
            assert modules[name]["status"] == "ok"
        assert modules["shubniggurath"]["status"] == "disabled"
        assert body["summary"] == {"healthy_modules": 5, "total_modules": 8, "all_healthy": False}
        # concurrent probes: about the slowest one, not the sum
        assert timeout * 0.8 < elapsed < timeout * 3, elapsed
    print(f"\nMEASURE /vx11/status one hanging module (health timeout {timeout} s): "
          f"median {statistics.median(durations) * 1000:.1f} ms over {len(durations)} calls")


def test_concurrent_status_callers_share_one_check_round(fake, gateway_factory) -> None:
    fakes = {name: fake(name) for name in NAMES if name != "shubniggurath"}
    fakes["hermes"].behave("/health", HANG)
    gw = gateway_factory(module_env(fakes, EDGELINK_HEALTH_TIMEOUT="1.0"))

    replies = concurrently(10, lambda i: gw.get("/vx11/status", token=False))
    assert all(r.status == 200 for r in replies)
    assert all(r.json()["modules"]["hermes"]["status"] == "timeout" for r in replies)
    hung = len(received(fakes["hermes"], "/health"))
    healthy = len(received(fakes["madre"], "/health"))
    print(f"\nMEASURE 10 concurrent /vx11/status: hanging module saw {hung} /health request(s), "
          f"a healthy one {healthy}")
    # One round for all ten callers (a straggler arriving after it ended may start a second).
    assert 1 <= hung <= 2, hung
    assert 1 <= healthy <= 2, healthy


def test_status_in_flight_during_a_reload_still_answers(fake, gateway_factory, tmp_path) -> None:
    hermes, other = fake("hermes"), fake("hermes2")
    hermes.behave("/health", HANG)
    config = tmp_path / "reload.toml"
    config.write_text(f'[modules.hermes]\nurl = "{hermes.url}"\n')
    env = module_env(EDGELINK_HEALTH_TIMEOUT="2")
    del env[URL_ENV["hermes"]]  # the environment would beat the file's URL
    gw = gateway_factory(env, args=["--config", str(config)])

    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["reply"] = gw.get("/vx11/status", token=False, timeout=6)
        except OSError as exc:  # socket.timeout included
            result["error"] = exc

    thread = threading.Thread(target=call)
    thread.start()
    wait_until(lambda: received(hermes, "/health"), why="the round is in flight")
    config.write_text(f'[modules.hermes]\nurl = "{other.url}"\n')
    gw.proc.send_signal(signal.SIGHUP)
    thread.join(10)
    assert "error" not in result, f"/vx11/status got no answer: {result.get('error')!r}"
    assert result["reply"].status == 200


# --- overview, breakers, routes ---------------------------------------------------------


@pytest.mark.parametrize("path", ["/vx11/overview", "/vx11/circuit-breaker/status", "/vx11/routes"])
def test_module_views_need_the_token(gateway, path) -> None:
    assert_error(gateway.get(path, token=False), 401, "auth_required")
    assert_error(gateway.get(path, headers={"X-VX11-Token": "wrong-token"}), 403, "forbidden")
    assert gateway.get(path).status == 200


def test_overview(fake, gateway_factory) -> None:
    fakes = {name: fake(name) for name in ("madre", "switch", "hermes")}
    gw = gateway_factory(module_env(fakes))
    reply = gw.get("/vx11/overview")
    assert reply.status == 200
    body = reply.json()
    assert set(body) == {"status", "gateway", "version", "modules_health", "summary"}
    assert body["status"] == "ok" and body["gateway"] == "tentaculo_link" and body["version"] == "7.0"
    assert list(body["modules_health"]) == NAMES
    for health in body["modules_health"].values():
        check_module_health(health)
    assert {n for n, h in body["modules_health"].items() if h["status"] == "ok"} == set(fakes)
    assert body["modules_health"]["spawner"]["status"] == "unreachable"
    assert body["modules_health"]["shubniggurath"]["status"] == "disabled"
    assert body["summary"] == {"total_modules": 8, "healthy": 3, "unhealthy": 5}


def test_circuit_breaker_status_shape(gateway) -> None:
    reply = gateway.get("/vx11/circuit-breaker/status")
    assert reply.status == 200
    body = reply.json()
    assert set(body) == {"status", "breakers", "timestamp"}
    assert body["status"] == "ok"
    assert isinstance(body["timestamp"], float) and abs(body["timestamp"] - time.time()) < 60  # seconds
    assert set(body["breakers"]) == set(NAMES) - {"shubniggurath"}  # one per enabled module
    for breaker in body["breakers"].values():
        assert breaker == {"state": "closed", "failure_count": 0, "last_failure": None}


def test_routes_lists_the_seven_default_intents(gateway) -> None:
    routes = gateway.get("/vx11/routes").json()["routes"]
    assert set(routes) == set(DEFAULT_ROUTES)
    for name, (module, endpoint, timeout) in DEFAULT_ROUTES.items():
        route = routes[name]
        assert set(route) == {"module", "endpoint", "method", "timeout", "description", "auth_required",
                              "stream", "fallback"}
        assert route["stream"] is (name == "stream")
        assert (route["module"], route["endpoint"], route["method"], route["timeout"]) == \
            (module, endpoint, "POST", timeout), (name, route)
        assert isinstance(route["description"], str) and route["description"]
        assert route["auth_required"] is True
        if name == "chat":
            assert route["fallback"] == {"module": "madre", "endpoint": "/madre/chat", "method": "POST",
                                         "timeout": 5.0}
        else:
            assert route["fallback"] is None


def test_custom_route_from_the_config_file_is_listed_and_callable(fake, gateway_factory, tmp_path) -> None:
    hermes = fake("hermes")
    hermes.reply("/hermes/echo", {"echoed": True})
    args = write_config(tmp_path, """
[routes.echo]
module = "hermes"
endpoint = "/hermes/echo"
method = "POST"
timeout = 2.5
description = "Echo, for tests"
""")
    gw = gateway_factory(module_env({"hermes": hermes}), args=args)
    routes = gw.get("/vx11/routes").json()["routes"]
    assert set(routes) == set(DEFAULT_ROUTES) | {"echo"}
    assert routes["echo"] == {"module": "hermes", "endpoint": "/hermes/echo", "method": "POST", "timeout": 2.5,
                              "description": "Echo, for tests", "auth_required": True, "stream": False,
                              "fallback": None}
    reply = intent(gw, "echo", {"say": "hello"})
    assert reply.status == 200 and reply.json() == {"echoed": True}
    [request] = received(hermes, "/hermes/echo")
    assert request.method == "POST" and request.json == {"say": "hello"}


# --- POST /vx11/intent/{intent} ---------------------------------------------------------


def test_intent_forwards_body_token_and_correlation_id(fake, gateway_factory) -> None:
    madre = fake("madre")
    madre.reply("/madre/task", {"task_id": "t-1", "accepted": True}, status=202)
    gw = gateway_factory(module_env({"madre": madre}))
    payload = {"task": "summarise", "n": 3, "nested": {"a": [1, 2.5, None, "ü"]}}

    reply = intent(gw, "task", payload)
    assert reply.status == 202 and reply.json() == {"task_id": "t-1", "accepted": True}
    assert reply.headers["x-correlation-id"] == CID
    [request] = received(madre, "/madre/task")
    assert request.method == "POST"
    assert request.json == payload
    assert request.headers["x-vx11-token"] == TOKEN
    assert request.headers["x-correlation-id"] == CID
    assert request.headers["content-type"].startswith("application/json")

    # Without a caller id the gateway makes one, and the module sees the same one.
    reply = gw.post("/vx11/intent/analysis", {"q": 1})
    assert reply.status == 202
    generated = reply.headers["x-correlation-id"]
    assert generated and generated != CID
    assert received(madre, "/madre/task")[-1].headers["x-correlation-id"] == generated

    # An empty body is forwarded as an empty object.
    assert gw.request("POST", "/vx11/intent/task").status == 202
    assert received(madre, "/madre/task")[-1].json == {}

    # An unusable caller id (over 128 chars) is replaced, and the module sees the replacement.
    reply = intent(gw, "task", headers={"X-Correlation-ID": "x" * 129})
    replaced = reply.headers["x-correlation-id"]
    assert reply.status == 202 and replaced != "x" * 129
    assert received(madre, "/madre/task")[-1].headers["x-correlation-id"] == replaced

    assert TOKEN not in gw.logs()


def test_intent_passes_a_module_4xx_through_without_counting_it(fake, gateway_factory) -> None:
    madre = fake("madre")
    madre.reply("/madre/task", {"detail": "task field missing"}, status=422)
    gw = gateway_factory(module_env({"madre": madre}, EDGELINK_BREAKER_FAILURES="3"))
    for _ in range(5):
        reply = intent(gw, "task", {"x": 1})
        assert reply.status == 422 and reply.json() == {"detail": "task field missing"}
    assert len(received(madre, "/madre/task")) == 5
    assert gw.get("/vx11/circuit-breaker/status").json()["breakers"]["madre"]["state"] == "closed"
    assert gw.get("/vx11/circuit-breaker/status").json()["breakers"]["madre"]["failure_count"] == 0

    # A 4xx without a JSON body is 502 for the caller, still not a breaker failure.
    madre.reply("/madre/task", {}, status=404)
    madre.behave("/madre/task", NOT_JSON)
    for _ in range(4):
        assert_error(intent(gw, "task"), 502, "upstream_unavailable", module="madre")
    assert gw.get("/vx11/circuit-breaker/status").json()["breakers"]["madre"] == \
        {"state": "closed", "failure_count": 0, "last_failure": None}


def test_intent_errors_unknown_invalid_json_down(fake, gateway_factory) -> None:
    madre = fake("madre")
    gw = gateway_factory(module_env({"madre": madre}))

    body = assert_error(intent(gw, "no-such-intent"), 404, "unknown_intent")
    assert body["correlation_id"] == CID

    assert_error(gw.request("POST", "/vx11/intent/task", raw=b'{"task": ', headers={"X-Correlation-ID": CID}),
                 400, "invalid_json", correlation_id=CID)
    assert madre.requests == []

    # spawner points at a closed port
    body = assert_error(intent(gw, "spawn", {"n": 1}), 502, "upstream_unavailable", module="spawner",
                        correlation_id=CID)
    assert isinstance(body["detail"], str)


def test_intent_past_the_route_timeout_is_504(fake, gateway_factory, tmp_path) -> None:
    madre = fake("madre")
    madre.behave("/madre/slow", HANG)
    args = write_config(tmp_path, """
[routes.slow]
module = "madre"
endpoint = "/madre/slow"
timeout = 0.5
""")
    gw = gateway_factory(module_env({"madre": madre}), args=args)
    reply, elapsed = timed(lambda: intent(gw, "slow", {"q": 1}))
    assert_error(reply, 504, "upstream_timeout", module="madre", correlation_id=CID)
    assert 0.4 < elapsed < 5, elapsed
    assert len(received(madre, "/madre/slow")) == 1


@pytest.mark.parametrize("behaviour", [NOT_JSON, NOT_HTTP, HUGE, HUGE_CHUNKED, CLOSE_MID_REPLY,
                                       CLOSE_BEFORE_REPLY])
def test_intent_unusable_reply_is_502(fake, gateway_factory, behaviour) -> None:
    madre = fake("madre")
    gw = gateway_factory(module_env({"madre": madre}, EDGELINK_BREAKER_FAILURES="100"))
    assert intent(gw, "task").status == 200  # a pooled connection exists: retries must not hide failures
    madre.behave("/madre/task", behaviour)
    for _ in range(2):
        reply = intent(gw, "task", {"q": 1})
        assert_error(reply, 502, "upstream_unavailable", module="madre", correlation_id=CID)
    breaker = gw.get("/vx11/circuit-breaker/status").json()["breakers"]["madre"]
    assert breaker["failure_count"] == 2  # each counted once
    madre.behave("/madre/task", HEALTHY)
    assert intent(gw, "task").status == 200  # and the gateway is fine afterwards


def test_module_resetting_keepalive_connections_between_requests(fake, gateway_factory) -> None:
    madre = fake("madre")
    madre.behave(None, CLOSE_AFTER_REPLY)  # answers as keep-alive, then closes anyway
    gw = gateway_factory(module_env({"madre": madre}))
    for i in range(30):
        reply = intent(gw, "task", {"i": i})
        assert reply.status == 200, (i, reply.body)
    assert [r.json for r in received(madre, "/madre/task")] == [{"i": i} for i in range(30)]


# --- circuit breaker --------------------------------------------------------------------


def breaker_of(gw: Gateway, module: str) -> dict[str, Any]:
    return gw.get("/vx11/circuit-breaker/status").json()["breakers"][module]


def test_breaker_opens_refuses_without_contacting_and_recovers_through_one_trial(fake, gateway_factory) -> None:
    madre = fake("madre")
    madre.behave("/madre/task", ERROR_500)
    gw = gateway_factory(module_env({"madre": madre}, EDGELINK_BREAKER_FAILURES="3",
                                    EDGELINK_BREAKER_RECOVERY="1"))
    for _ in range(3):
        reply = intent(gw, "task", {"q": 1})
        assert reply.status == 500 and reply.json() == {"error": "internal_error", "detail": "fake failure"}
    before = time.time()
    body = assert_error(intent(gw, "task", {"q": 1}), 503, "circuit_open", module="madre", correlation_id=CID)
    assert body["status"] == "circuit_open"
    assert len(received(madre, "/madre/task")) == 3  # the 4th call never reached the module

    breaker = breaker_of(gw, "madre")
    assert breaker["state"] == "open" and breaker["failure_count"] == 3
    assert isinstance(breaker["last_failure"], float) and abs(breaker["last_failure"] - before) < 30

    # Healthy again, but the breaker is open until the recovery time has passed.
    madre.behave("/madre/task", HEALTHY, delay=1.0)  # healthy again; the trial will take a while
    assert_error(intent(gw, "task"), 503, "circuit_open", module="madre")  # still open: not contacted
    assert len(received(madre, "/madre/task")) == 3
    wait_until(lambda: breaker_of(gw, "madre")["state"] == "half_open", why="the recovery time passed")

    # Half-open: one trial goes through; callers arriving meanwhile are refused.
    replies = concurrently(5, lambda i: intent(gw, "task", {"i": i}))
    statuses = sorted(r.status for r in replies)
    assert statuses == [200, 503, 503, 503, 503], statuses
    assert all(r.json()["error"] == "circuit_open" for r in replies if r.status == 503)
    assert len(received(madre, "/madre/task")) == 4

    closed = breaker_of(gw, "madre")
    assert closed["state"] == "closed" and closed["failure_count"] == 0
    madre.behave("/madre/task", HEALTHY)
    assert intent(gw, "task").status == 200


def test_breaker_trial_failure_reopens(fake, gateway_factory) -> None:
    madre = fake("madre")
    madre.behave("/madre/task", ERROR_500)
    gw = gateway_factory(module_env({"madre": madre}, EDGELINK_BREAKER_FAILURES="2",
                                    EDGELINK_BREAKER_RECOVERY="0.5"))
    for _ in range(2):
        assert intent(gw, "task").status == 500
    assert intent(gw, "task").status == 503
    wait_until(lambda: breaker_of(gw, "madre")["state"] == "half_open", why="the recovery time passed")
    assert intent(gw, "task").status == 500  # the trial, answered by the still failing module
    assert len(received(madre, "/madre/task")) == 3
    assert breaker_of(gw, "madre")["state"] == "open"
    assert_error(intent(gw, "task"), 503, "circuit_open", module="madre")


def test_open_breaker_fails_fast(fake, gateway_factory) -> None:
    madre = fake("madre")
    madre.behave("/madre/task", ERROR_500)
    gw = gateway_factory(module_env({"madre": madre}, EDGELINK_BREAKER_FAILURES="3",
                                    EDGELINK_BREAKER_RECOVERY="60"))
    for _ in range(3):
        assert intent(gw, "task").status == 500
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)  # one keep-alive connection
    durations = []
    try:
        for _ in range(200):
            started = time.perf_counter()
            conn.request("POST", "/vx11/intent/task", body=b'{"q": 1}',
                         headers={"X-VX11-Token": TOKEN, "Content-Type": "application/json"})
            resp = conn.getresponse()
            body = orjson.loads(resp.read())
            durations.append(time.perf_counter() - started)
            assert resp.status == 503 and body["error"] == "circuit_open" and body["module"] == "madre"
    finally:
        conn.close()
    assert len(received(madre, "/madre/task")) == 3
    median = statistics.median(durations)
    p95 = sorted(durations)[int(len(durations) * 0.95)]
    print(f"\nMEASURE fail-fast with an open breaker: median {median * 1000:.2f} ms, "
          f"p95 {p95 * 1000:.2f} ms over {len(durations)} calls (keep-alive)")
    assert median < 0.05


def test_module_down_opens_its_breaker_only(fake, gateway_factory) -> None:
    madre = fake("madre")
    gw = gateway_factory(module_env({"madre": madre}))  # spawner: closed port
    for _ in range(3):
        assert_error(intent(gw, "spawn"), 502, "upstream_unavailable", module="spawner")
    body = assert_error(intent(gw, "spawn"), 503, "circuit_open", module="spawner")
    assert body["status"] == "circuit_open"
    breakers = gw.get("/vx11/circuit-breaker/status").json()["breakers"]
    assert breakers["spawner"]["state"] == "open" and breakers["spawner"]["failure_count"] == 3
    assert breakers["madre"]["state"] == "closed"
    assert intent(gw, "task").status == 200


# --- proxies ------------------------------------------------------------------------------


def test_proxies_forward_to_their_module_paths(fake, gateway_factory) -> None:
    fakes = {name: fake(name) for name in ("hermes", "hormiguero", "shubniggurath")}
    fakes["hermes"].reply("/hermes/resources", {"cpu": 0.5, "models": ["a", "b"]})
    fakes["hormiguero"].reply("/queen/status", {"queen": "alive", "ants": 12})
    fakes["hormiguero"].reply("/report", {"items": []})
    fakes["shubniggurath"].reply("/shub/dashboard", {"tracks": 3})
    gw = gateway_factory(module_env(fakes, SHUB_ENABLED="true"))
    headers = {"X-Correlation-ID": CID}

    # the dashboard as Tentáculo Link called it: POST {} (API.md §12)
    cases = [("/resources", "hermes", "/hermes/resources", {"cpu": 0.5, "models": ["a", "b"]}, "GET", None),
             ("/hormiguero/queen/status", "hormiguero", "/queen/status", {"queen": "alive", "ants": 12}, "GET", None),
             ("/shub/dashboard", "shubniggurath", "/shub/dashboard", {"tracks": 3}, "POST", {})]
    for path, module, upstream, data, method, sent in cases:
        assert_error(gw.get(path, token=False), 401, "auth_required")
        assert_error(gw.get(path, headers={"X-VX11-Token": "nope"}), 403, "forbidden")
        reply = gw.get(path, headers=headers)
        assert reply.status == 200 and reply.json() == data, (path, reply.body)
        assert reply.headers["x-correlation-id"] == CID
        [request] = received(fakes[module], upstream)
        assert (request.method, request.target, request.json) == (method, upstream, sent)
        assert request.headers["x-vx11-token"] == TOKEN and request.headers["x-correlation-id"] == CID

    hormiguero = fakes["hormiguero"]
    for query, limit in (("", 50), ("?limit=", 50), ("?limit=7", 7), ("?limit=1", 1), ("?limit=1000", 1000)):
        reply = gw.get(f"/hormiguero/report{query}")
        assert reply.status == 200 and reply.json() == {"items": []}
        assert received(hormiguero, "/report")[-1].target == f"/report?limit={limit}"
    seen = len(received(hormiguero, "/report"))
    for bad in ("0", "1001", "abc", "-5", "2.5"):
        body = assert_error(gw.get(f"/hormiguero/report?limit={bad}"), 422, "validation_error")
        assert [d["loc"] for d in body["detail"]] == [["query", "limit"]], body
        assert isinstance(body["detail"][0]["msg"], str)
    assert len(received(hormiguero, "/report")) == seen  # nothing forwarded


def test_shub_dashboard_when_shub_is_disabled(fake, gateway_factory) -> None:
    shub = fake("shubniggurath")
    gw = gateway_factory(module_env({"shubniggurath": shub}))
    body = assert_error(gw.get("/shub/dashboard", headers={"X-Correlation-ID": CID}), 503, "module_disabled",
                        module="shubniggurath", correlation_id=CID)
    assert isinstance(body["detail"], str)
    assert shub.requests == []


def test_proxy_failure_mapping(fake, gateway_factory) -> None:
    hermes, hormiguero = fake("hermes"), fake("hormiguero")
    gw = gateway_factory(module_env({"hermes": hermes, "hormiguero": hormiguero},
                                    EDGELINK_PROXY_TIMEOUT="0.5", EDGELINK_BREAKER_FAILURES="100"))
    hermes.behave("/hermes/resources", ERROR_500)
    reply = gw.get("/resources")
    assert reply.status == 500 and reply.json() == {"error": "internal_error", "detail": "fake failure"}
    hermes.behave("/hermes/resources", NOT_JSON)
    assert_error(gw.get("/resources"), 502, "upstream_unavailable", module="hermes")
    hermes.reply("/hermes/resources", {"detail": "no such thing"}, status=404)
    hermes.behave("/hermes/resources", HEALTHY)
    reply = gw.get("/resources")
    assert reply.status == 404 and reply.json() == {"detail": "no such thing"}

    hormiguero.behave("/queen/status", HANG)
    reply, elapsed = timed(lambda: gw.get("/hormiguero/queen/status"))
    assert_error(reply, 504, "upstream_timeout", module="hormiguero")
    assert elapsed < 5
    hormiguero.behave("/report", HUGE)
    assert_error(gw.get("/hormiguero/report?limit=3"), 502, "upstream_unavailable", module="hormiguero")

    # a module that is down (shub enabled on a closed port)
    gw2 = gateway_factory(module_env(SHUB_ENABLED="true"))
    assert_error(gw2.get("/shub/dashboard"), 502, "upstream_unavailable", module="shubniggurath")
    assert_error(gw2.get("/resources"), 502, "upstream_unavailable", module="hermes")


def test_proxy_behind_an_open_breaker(fake, gateway_factory) -> None:
    hermes = fake("hermes")
    hermes.behave("/hermes/resources", ERROR_500)
    gw = gateway_factory(module_env({"hermes": hermes}, EDGELINK_BREAKER_FAILURES="3",
                                    EDGELINK_BREAKER_RECOVERY="60"))
    for _ in range(3):
        assert gw.get("/resources").status == 500
    body = assert_error(gw.get("/resources"), 503, "circuit_open", module="hermes")
    assert body["status"] == "circuit_open"
    assert len(received(hermes, "/hermes/resources")) == 3


def test_intent_body_must_be_an_object_and_query_integers_are_strict(fake, gateway_factory) -> None:
    madre, hormiguero = fake("madre"), fake("hormiguero")
    gw = gateway_factory(module_env({"madre": madre, "hormiguero": hormiguero}))
    for body in ([None, None], "text", 3):
        reply = gw.post("/vx11/intent/task", body)
        assert assert_error(reply, 422, "validation_error")["detail"][0]["loc"] == ["body"]
    assert received(madre, "/madre/task") == []
    for raw in ("1_0", "%20%2B5%20", "5.0", "%D9%A3"):  # underscore, padded sign, float, Arabic-Indic 3
        reply = gw.get(f"/hormiguero/report?limit={raw}")
        assert assert_error(reply, 422, "validation_error")["detail"][0]["loc"] == ["query", "limit"]
    assert received(hormiguero, "/report") == []


@pytest.mark.parametrize("switch_fails", ["down", "500"])
def test_intent_with_a_fallback_route_uses_it_when_the_primary_fails(fake, gateway_factory, switch_fails) -> None:
    madre = fake("madre")
    madre.reply("/madre/chat", {"response": "from madre"})
    fakes = {"madre": madre}
    if switch_fails == "500":
        switch = fake("switch")
        switch.behave("/switch/route-v5", ERROR_500)
        fakes["switch"] = switch
    gw = gateway_factory(module_env(fakes))
    reply = intent(gw, "chat", {"message": "hi"})
    assert reply.status == 200 and reply.json() == {"response": "from madre"}
    assert received(madre, "/madre/chat")[0].json == {"message": "hi"}
