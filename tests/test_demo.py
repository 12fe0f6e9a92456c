"""The demo modules answer bad bodies as the gateway does: 400 for bytes that are not JSON,
422 for JSON that is not an object, never a 500."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from edgelink.demo import DemoModule
from edgelink.http.messages import Request


def answer(module: str, path: str, body: bytes) -> tuple[int, dict]:
    req = Request("POST", path, {"content-type": "application/json"}, body)
    resp = asyncio.run(DemoModule(module).handle(req))
    return resp.status, orjson.loads(resp.body) if resp.body else {}


@pytest.mark.parametrize("module,path", [("madre", "/madre/chat"), ("switch", "/switch/route-v5"),
                                         ("switch", "/switch/stream")])
@pytest.mark.parametrize("body,status,error", [(b"[1, 2]", 422, "validation_error"), (b'"hi"', 422, "validation_error"),
                                               (b"{nope", 400, "invalid_json")])
def test_a_bad_body_is_refused_by_status_and_code(module, path, body, status, error):
    got_status, got = answer(module, path, body)
    assert (got_status, got["error"], got["module"]) == (status, error, module)


def test_an_empty_body_is_an_empty_message():
    status, got = answer("madre", "/madre/chat", b"")
    assert status == 200 and got["response"] == "[madre] you said: "
    status, got = answer("madre", "/madre/chat", b'{"message": "hola"}')
    assert status == 200 and got["response"] == "[madre] you said: hola"
