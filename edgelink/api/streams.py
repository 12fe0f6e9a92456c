"""Streamed answers (API.md §3 streaming routes, §4 ``"stream": true``): SSE framing, stream
metrics, and committing to a stream only once its first chunk is in hand.

A handler builds an async generator of body chunks and hands it to ``respond()``, which
takes the first chunk before anything is sent: a failure up to that point is still an
ordinary error answer (504, 502, a fallback), never a 200 cut short.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, AsyncGenerator

import orjson

from ..gateway.metrics import Registry
from ..http.messages import HTTPError, Request, Response, StreamingResponse

if TYPE_CHECKING:
    from ..runtime import Runtime

SSE_TYPE = b"text/event-stream"
# Proxies in front of us (nginx) must not buffer a stream either.
NO_BUFFERING = ((b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"))


class CallerGone(HTTPError):
    """The caller left before the first chunk: nobody reads the answer, no fallback is tried."""

    def __init__(self) -> None:
        super().__init__(499, "client_closed_request", detail="the caller closed the connection before the first byte")


def sse(event: str, data: Any) -> bytes:
    """One server-sent event whose data is JSON."""
    return b"event: %s\ndata: %s\n\n" % (event.encode(), orjson.dumps(data))


async def respond(req: Request[Runtime], status: int, content_type: bytes, chunks: AsyncGenerator[bytes, None],
                  started: float) -> Response:
    """The answer that streams ``chunks``; whatever it raises before its first chunk
    propagates (and ``chunks`` is closed), and ``CallerGone`` if the caller leaves while
    it waits. A body that ends at once is a plain answer."""
    metrics: Registry = req.runtime.metrics
    template = req.route_template or "unmatched"
    metered = _metered(metrics, template, chunks)
    # The wait for the first chunk is its own task, so that the caller leaving can stop it
    # (and the upstream call under it) at once rather than at the module's first byte.
    waiting = asyncio.create_task(_first(metered))
    gone = asyncio.create_task(req.caller_gone().wait())
    try:
        await asyncio.wait((waiting, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not waiting.done():
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
    if waiting.cancelled():
        await metered.aclose()
        raise CallerGone()
    first = waiting.result()
    if first is None:
        return Response(status, b"", list(NO_BUFFERING), content_type)
    metrics.stream_first_byte.observe(time.perf_counter() - started, template)
    return StreamingResponse(status, first, list(NO_BUFFERING), content_type, chunks=metered)


async def _first(chunks: AsyncGenerator[bytes, None]) -> bytes | None:
    return await anext(chunks, None)


async def _metered(metrics: Registry, template: str,
                   chunks: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
    metrics.streams_open.inc(template)
    try:
        async with aclosing(chunks):
            async for chunk in chunks:
                metrics.stream_bytes.inc(template, amount=len(chunk))
                yield chunk
    finally:
        metrics.streams_open.inc(template, amount=-1)
