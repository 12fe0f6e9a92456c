"""Operations endpoints (API.md §7, §9): Prometheus metrics, the OpenAPI document, the forwarder."""

from __future__ import annotations

import sqlite3

import orjson

from .. import forward, openapi
from ..http.messages import Request, Response, json_response
from ..ledger import LedgerClosed
from ..log import log
from .console import accepts_gzip

PROMETHEUS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


async def metrics(req: Request) -> Response:
    rt = req.runtime
    m = rt.metrics
    m.ledger_max_bytes.set(value=rt.settings.ledger_max_bytes)
    try:
        events, size = await rt.ledger.stats()
    except (LedgerClosed, sqlite3.Error) as exc:  # the rest of /metrics still answers
        log.warning("metrics_ledger_unavailable", error=repr(exc))
    else:
        m.ledger_events.set(value=events)
        m.ledger_bytes.set(value=size)
    return Response(200, m.render(), content_type=PROMETHEUS_TYPE)


async def openapi_json(req: Request) -> Response:
    rt = req.runtime
    if rt.openapi_cache is None:
        rt.openapi_cache = orjson.dumps(openapi.document(rt.router))
        # ~115 KB of JSON is ~10 KB gzipped: the API reference page loads it on every visit
        import gzip  # here: most gateways never serve the document

        rt.openapi_gzip = gzip.compress(rt.openapi_cache, 6, mtime=0)
    if accepts_gzip(req.headers.get("accept-encoding", "")):
        return Response(200, rt.openapi_gzip, [(b"content-encoding", b"gzip"), (b"vary", b"Accept-Encoding")])
    return Response(200, rt.openapi_cache, [(b"vary", b"Accept-Encoding")])


async def forward_status(req: Request) -> Response:
    rt = req.runtime
    if rt.forwarder is not None:
        return json_response(rt.forwarder.status())
    ledger = rt.ledger
    acked = await ledger.forward_cursor()
    return json_response({
        "enabled": False, "engine": None, "url": None, "edge_id": forward.edge_id(rt.settings),
        "epoch": ledger.epoch, "state": "disabled", "acked_seq": acked, "last_seq": await ledger.last_seq(),
        "backlog": 0, "in_flight": 0, "last_error": None, "last_ack_at": None, "dropped": 0,
    })
