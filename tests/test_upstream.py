"""The upstream client and the Modules service, over real loopback sockets to fake modules."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Iterator, TypeVar

import orjson
import pytest

from conftest import until, wait_until
from edgelink.api.modules import module_error
from edgelink.config import ModuleConfig, Settings
from edgelink.http.messages import HTTPError
from edgelink.modules import ModuleError, ModuleReply, Modules
from edgelink.upstream import UpstreamClient, UpstreamError
from fakemodule import (
    CLOSE_AFTER_REPLY,
    CLOSE_BEFORE_REPLY,
    CLOSE_MID_REPLY,
    ERROR_500,
    HANG,
    HUGE,
    HUGE_CHUNKED,
    HUGE_HEADERS_ONLY,
    NOT_HTTP,
    NOT_JSON,
    FakeModule,
    unused_port,
)

TOKEN = "upstream-test-token"
CID = "corr-0123456789abcdef"
T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def make_settings(urls: dict[str, str], disabled: tuple[str, ...] = (), **overrides: Any) -> Settings:
    modules = tuple(ModuleConfig(name, url, name not in disabled) for name, url in urls.items())
    return Settings(token=TOKEN, modules=modules, **overrides)


async def call(modules: Modules, module: str = "switch", method: str = "POST",
               path: str = "/switch/route-v5", timeout: float = 5.0, **kw: Any) -> ModuleReply:
    return await modules.call(module, method, path, json=kw.pop("json", {"message": "hi"}),
                              timeout=timeout, correlation_id=CID, **kw)


async def error_of(awaitable: Awaitable[Any]) -> HTTPError:
    """The HTTP answer the API gives for the registry's ModuleError."""
    with pytest.raises(ModuleError) as info:
        await awaitable
    return module_error(info.value)


def body_of(error: HTTPError) -> dict[str, Any]:
    return orjson.loads(error.response().body)


@pytest.fixture
def fake() -> Iterator[FakeModule]:
    with FakeModule() as module:
        yield module


# --- the client: pooling and keep-alive ------------------------------------------------


def test_sequential_calls_reuse_one_connection(fake: FakeModule) -> None:
    async def main() -> None:
        modules = Modules(make_settings({"switch": fake.url}))
        for i in range(10):
            reply = await call(modules, json={"n": i})
            assert reply.status == 200 and reply.data == {"status": "ok", "path": "/switch/route-v5"}
        await modules.close()

    run(main())
    assert fake.connections == 1
    assert [r.json for r in fake.requests] == [{"n": i} for i in range(10)]


def test_pool_keeps_at_most_pool_size_idle_connections(fake: FakeModule) -> None:
    fake.behave(None, "healthy", delay=0.2)

    async def main() -> None:
        modules = Modules(make_settings({"switch": fake.url}, upstream_pool_size=2))
        await asyncio.gather(*(call(modules) for _ in range(5)))  # busy connections are not capped
        assert fake.connections == 5
        await until(lambda: fake.open_connections == 2)  # the other three were closed
        await asyncio.gather(*(call(modules) for _ in range(5)))
        assert fake.connections == 8  # two reused, three new
        await modules.close()
        await until(lambda: fake.open_connections == 0)

    run(main())


def test_idle_connections_are_reaped(fake: FakeModule) -> None:
    async def main() -> None:
        modules = Modules(make_settings({"switch": fake.url}, upstream_pool_idle=0.2))
        await call(modules)
        await until(lambda: fake.open_connections == 0)
        await call(modules)
        await modules.close()

    run(main())
    assert fake.connections == 2


def test_module_closing_keepalive_after_each_reply_does_not_fail_the_next_call(fake: FakeModule) -> None:
    fake.behave(None, CLOSE_AFTER_REPLY)

    async def main() -> None:
        modules = Modules(make_settings({"switch": fake.url}))
        for i in range(20):
            assert (await call(modules, json={"n": i})).status == 200
            if i % 2:  # let the close reach us too, not only race it: the pooled connection saw it
                await until(lambda: all(c.ended for pool in modules._client._idle.values() for c in pool),
                            why="the module's close seen by the pooled connection")
        assert modules.breaker_status()["breakers"]["switch"]["failure_count"] == 0
        await modules.close()

    run(main())
    assert [r.json for r in fake.requests] == [{"n": i} for i in range(20)]  # none sent twice
    assert fake.connections == 20


