"""Router unit tests: static and templated paths, 404/405/426, HEAD, Allow."""

from __future__ import annotations

import pytest

from edgelink.http.messages import HTTPError
from edgelink.http.router import Router, may_suspend


async def h(req):  # pragma: no cover - never awaited here
    return None


def router() -> Router:
    r = Router()
    r.add("GET", "/health", h, public=True)
    r.add("POST", "/events/ingest", h)
    r.add("GET", "/operator/session/{session_id}", h)
    r.add("DELETE", "/operator/session/{session_id}", h)
    r.add("POST", "/vx11/intent/{intent}", h)
    r.add("WS", "/ws", h)
    return r


def test_static_match_and_trailing_slash():
    r = router()
    route, params = r.match("GET", "/health")
    assert route.template == "/health" and params == {} and route.public
    assert r.match("GET", "/health/")[0].template == "/health"


def test_params_extracted():
    route, params = router().match("DELETE", "/operator/session/abc-123")
    assert route.method == "DELETE" and params == {"session_id": "abc-123"}
    assert router().match("POST", "/vx11/intent/chat")[1] == {"intent": "chat"}


def test_head_follows_get():
    assert router().match("HEAD", "/health")[0].method == "GET"


@pytest.mark.parametrize("path", ["/", "/nope", "/operator/session", "/operator/session/a/b", "/vx11/intent/"])
def test_404(path):
    with pytest.raises(HTTPError) as info:
        router().match("GET", path)
    assert info.value.status == 404 and info.value.code == "not_found"


def test_405_lists_allowed_methods():
    with pytest.raises(HTTPError) as info:
        router().match("PUT", "/operator/session/x")
    assert info.value.status == 405
    assert dict(info.value.headers)[b"allow"] == b"DELETE, GET, HEAD"
    assert router().lookup("/events/ingest") == ("/events/ingest", "POST")
    assert router().lookup("/operator/session/abc") == ("/operator/session/{session_id}", "DELETE, GET, HEAD")
    assert router().lookup("/missing") is None


def test_websocket_routes_only_match_upgrades():
    r = router()
    assert r.match("GET", "/ws", websocket=True)[0].method == "WS"
    with pytest.raises(HTTPError) as info:
        r.match("GET", "/ws")
    assert info.value.status == 426
    with pytest.raises(HTTPError) as info:
        r.match("GET", "/health", websocket=True)
    assert info.value.status == 405


def test_duplicate_route_refused():
    r = router()
    with pytest.raises(ValueError):
        r.add("GET", "/health", h)


def test_head_on_a_websocket_route_is_426_not_405():
    with pytest.raises(HTTPError) as info:
        router().match("HEAD", "/ws")
    assert info.value.status == 426


def test_handlers_that_never_await_are_marked_to_run_without_a_task() -> None:
    async def answers_at_once(req):
        return {"ok": True}

    async def awaits(req):
        return await req.read()

    async def async_with(req):
        async with req.lock:
            return None

    async def async_for(req):
        async for _ in req.stream:
            pass

    class CallableHandler:
        async def __call__(self, req):
            return None

    assert not may_suspend(answers_at_once)
    assert may_suspend(awaits) and may_suspend(async_with) and may_suspend(async_for)
    assert may_suspend(CallableHandler())  # not a plain function: assumed to suspend
    r = Router()
    r.add("GET", "/now", answers_at_once, aliases=("/v1/now",))
    r.add("GET", "/later", awaits)
    assert [(route.template, route.suspends) for route in r.routes] == [
        ("/now", False), ("/v1/now", False), ("/later", True)]
