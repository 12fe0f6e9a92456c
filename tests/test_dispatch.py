"""The dispatcher's two steps for a request with a body: ``admit`` before the body is read,
``respond`` once it is in. What admit accepted is not routed and checked a second time."""

from __future__ import annotations

import asyncio

import orjson

from conftest import next_loop_turn
from edgelink.config import Settings
from edgelink.dispatch import Dispatcher
from edgelink.http.messages import Request, json_response
from edgelink.http.router import Router
from edgelink.runtime import Runtime


def dispatcher(tmp_path, matched: list[str]) -> Dispatcher:
    async def item(req):
        await next_loop_turn()
        return json_response({"id": req.params["id"], "body": orjson.loads(req.body)})

    router = Router()
    router.add("POST", "/items/{id}", item, summary="an item", tags=("test",))
    match = router.match

    def counting(method, path, **kw):
        matched.append(path)
        return match(method, path, **kw)

    router.match = counting
    return Dispatcher(router, Runtime(Settings(token="secret", db=str(tmp_path / "t.db"))))


def test_an_admitted_request_is_routed_once_and_keeps_its_params(tmp_path):
    matched: list[str] = []
    d = dispatcher(tmp_path, matched)
    req = Request("POST", "/items/7", {"x-vx11-token": "secret"})
    assert d.admit(req) is None
    req.body = b'{"n": 1}'
    response = asyncio.run(d.handle(req))
    assert response.status == 200 and orjson.loads(response.body) == {"id": "7", "body": {"n": 1}}
    assert matched == ["/items/7"]


def test_a_request_admit_never_saw_is_routed_and_checked_by_respond(tmp_path):
    matched: list[str] = []
    d = dispatcher(tmp_path, matched)
    response = asyncio.run(d.handle(Request("POST", "/items/7", {"x-vx11-token": "wrong"}, b"{}")))
    assert response.status == 403 and matched == ["/items/7"]
    refused = d.admit(Request("POST", "/items/8", {}))
    assert refused is not None and refused.status == 401
