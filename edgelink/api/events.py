"""Events (API.md §5): ingest into the ledger, the debug views and the operator snapshot."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import orjson

from ..gateway.events import Event, InvalidEnvelope, SchemaRejected, parse_ingest
from ..http.messages import (
    HTTPError,
    Request,
    Response,
    json_response,
    validation_error,
)
from ..jsonbounds import MAX_DECODE_RATIO
from ..ledger import LedgerFull, LedgerUnavailable

if TYPE_CHECKING:
    from ..http.websocket import WebSocket
    from ..runtime import Runtime

RECENT_IN_SNAPSHOT = 20
MAX_SNAPSHOT_T = 2**53  # the largest ``t`` a snapshot takes (a JSON-safe integer)
SNAPSHOT_MAX_BYTES = 256 * 1024  # API.md §5: the whole answer
SNAPSHOT_FIELD_BYTES = 8192  # a longer payload (or metadata) of a recent event is summarised
SNAPSHOT_PIECE = "snapshot"  # the memory account's name for snapshots being built
# What building one holds at most: the answer, and the payloads and metadata of the recent
# events decoded (each at most 8 KiB of JSON, accepted at most 8x that decoded)
SNAPSHOT_BUILD_BYTES = SNAPSHOT_MAX_BYTES + 2 * RECENT_IN_SNAPSHOT * SNAPSHOT_FIELD_BYTES * MAX_DECODE_RATIO
SNAPSHOT_TYPES = 256  # API.md §5: counts_by_type lists at most the types with most events


def now_ms() -> int:
    return int(time.time() * 1000)


def _type_label(event_type: str, canonical: bool) -> str:
    # Free-form types would make one metric series per made-up name.
    return event_type if canonical else "non_canonical"


async def accept(rt: "Runtime", event: Event, exclude: WebSocket | None = None) -> Event:
    """Commit ``event`` to the ledger, count it, and broadcast it if it asked to be."""
    event = event.with_seq(await rt.ledger.append(event))
    rt.metrics.events.inc(_type_label(event.type, event.canonical), "accepted")
    rt.cardinality.record(event.type)
    if rt.forwarder is not None:
        rt.forwarder.wake(event.seq)
    if event.canonical:
        rt.correlations.add(event)
    if event.broadcast:
        rt.hub.broadcast(event, exclude)
    return event


def schema_rejected(exc: SchemaRejected) -> HTTPError:
    """API.md §5's 422 for a canonical payload that breaks its schema, in the common error shape."""
    return HTTPError(422, "schema_validation_failed", body={
        "status": "rejected", "reason": "schema_validation_failed", "source": exc.source, "type": exc.type,
        "detail": exc.detail})


async def ingest(req: Request) -> Response:
    rt = req.runtime
    body = req.json()
    try:
        event = parse_ingest(body, now_ms())
    except SchemaRejected as exc:
        rt.metrics.events.inc(exc.type, "rejected")
        raise schema_rejected(exc) from None
    except InvalidEnvelope as exc:
        rt.metrics.events.inc("invalid", "rejected")
        raise validation_error(*exc.problems) from None
    try:
        event = await accept(rt, event)
    except LedgerFull:
        rt.metrics.budget_refusals.inc("ledger")
        raise HTTPError(507, "ledger_full", detail="the ledger is at EDGELINK_LEDGER_MAX_BYTES") from None
    except LedgerUnavailable as exc:
        raise HTTPError(503, "ledger_unavailable", headers=[(b"retry-after", b"1")],
                        detail=f"the event was not stored: {exc}") from None
    return json_response({
        "status": "received", "event_id": event.event_id, "seq": event.seq, "source": event.source,
        "type": event.type, "canonical": event.canonical, "broadcast": event.broadcast,
    }, 201)


async def cardinality(req: Request) -> Response:
    return json_response(req.runtime.cardinality.snapshot())


async def correlations(req: Request) -> Response:
    return json_response(req.runtime.correlations.snapshot())


async def snapshot(req: Request) -> Response:
    t = req.int_query("t", 0, 0, MAX_SNAPSHOT_T)
    share = req.share  # an answer built from stored data is counted while it is built (API.md §1)
    if share is not None and not share.take(SNAPSHOT_PIECE, SNAPSHOT_BUILD_BYTES):
        raise HTTPError(503, "gateway_overloaded", [(b"retry-after", b"1")],
                        detail="no room in the memory account to build a snapshot")
    try:
        return await _snapshot(req, t or now_ms())
    finally:
        if share is not None:
            share.give(SNAPSHOT_PIECE, SNAPSHOT_BUILD_BYTES)


async def _snapshot(req: Request, at: int) -> Response:
    rt = req.runtime
    ledger = rt.ledger
    modules = await ledger.health_at(at)
    counts, other = await ledger.top_types(at, SNAPSHOT_TYPES)
    recent = [{k: v for k, v in e.frame().items() if k != "channel"}
              for e in await ledger.recent(at, RECENT_IN_SNAPSHOT, SNAPSHOT_FIELD_BYTES)]
    events = {"counts_by_type": counts, "other_types": other, "recent": recent}
    answer = {"timestamp": at, "modules": modules, "events": events}
    body = orjson.dumps(answer)
    if len(body) > SNAPSHOT_MAX_BYTES:
        excess = _summarise_largest(recent, len(body) - SNAPSHOT_MAX_BYTES)
        if excess > 0:  # 256 type names of up to 1 KiB of UTF-8 each can fill it alone
            events["other_types"] += _drop_rarest(counts, excess + 24)  # other_types' digits may grow
        body = orjson.dumps(answer)
    return Response(200, body)


def _summarise_largest(recent: list[dict[str, Any]], excess: int) -> int:
    """Replace the largest payloads and metadata of ``recent`` by their summary until
    ``excess`` bytes are saved: twenty fields under 8 KiB each can still add up. Returns
    the bytes still to save (<= 0 when done)."""
    fields = sorted(((len(orjson.dumps(item[key])), i, key) for i, item in enumerate(recent)
                     for key in ("payload", "metadata") if item[key] is not None), reverse=True)
    for size, i, key in fields:
        if excess <= 0:
            break
        summary = {"truncated": True, "bytes": size}
        recent[i][key] = summary
        excess -= size - len(orjson.dumps(summary))
    return excess


def _drop_rarest(counts: dict[str, int], excess: int) -> int:
    """Remove the types with fewest events from ``counts`` until ``excess`` bytes of JSON
    are saved; returns how many events they had (for ``other_types``)."""
    dropped = 0
    for type_, n in sorted(counts.items(), key=lambda item: item[1]):
        if excess <= 0:
            break
        del counts[type_]
        dropped += n
        excess -= len(orjson.dumps({type_: n})) - 1  # the entry and its comma
    return dropped
