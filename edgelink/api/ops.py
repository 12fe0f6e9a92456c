"""Operations endpoints (API.md §7, §9): Prometheus metrics, the OpenAPI document, the forwarder."""

from __future__ import annotations

import sqlite3
from typing import TYPE_CHECKING

import orjson

from .. import forward, openapi
from ..http.messages import HTTPError, Request, Response, json_response, validation_error
from ..ledger import LedgerClosed
from ..log import log
from .console import accepts_gzip
from .operation import (
    INVALID_JSON,
    PROMETHEUS,
    VALIDATION,
    Operation,
    documented,
    error,
    json_body,
    query_param,
    returns,
)

if TYPE_CHECKING:
    from ..runtime import Runtime

PROMETHEUS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
DEAD_LETTERS_LISTED, DEAD_LETTERS_MAX = 100, 1000  # the dead-letter list: default and largest ``limit``
MAX_SEQ = 2**63 - 1  # SQLite's largest integer


@documented("Prometheus metrics", ("operations",), Operation((
    returns(200, "Requests by route and status, request latency, events by type and outcome, "
               "WebSocket clients and drops, breaker states, upstream latency.",
          "PrometheusText", media_type=PROMETHEUS),)))
async def metrics(req: Request[Runtime]) -> Response:
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
    if rt.forwarder is not None:
        try:
            await rt.forwarder.refresh_lag()
        except (LedgerClosed, sqlite3.Error) as exc:  # the last value stands
            log.warning("metrics_ledger_unavailable", error=repr(exc))
    return Response(200, m.render(), content_type=PROMETHEUS_TYPE)


@documented("This document", ("operations",), Operation((
    returns(200, "This document.", "OpenAPIDocument"),)))
async def openapi_json(req: Request[Runtime]) -> Response:
    rt = req.runtime
    if rt.openapi_cache is None:
        assert rt.router is not None  # serve() gives it before serving
        rt.openapi_cache = orjson.dumps(openapi.document(rt.router))
        # ~115 KB of JSON is ~10 KB gzipped: the API reference page loads it on every visit
        import gzip  # here: most gateways never serve the document

        rt.openapi_gzip = gzip.compress(rt.openapi_cache, 6, mtime=0)
    if accepts_gzip(req.headers.get("accept-encoding", "")):
        return Response(200, rt.openapi_gzip, [(b"content-encoding", b"gzip"), (b"vary", b"Accept-Encoding")])
    return Response(200, rt.openapi_cache, [(b"vary", b"Accept-Encoding")])


@documented("Forwarding to the fleet broker", ("operations",), Operation((
    returns(200, "The forwarder's connection, cursor and backlog.", "ForwardStatus"),)))
async def forward_status(req: Request[Runtime]) -> Response:
    rt = req.runtime
    if rt.forwarder is not None:
        await rt.forwarder.refresh_lag()
        return json_response(rt.forwarder.status())
    ledger = rt.ledger
    acked = await ledger.forward_cursor()
    return json_response({
        "enabled": False, "engine": None, "url": None, "edge_id": forward.edge_id(rt.settings),
        "epoch": ledger.epoch, "state": "disabled", "acked_seq": acked, "last_seq": await ledger.last_seq(),
        "backlog": 0, "in_flight": 0, "last_error": None, "last_error_at": None, "last_ack_at": None, "dropped": 0,
        "dead_letters": (await ledger.dead_letters(0))[1], "lag_seconds": 0,
    })


@documented("Events the broker refused", ("operations",), Operation(
    (returns(200, "This epoch's dead letters, newest first: events the broker refused for themselves (too "
                "large, refused by an ACL after retries), which the cursor moved past. `stored` says "
                "whether the event is still in the ledger (retention treats it as forwarded).",
           "ForwardDeadLetters"), VALIDATION),
    parameters=(query_param("limit", f"How many to list ({DEAD_LETTERS_LISTED} by default).",
                            {"type": "integer", "minimum": 1, "maximum": DEAD_LETTERS_MAX}),)))
async def forward_dead_letters(req: Request[Runtime]) -> Response:
    """This epoch's dead letters, newest first (also with forwarding off: they are the ledger's)."""
    limit = req.int_query("limit", DEAD_LETTERS_LISTED, 1, DEAD_LETTERS_MAX)
    listed, total = await req.runtime.ledger.dead_letters(limit)
    return json_response({"dead_letters": listed, "total": total})


@documented("Forward again from a seq", ("operations",), Operation(
    (returns(200, "The cursor is set back: forwarding resends from `from_seq` (the oldest stored event when "
                "absent or older), for a broker that lost messages it had acknowledged. Resends are "
                "counted in `edgelink_forward_resent_total`; the consumer's dedup by (edge_id, epoch, seq) "
                "keeps them exactly-once.", "ForwardRewound"),
     INVALID_JSON, VALIDATION,
     error(409, "forwarding_disabled", "EDGELINK_FORWARD_URL is not set.")),
    request_body=json_body("ForwardRewind", {"from_seq": 1}, required=False)))
async def forward_rewind(req: Request[Runtime]) -> Response:
    rt = req.runtime
    body = req.json() if req.body.strip() else {}  # no body: from the oldest stored event
    if not isinstance(body, dict):
        raise validation_error((["body"], "must be a JSON object"))
    from_seq = body.get("from_seq")
    if from_seq is not None and (type(from_seq) is not int or not 1 <= from_seq <= MAX_SEQ):
        raise validation_error((["body", "from_seq"], f"must be an integer between 1 and {MAX_SEQ}"))
    if rt.forwarder is None:
        raise HTTPError(409, "forwarding_disabled", detail="EDGELINK_FORWARD_URL is not set: nothing to rewind")
    return json_response(await rt.forwarder.rewind(from_seq))