def test_pooled_connection_whose_peer_left_is_not_used(fake: FakeModule) -> None:
    fake.behave(None, CLOSE_AFTER_REPLY)

    async def main() -> None:
        client = UpstreamClient(make_settings({}))
        await client.request(fake.url, "GET", "/once", timeout=5)
        (conn,) = [c for pool in client._idle.values() for c in pool]
        # Sleep without yielding: the module's FIN reaches our socket, but the event loop
        # cannot tell the protocol, so only the socket poll in alive() can notice.
        wait_until(lambda: not conn.alive(), 5, "the closed connection still looks alive")
        assert not conn.ended
        await client.close()

    run(main())


def test_reused_connection_closed_before_reply_is_retried_once_on_a_fresh_one(fake: FakeModule) -> None:
    async def main() -> None:
        client = UpstreamClient(make_settings({}))
        assert (await client.request(fake.url, "POST", "/warm", body=b"{}", timeout=5)).status == 200
        fake.behave("/gone", CLOSE_BEFORE_REPLY)
        with pytest.raises(UpstreamError) as info:
            await client.request(fake.url, "POST", "/gone", body=b"{}", timeout=5)
        assert info.value.kind == "closed"
        await client.close()

    run(main())
    gone = [r for r in fake.requests if r.path == "/gone"]
    assert [r.connection for r in gone] == [1, 2]  # the pooled one, then one fresh retry


@pytest.mark.parametrize("method, sent", [("POST", 1), ("GET", 2)])
def test_close_mid_reply_on_reused_connection_retries_only_idempotent(fake: FakeModule, method: str,
                                                                      sent: int) -> None:
    async def main() -> None:
        client = UpstreamClient(make_settings({}))
        await client.request(fake.url, "GET", "/warm", timeout=5)
        fake.behave("/partial", CLOSE_MID_REPLY)
        with pytest.raises(UpstreamError) as info:
            await client.request(fake.url, method, "/partial", timeout=5)
        assert info.value.kind == "closed"
        await client.close()

    run(main())
    assert len([r for r in fake.requests if r.path == "/partial"]) == sent


# --- the client: failures and their kinds ----------------------------------------------


@pytest.mark.parametrize("behaviour, kind", [
    (HUGE, "too_large"), (HUGE_CHUNKED, "too_large"), (HUGE_HEADERS_ONLY, "too_large"),
    (CLOSE_MID_REPLY, "closed"),
    (CLOSE_BEFORE_REPLY, "closed"), (NOT_HTTP, "protocol"),
])
def test_client_error_kinds(fake: FakeModule, behaviour: str, kind: str) -> None:
    fake.behave(None, behaviour)

    async def main() -> None:
        client = UpstreamClient(make_settings({}))
        with pytest.raises(UpstreamError) as info:
            await client.request(fake.url, "POST", "/x", body=b"{}", timeout=10)
        assert info.value.kind == kind
        await client.close()

    run(main())
    assert len(fake.requests) == 1  # a fresh connection is never retried


def test_client_connect_error_and_timeout(fake: FakeModule) -> None:
    fake.behave(None, HANG)

    async def main() -> None:
        client = UpstreamClient(make_settings({}))
        with pytest.raises(UpstreamError) as info:
            await client.request(f"http://127.0.0.1:{unused_port()}", "GET", "/health", timeout=5)
        assert info.value.kind == "connect"
        started = time.monotonic()
        with pytest.raises(UpstreamError) as info:
            await client.request(fake.url, "GET", "/health", timeout=0.3)
        assert info.value.kind == "timeout"
        assert 0.25 <= time.monotonic() - started < 0.9
        await until(lambda: fake.open_connections == 0)  # the hung connection was dropped
        await client.close()

    run(main())


def test_reply_just_under_the_limit_is_accepted(fake: FakeModule) -> None:
    big = {"blob": "x" * (2 * 1024 * 1024)}
    fake.reply("/big", big)

    async def main() -> None:
        modules = Modules(make_settings({"switch": fake.url}, upstream_max_reply=3 * 1024 * 1024))
        reply = await call(modules, path="/big")
        assert reply.data == big
        await modules.close()

    run(main())


