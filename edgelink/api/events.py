"""Events (API.md §5): ingest into the ledger, the debug views and the operator snapshot."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from ..account import SNAPSHOT
from ..gateway.auth import MAX_CORRELATION_ID
from ..gateway.events import InvalidEnvelope, SchemaRejected, parse_ingest
from ..gateway.observe import MAX_AGE_SECONDS, MAX_NODES, WINDOW_SECONDS
from ..http.messages import (
    HTTPError,
    Request,
    Response,
    json_response,
    validation_error,
)
from ..ingest import accept, now_ms
from ..jsonbounds import MAX_DECODE_RATIO
from ..ledger import LedgerFull, LedgerUnavailable
from .operation import INVALID_JSON, VALIDATION, Operation, documented, error, json_body, query_param, returns

if TYPE_CHECKING:
    from ..runtime import Runtime

RECENT_IN_SNAPSHOT = 20
MAX_SNAPSHOT_T = 2**53  # the largest ``t`` a snapshot takes (a JSON-safe integer)
SNAPSHOT_MAX_BYTES = 256 * 1024  # API.md §5: the whole answer
SNAPSHOT_FIELD_BYTES = 8192  # a longer payload (or metadata) of a recent event is summarised
# What building one holds at most: the answer, and the payloads and metadata of the recent
# events decoded (each at most 8 KiB of JSON, accepted at most 8x that decoded)
SNAPSHOT_BUILD_BYTES = SNAPSHOT_MAX_BYTES + 2 * RECENT_IN_SNAPSHOT * SNAPSHOT_FIELD_BYTES * MAX_DECODE_RATIO
SNAPSHOT_TYPES = 256  # API.md §5: counts_by_type lists at most the types with most events


def schema_rejected(exc: SchemaRejected) -> HTTPError:
    """API.md §5's 422 for a canonical payload that breaks its schema, in the common error shape."""
    return HTTPError(422, "schema_validation_failed", body={
        "status": "rejected", "reason": "schema_validation_failed", "source": exc.source, "type": exc.type,
        "detail": exc.detail})


@documented("Validate and store an event", ("events",), Operation(
    (returns(201, "Accepted and committed to the ledger.", "IngestAccepted"),
     INVALID_JSON, VALIDATION,
     returns(422, "`schema_validation_failed`: a canonical event broke its schema; nothing is stored.",
           "IngestRejected"),
     error(503, "ledger_unavailable", "the disk refused the write (full, read-only, I/O error); nothing "
                                      "is stored. Retried by itself: the next write tries again."),
     error(507, "ledger_full", "the ledger is at EDGELINK_LEDGER_MAX_BYTES and EDGELINK_LEDGER_FULL is "
                               "`reject`; nothing is stored.")),
    request_body=json_body("IngestRequest", {
        "source": "madre", "type": "system.alert", "broadcast": True,
        "payload": {"alert_id": "a-1", "severity": "high", "message": "disk full",
                    "timestamp": 1700000000000}})))
async def ingest(req: Request[Runtime]) -> Response:
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


@documented("Events per type, last 60 s", ("events",), Operation((
    returns(200, f"Accepted events per type over a sliding {WINDOW_SECONDS} s window.", "Cardinality"),)))
async def cardinality(req: Request[Runtime]) -> Response:
    return json_response(req.runtime.cardinality.snapshot())


@documented("Correlation graph of recent events", ("events",), Operation((
    returns(200, f"Recent canonical events (at most {MAX_NODES}, none older than {MAX_AGE_SECONDS} s) "
               f"and their links.", "Correlations"),)))
async def correlations(req: Request[Runtime]) -> Response:
    return json_response(req.runtime.correlations.snapshot())


@documented("Module health and events at time t", ("events",), Operation(
    (returns(200, "Built from the ledger and the recorded health probes.", "Snapshot"), VALIDATION),
    parameters=(query_param("t", "The moment, Unix epoch ms; absent or 0: now.",
                            {"type": "integer", "minimum": 0, "maximum": MAX_SNAPSHOT_T, "default": 0}),)))
async def snapshot(req: Request[Runtime]) -> Response:
    t = req.int_query("t", 0, 0, MAX_SNAPSHOT_T)
    share = req.share  # an answer built from stored data is counted while it is built (API.md §1)
    if share is not None and not share.take(SNAPSHOT, SNAPSHOT_BUILD_BYTES):
        raise HTTPError(503, "gateway_overloaded", [(b"retry-after", b"1")],
                        detail="no room in the memory account to build a snapshot")
    try:
        return await _snapshot(req, t or now_ms())
    finally:
        if share is not None:
            share.give(SNAPSHOT, SNAPSHOT_BUILD_BYTES)


async def _snapshot(req: Request[Runtime], at: int) -> Response:
    rt = req.runtime
    ledger = rt.ledger
    modules = await ledger.health_at(at)
    counts, other = await ledger.top_types(at, SNAPSHOT_TYPES)
    recent = [{k: v for k, v in e.frame().items() if k != "channel"}
              for e in await ledger.recent(at, RECENT_IN_SNAPSHOT, SNAPSHOT_FIELD_BYTES)]
    # Tentáculo Link's key: each service's recorded status at t
    state = {name: {"status": health["status"]} for name, health in modules.items()}
    events = {"counts_by_type": counts, "other_types": other, "recent": recent}
    answer = {"timestamp": at, "state": state, "modules": modules, "events": events}
    body = orjson.dumps(answer)
    if len(body) > SNAPSHOT_MAX_BYTES:
        excess = _summarise_largest(recent, len(body) - SNAPSHOT_MAX_BYTES)
        if excess > 0:  # 256 type names of up to 1 KiB of UTF-8 each can fill it alone
            events["other_types"] = other = other + _drop_rarest(counts, excess + 24)  # its digits may grow
        body = orjson.dumps(answer)
    return Response(200, body)


