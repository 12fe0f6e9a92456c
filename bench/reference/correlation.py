"""Correlation ids for the reference peer (API.md §1), as a pure ASGI middleware.

Pure ASGI rather than ``@app.middleware("http")``: the latter wraps every request in an
extra task and stream, which is the known slow path a careful FastAPI developer avoids.
"""

from __future__ import annotations

import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-correlation-id"
MAX_LENGTH = 128


def correlation_id(scope: Scope) -> str:
    """The request's id: the incoming header when it is short and printable, else a new one."""
    for name, value in scope["headers"]:
        if name == HEADER:
            text = value.decode("latin-1")
            if 0 < len(text) <= MAX_LENGTH and text.isascii() and text.isprintable():
                return text
            break
    return uuid.uuid4().hex


class CorrelationMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cid = correlation_id(scope)
        scope.setdefault("state", {})["correlation_id"] = cid
        header = (HEADER, cid.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        await self.app(scope, receive, send_with_id)