def test_a_reply_is_charged_what_its_buffer_holds_before_it_is_read(fake: FakeModule) -> None:
    # The account is a bound only if a reply is charged what it really holds: its declared
    # length, taken before a byte is read (one buffer of that size, filled in place), or,
    # chunked, what its growing buffer has allocated. A reply past the share is refused
    # before it is read, and a failed call gives back all it took.
    from edgelink.account import REPLIES, Account

    text = orjson.dumps({"blob": "x" * (512 * 1024)})
    fake.reply("/big", orjson.loads(text))

    async def main() -> None:
        client = UpstreamClient(make_settings({"switch": fake.url}))
        account = Account(4 << 20, 0.25)  # a share of 1 MiB
        share = account.open()
        reply = await client.request(fake.url, "GET", "/big", timeout=5, share=share)
        assert reply.body == text
        assert share.by_piece[REPLIES] == len(text) + 1 == reply.body.__alloc__()
        share.close()
        small = account.open()
        account.share_limit = len(text)  # one byte short of what the buffer takes
        with pytest.raises(UpstreamError) as info:
            await client.request(fake.url, "GET", "/big", timeout=5, share=small)
        assert info.value.kind == "account" and small.held == 0 and account.used == 0
        await client.close()

    run(main())


def test_a_reply_that_has_no_body_whatever_it_declares_keeps_none() -> None:
    # 204 and 304 carry no body even with a Content-Length: the buffer sized from it is
    # cut to nothing, and only that is charged.
    from edgelink.account import REPLIES, Account

    async def main() -> None:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 100000\r\n\r\n")
            await writer.drain()
            await reader.read()
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        client = UpstreamClient(make_settings({"switch": url}))
        share = Account(4 << 20, 0.25).open()
        reply = await client.request(url, "GET", "/", timeout=5, share=share)
        assert reply.status == 204 and reply.body == b""
        assert share.by_piece[REPLIES] == 1
        await client.close()
        server.close()

    run(main())


# --- Modules.call: headers, mapping, breaker -----------------------------------------------


def test_token_correlation_and_json_body_reach_the_module(fake: FakeModule) -> None:
    fake.reply("/switch/route-v5", {"response": "hello", "model_used": "tiny"})

    async def main() -> ModuleReply:
        modules = Modules(make_settings({"switch": fake.url}))
        try:
            return await call(modules, json={"message": "hola", "n": [1, 2]})
        finally:
            await modules.close()

    reply = run(main())
    assert reply.status == 200 and reply.data == {"response": "hello", "model_used": "tiny"}
    assert reply.latency_ms >= 0
    (received,) = fake.requests
    assert (received.method, received.path) == ("POST", "/switch/route-v5")
    assert received.headers["x-vx11-token"] == TOKEN
    assert received.headers["x-correlation-id"] == CID
    assert received.headers["content-type"] == "application/json"
    assert received.headers["host"] == f"127.0.0.1:{fake.port}"
    assert received.json == {"message": "hola", "n": [1, 2]}


def test_module_down_is_502_and_counts(fake: FakeModule) -> None:
    async def main() -> None:
        modules = Modules(make_settings({"switch": f"http://127.0.0.1:{unused_port()}"}))
        error = await error_of(call(modules))
        assert (error.status, error.code, error.extra["module"]) == (502, "upstream_unavailable", "switch")
        assert modules.breaker_status()["breakers"]["switch"]["failure_count"] == 1
        await modules.close()

    run(main())


def test_hang_past_timeout_is_504(fake: FakeModule) -> None:
    fake.behave(None, HANG)

    async def main() -> None:
        modules = Modules(make_settings({"switch": fake.url}))
        started = time.monotonic()
        error = await error_of(call(modules, timeout=0.3))
        assert 0.25 <= time.monotonic() - started < 0.9
        assert body_of(error) == {"error": "upstream_timeout", "status_code": 504, "module": "switch",
                                  "detail": error.extra["detail"]}
        assert modules.breaker_status()["breakers"]["switch"]["failure_count"] == 1
        await modules.close()

    run(main())


def test_5xx_json_is_returned_and_counts_as_failure(fake: FakeModule) -> None:
    fake.behave(None, ERROR_500)

    async def main() -> None:
        modules = Modules(make_settings({"switch": fake.url}))
        reply = await call(modules)
        assert reply.status == 500 and reply.data["error"] == "internal_error"
        assert modules.breaker_status()["breakers"]["switch"]["failure_count"] == 1
        await modules.close()

    run(main())


@pytest.mark.parametrize("behaviour", [NOT_JSON, HUGE, HUGE_CHUNKED, CLOSE_MID_REPLY])
def test_unusable_replies_are_502_and_count(fake: FakeModule, behaviour: str) -> None:
    fake.behave(None, behaviour)

    async def main() -> None:
        modules = Modules(make_settings({"switch": fake.url}))
        error = await error_of(call(modules))
        assert (error.status, error.code, error.extra["module"]) == (502, "upstream_unavailable", "switch")
        assert modules.breaker_status()["breakers"]["switch"]["failure_count"] == 1
        await modules.close()

    run(main())


