"""What JSON costs decoded is taken from the memory account (API.md §1) when the caller
has a share of it, and given back once the handler is done; no room answers 503."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from conftest import next_loop_turn
from edgelink.account import Account
from edgelink.config import Settings
from edgelink.dispatch import Dispatcher
from edgelink.http.messages import Request, json_response
from edgelink.http.router import Router
from edgelink.jsonbounds import (
    DECODED,
    DecodeRefused,
    InvalidJSON,
    checked_cost,
    decode,
)
from edgelink.runtime import Runtime

DOC = orjson.dumps({"rows": [{"id": i, "text": "x" * 200} for i in range(2000)]})  # ~2x its size decoded


def test_decode_takes_the_cost_first_and_gives_it_back_only_if_it_fails():
    account = Account(10 * 1024 * 1024, 0.25)
    share = account.open()
    value, cost = decode(DOC, share)
    assert value["rows"][1999]["id"] == 1999
    assert cost == checked_cost(DOC) and share.by_piece[DECODED] == cost
    share.give(DECODED, cost)
    with pytest.raises(InvalidJSON):
        decode(DOC[:-1], share)
    assert share.held == 0
    small = Account(cost - 1, 1.0).open()
    with pytest.raises(DecodeRefused):
        decode(DOC, small)
    assert small.held == 0 and small.account.refusals == {DECODED: 1}


def test_a_request_holds_its_decoded_body_until_answered(tmp_path):
    seen: list[int] = []

    async def handler(req: Request):
        req.json()
        seen.append(req.share.held)
        await next_loop_turn()
        return json_response({"ok": True})

    router = Router()
    router.add("POST", "/x", handler, summary="a handler reading its body", tags=("test",))
    dispatcher = Dispatcher(router, Runtime(Settings(token="secret", db=str(tmp_path / "t.db"))))

    def post(share) -> tuple[int, dict]:
        req = Request("POST", "/x", {"x-vx11-token": "secret"}, DOC)
        req.share = share
        response = asyncio.run(dispatcher.handle(req))
        return response.status, orjson.loads(response.body)

    account = Account(10 * 1024 * 1024, 0.25)
    share = account.open()
    assert post(share) == (200, {"ok": True})
    assert seen == [checked_cost(DOC)] and share.held == 0 and account.used == 0
    crowded = account.open(limited=False)  # the gateway's own state, say
    assert crowded.take("body", account.free - 1000)
    status, body = post(share)
    assert (status, body["error"]) == (503, "gateway_overloaded") and "memory account" in body["detail"]
    assert share.held == 0


def test_a_large_session_view_is_streamed_without_a_second_count_of_the_session(tmp_path):
    from edgelink.api.chat import session

    runtime = Runtime(Settings(token="secret", db=str(tmp_path / "t.db")))
    sid = runtime.sessions.open("big")
    text = '"\\\n\N{GRINNING FACE}\u00e9x' * 10_000  # escapes and wide characters across the pieces' cuts
    for _ in range(3):
        runtime.sessions.append(sid, "user", text, metadata={"rows": list(range(20_000))})
    account = Account(1024 * 1024, 0.25)  # a share far smaller than the session
    share = account.open()

    async def read() -> bytes:
        req = Request("GET", "/operator/session/big", {})
        req.runtime, req.params, req.share = runtime, {"session_id": sid}, share
        response = await session(req)
        pieces = [response.body]
        async for piece in response.chunks:
            assert len(piece) <= 4 * 16 * 1024 + 64  # one piece of text, escaped, at most
            pieces.append(piece)
        return b"".join(pieces)

    view = orjson.loads(asyncio.run(read()))
    assert view["message_count"] == 3 and view["messages"][2]["metadata"] == {"rows": list(range(20_000))}
    assert [m["content"] for m in view["messages"]] == [text] * 3
    assert share.held == 0 and account.used == 0