TIMELINE_DEFAULT = 200  # events
TIMELINE_MAX = 1000
TIMELINE_SCAN = 5000  # rows of the range looked at for a correlation id
TIMELINE_MAX_BYTES = 256 * 1024  # the whole answer, as a snapshot's


def _correlated(event: dict[str, Any], correlation_id: str) -> bool:
    """Whether a payload or metadata ``correlation_id`` is ``correlation_id`` (a field too long
    to be read back, summarised, is kept: the bytes were in it)."""
    fields = [event[k] for k in ("payload", "metadata") if isinstance(event[k], dict)]
    return any(f.get("correlation_id") == correlation_id or f.get("truncated") is True for f in fields)


@documented("Stored events in a time range", ("events",), Operation(
    (returns(200, f"The newest `limit` stored events received between `since` and `until`, oldest first; "
                f"payloads and metadata over {SNAPSHOT_FIELD_BYTES // 1024} KiB summarised, the answer at "
                f"most {TIMELINE_MAX_BYTES // 1024} KiB (the oldest events dropped past it, `truncated`). "
                f"With `correlation_id`, only the events whose payload or metadata carries it, among "
                f"the newest {TIMELINE_SCAN} of the range.", "Timeline"), VALIDATION),
    description="What the console's timeline reads (API.md §10).",
    parameters=(
        query_param("since", "Events received at or after this moment, Unix epoch ms.",
                    {"type": "integer", "minimum": 0, "maximum": MAX_SNAPSHOT_T, "default": 0}),
        query_param("until", "Events received at or before this moment, Unix epoch ms; absent or 0: now.",
                    {"type": "integer", "minimum": 0, "maximum": MAX_SNAPSHOT_T, "default": 0}),
        query_param("correlation_id", "Only events whose payload or metadata `correlation_id` is this.",
                    {"type": "string", "maxLength": MAX_CORRELATION_ID}),
        query_param("limit", "At most this many events (the newest).",
                    {"type": "integer", "minimum": 1, "maximum": TIMELINE_MAX, "default": TIMELINE_DEFAULT}))))
async def timeline(req: Request[Runtime]) -> Response:
    """GET /debug/events/timeline: stored events in a time range (by the gateway's receive
    time), optionally of one correlation id, oldest first; bounded in count and in bytes."""
    now = now_ms()
    since = req.int_query("since", 0, 0, MAX_SNAPSHOT_T)
    until = req.int_query("until", 0, 0, MAX_SNAPSHOT_T) or now
    limit = req.int_query("limit", TIMELINE_DEFAULT, 1, TIMELINE_MAX)
    correlation_id = req.query.get("correlation_id", "")
    if len(correlation_id) > MAX_CORRELATION_ID or not all(33 <= ord(c) <= 126 for c in correlation_id):
        raise validation_error((["query", "correlation_id"],
                                f"must be at most {MAX_CORRELATION_ID} printable ASCII characters, as "
                                f"X-Correlation-ID"))
    if since > until:
        raise validation_error((["query", "since"], "must not be after until"))
    found, more = await req.runtime.ledger.between(
        since, until, limit, SNAPSHOT_FIELD_BYTES, TIMELINE_MAX_BYTES,
        containing=orjson.dumps(correlation_id) if correlation_id else b"", scan=TIMELINE_SCAN)
    events = [{k: v for k, v in e.frame().items() if k != "channel"} for e in reversed(found)]
    if correlation_id:
        events = [e for e in events if _correlated(e, correlation_id)]
    answer = {"status": "ok", "since": since, "until": until, "correlation_id": correlation_id or None,
              "events": events, "truncated": more}
    body = orjson.dumps(answer)
    if len(body) > TIMELINE_MAX_BYTES:
        _summarise_largest(events, len(body) - TIMELINE_MAX_BYTES)
        body = orjson.dumps(answer)
    if len(body) > TIMELINE_MAX_BYTES:  # long types and sources: the oldest events go
        excess = len(body) - TIMELINE_MAX_BYTES
        drop = 0
        while excess > 0:
            excess -= len(orjson.dumps(events[drop])) + 1
            drop += 1
        del events[:drop]
        answer["truncated"] = True
        body = orjson.dumps(answer)
    return Response(200, body)


def _summarise_largest(recent: list[dict[str, Any]], excess: int) -> int:
    """Replace the largest payloads and metadata of ``recent`` by their summary until
    ``excess`` bytes are saved: twenty fields under 8 KiB each can still add up. Returns
    the bytes still to save (<= 0 when done)."""
    fields = sorted(((len(orjson.dumps(item[key])), i, key) for i, item in enumerate(recent)
                     for key in ("payload", "metadata") if item[key] is not None), reverse=True)
    for size, i, key in fields:
        summary = {"truncated": True, "bytes": size}
        saved = size - len(orjson.dumps(summary))
        if excess <= 0 or saved <= 0:  # the rest are no longer than their summary would be
            break
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