def test_4xx_is_returned_and_is_not_a_failure(fake: FakeModule) -> None:
    fake.reply("/switch/route-v5", {"detail": "no such model"}, status=404)
    fake.reply("/html404", None, status=404)
    fake.behave("/html404", NOT_JSON)

    async def main() -> None:
        modules = Modules(make_settings({"switch": fake.url}))
        for _ in range(5):
            reply = await call(modules)
            assert reply.status == 404 and reply.data == {"detail": "no such model"}
            assert (await error_of(call(modules, path="/html404"))).status == 502
        assert modules.breaker_status()["breakers"]["switch"] == {
            "state": "closed", "failure_count": 0, "last_failure": None}
        await modules.close()

    run(main())


def test_breaker_opens_after_three_failures_and_fails_fast(fake: FakeModule) -> None:
    fake.behave(None, HANG)

    async def main() -> None:
        modules = Modules(make_settings({"switch": fake.url}))
        for _ in range(3):
            assert (await error_of(call(modules, timeout=0.2))).status == 504
        started = time.monotonic()
        error = await error_of(call(modules, timeout=0.2))
        assert time.monotonic() - started < 0.2  # refused without waiting for the module
        body = body_of(error)
        assert (error.status, body["error"], body["status"], body["module"]) == (
            503, "circuit_open", "circuit_open", "switch")
        status = modules.breaker_status()
        assert status["status"] == "ok" and isinstance(status["timestamp"], float)
        snap = status["breakers"]["switch"]
        assert snap["state"] == "open" and snap["failure_count"] == 3
        assert abs(snap["last_failure"] - time.time()) < 60
        await modules.close()

    run(main())
    assert len(fake.requests) == 3


class SkewedClock:
    """Monotonic time plus a jump the test controls: the breaker's recovery passes at once,
    and "still open" checks do not depend on how busy the machine is."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def test_breaker_recovers_through_one_trial(fake: FakeModule) -> None:
    fake.behave(None, ERROR_500)
    clock = SkewedClock()

    async def main() -> None:
        modules = Modules(make_settings({"switch": fake.url}, breaker_recovery=30), now=clock)
        for _ in range(3):
            assert (await call(modules)).status == 500
        assert (await error_of(call(modules))).code == "circuit_open"
        clock.offset += 29
        assert (await error_of(call(modules))).code == "circuit_open"

        clock.offset += 1  # half-open: the trial fails, the breaker opens again
        assert modules.breaker_status()["breakers"]["switch"]["state"] == "half_open"
        assert (await call(modules)).status == 500
        assert modules.breaker_status()["breakers"]["switch"]["state"] == "open"
        assert (await error_of(call(modules))).code == "circuit_open"

        clock.offset += 30  # half-open again: one slow trial, nobody else meanwhile
        fake.behave(None, "healthy", delay=0.3)
        trial = asyncio.create_task(call(modules))
        await until(lambda: len(fake.requests) == 5)
        assert (await error_of(call(modules))).code == "circuit_open"
        assert (await trial).status == 200
        assert modules.breaker_status()["breakers"]["switch"]["state"] == "closed"
        assert modules.breaker_status()["breakers"]["switch"]["failure_count"] == 0
        assert (await call(modules)).status == 200
        await modules.close()

    run(main())
    assert len(fake.requests) == 6


def test_cancelled_trial_lets_the_next_caller_try(fake: FakeModule) -> None:
    fake.behave(None, ERROR_500)

    async def main() -> None:
        modules = Modules(make_settings({"switch": fake.url}, breaker_recovery=0.2))
        for _ in range(3):
            await call(modules)
        await until(lambda: modules.breaker_status()["breakers"]["switch"]["state"] == "half_open")
        fake.behave(None, HANG)
        trial = asyncio.create_task(call(modules))
        await until(lambda: len(fake.requests) == 4)
        trial.cancel()
        with pytest.raises(asyncio.CancelledError):
            await trial
        fake.behave(None, "healthy")
        assert (await call(modules)).status == 200
        assert modules.breaker_status()["breakers"]["switch"]["state"] == "closed"
        await modules.close()

    run(main())


def test_disabled_module_is_refused(fake: FakeModule) -> None:
    async def main() -> None:
        modules = Modules(make_settings({"shubniggurath": fake.url}, disabled=("shubniggurath",)))
        error = await error_of(call(modules, module="shubniggurath", method="GET", path="/shub/dashboard"))
        assert (error.status, error.code, error.extra["module"]) == (503, "module_disabled", "shubniggurath")
        assert modules.breaker_status()["breakers"] == {}
        await modules.close()

    run(main())
    assert fake.requests == []


def test_observe_hook_sees_every_outcome(fake: FakeModule) -> None:
    seen: list[tuple[str, str]] = []
    fake.behave("/bad", ERROR_500)
    fake.behave("/html", NOT_JSON)
    fake.behave("/hang", HANG)

    async def main() -> None:
        modules = Modules(make_settings({"switch": fake.url}),
                          observe=lambda module, outcome, seconds: seen.append((module, outcome)))
        await call(modules, path="/ok")
        await call(modules, path="/bad")
        await error_of(call(modules, path="/html"))
        await error_of(call(modules, path="/hang", timeout=0.2))
        await error_of(call(modules))  # open now: not let through, not observed
        await modules.close()

    run(main())
    assert seen == [("switch", "ok"), ("switch", "http_5xx"), ("switch", "not_json"), ("switch", "timeout")]


# --- health probes ----------------------------------------------------------------------


def test_check_all_reports_every_module(fake: FakeModule) -> None:
    with FakeModule("sick") as sick, FakeModule("stuck") as stuck:
        sick.behave("/health", ERROR_500)
        stuck.behave("/health", HANG)
        settings = make_settings({
            "madre": fake.url, "switch": sick.url, "hermes": f"http://127.0.0.1:{unused_port()}",
            "hormiguero": stuck.url, "shubniggurath": fake.url,
        }, disabled=("shubniggurath",), health_timeout=0.3)

        async def main() -> dict[str, Any]:
            modules = Modules(settings)
            try:
                return await modules.check_all()
            finally:
                await modules.close()

        health = run(main())
    assert list(health) == ["madre", "switch", "hermes", "hormiguero", "shubniggurath"]
    # madre's own /health fields beside ours (API.md §12); the failed probes have ours only
    assert set(health["madre"]) == {"status", "http_code", "latency_ms", "url", "error", "path"}
    for name in ("switch", "hermes", "hormiguero", "shubniggurath"):
        assert set(health[name]) == {"status", "http_code", "latency_ms", "url", "error"}
    assert {name: h["status"] for name, h in health.items()} == {
        "madre": "ok", "switch": "error", "hermes": "unreachable", "hormiguero": "timeout",
        "shubniggurath": "disabled"}
    assert health["madre"]["http_code"] == 200 and health["madre"]["error"] is None
    assert health["madre"]["url"] == fake.url and health["madre"]["latency_ms"] >= 0
    assert health["switch"]["http_code"] == 500 and health["switch"]["error"] == "HTTP 500"
    assert health["hermes"]["http_code"] is None and health["hermes"]["error"]
    assert health["hormiguero"]["http_code"] is None and health["hormiguero"]["error"]
    assert health["shubniggurath"] == {"status": "disabled", "http_code": None, "latency_ms": None,
                                       "url": fake.url, "error": None}
    # only the enabled madre probed the shared fake, with the gateway's headers
    (probe,) = fake.requests
    assert (probe.method, probe.path, probe.headers["x-vx11-token"]) == ("GET", "/health", TOKEN)
    assert probe.headers["x-correlation-id"]


def test_probes_run_concurrently(fake: FakeModule) -> None:
    fake.behave("/health", HANG)
    names = ("madre", "switch", "hermes", "hormiguero", "manifestator", "mcp", "spawner", "operator")
    timeout = 0.25

    async def main() -> dict[str, Any]:
        modules = Modules(make_settings({n: fake.url for n in names}, health_timeout=timeout))
        try:
            started = time.monotonic()
            health = await modules.check_all()
            # about one timeout, far from the 8 x 0.25 = 2 s that probing in turn would take
            assert time.monotonic() - started < 4 * timeout
            return health
        finally:
            await modules.close()

    assert {h["status"] for h in run(main()).values()} == {"timeout"}
    assert len(fake.requests) == len(names)


def test_concurrent_callers_share_one_check_round(fake: FakeModule) -> None:
    fake.behave("/health", "healthy", delay=0.2)
    fake.reply("/health", {"status": "ok", "module": "madre"})

    async def main() -> None:
        modules = Modules(make_settings({"madre": fake.url, "switch": fake.url}))
        first, second, third = await asyncio.gather(modules.check_all(), modules.check_all(), modules.check_all())
        assert first == second == third
        assert first["madre"]["status"] == first["switch"]["status"] == "ok"
        first["madre"]["status"] = "mangled"  # each caller gets its own copy
        assert second["madre"]["status"] == "ok"
        assert len(fake.requests) == 2  # one probe per module for three callers

        impatient = asyncio.create_task(modules.check_all())
        patient = asyncio.create_task(modules.check_all())
        await until(lambda: len(fake.requests) == 4, why="the shared round under way")
        impatient.cancel()  # giving up must not cancel the round the other caller shares
        assert (await patient)["madre"]["status"] == "ok"
        assert len(fake.requests) == 4

        rounds = await modules.check_round()  # a later caller gets a new round
        assert rounds["madre"].snippet == '{"status":"ok","module":"madre"}'
        assert len(fake.requests) == 6
        await modules.close()

    run(main())


def test_probes_do_not_feed_the_breakers(fake: FakeModule) -> None:
    fake.behave("/health", ERROR_500)

    async def main() -> None:
        modules = Modules(make_settings({"switch": fake.url, "madre": f"http://127.0.0.1:{unused_port()}"}))
        for _ in range(4):
            await modules.check_all()
        assert {n: b["state"] for n, b in modules.breaker_status()["breakers"].items()} == {
            "switch": "closed", "madre": "closed"}
        assert (await call(modules)).status == 200
        await modules.close()

    run(main())


def test_close_drops_pooled_connections(fake: FakeModule) -> None:
    async def main() -> None:
        modules = Modules(make_settings({"switch": fake.url, "madre": fake.url}))
        await asyncio.gather(call(modules), modules.check_all())
        await until(lambda: fake.open_connections >= 1)
        await modules.close()
        await until(lambda: fake.open_connections == 0)

    run(main())


# --- every exit settles the breaker's ticket; the cost of parsing is bounded --------------


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


def test_a_body_that_cannot_be_encoded_does_not_wedge_a_half_open_breaker(fake: FakeModule) -> None:
    # orjson.loads accepts JSON nested 300 deep, orjson.dumps refuses it: the call fails
    # before any request, and must neither take the trial ticket nor keep it
    fake.behave(None, ERROR_500)

    async def main() -> None:
        modules = Modules(make_settings({"switch": fake.url}, breaker_recovery=0.2))
        for _ in range(3):
            await call(modules)
        await until(lambda: modules.breaker_status()["breakers"]["switch"]["state"] == "half_open")
        error = await error_of(call(modules, json={"deep": _nested(300)}))
        assert (error.status, error.code) == (400, "invalid_json")
        assert modules.breaker_status()["breakers"]["switch"]["state"] == "half_open"
        fake.behave(None, "healthy")
        assert (await call(modules)).status == 200  # the trial was still free
        assert modules.breaker_status()["breakers"]["switch"]["state"] == "closed"
        await modules.close()

    run(main())
    assert len(fake.requests) == 4  # the unencodable call never reached the module


def test_a_reply_whose_strings_hold_the_punctuation_is_parsed(fake: FakeModule) -> None:
    from fakemodule import PUNCTUATED_TEXT, PUNCTUATED_TEXT_BODY
    fake.behave(None, PUNCTUATED_TEXT)

    async def main() -> None:
        modules = Modules(make_settings({"switch": fake.url}))
        reply = await call(modules)
        assert reply.status == 200 and reply.raw == PUNCTUATED_TEXT_BODY
        assert reply.data["k"] == [1, {"x": 2}] and reply.data["response"].count(",") == 150_000
        await modules.close()

    run(main())


def test_a_reply_too_costly_to_parse_is_502_and_counts(fake: FakeModule) -> None:
    from fakemodule import MANY_CONTAINERS
    fake.behave(None, MANY_CONTAINERS)

    async def main() -> None:
        modules = Modules(make_settings({"switch": fake.url}))
        error = await error_of(call(modules))
        assert (error.status, error.code) == (502, "upstream_unavailable")
        assert "containers and separators" in body_of(error)["detail"]
        assert modules.breaker_status()["breakers"]["switch"]["failure_count"] == 1
        fake.behave(None, "healthy")
        reply = await call(modules)
        assert reply.status == 200 and orjson.loads(reply.raw) == reply.data
        await modules.close()

    run(main())
