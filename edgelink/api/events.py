"""Events (API.md §5): ingest into the ledger, the debug views and the operator snapshot."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..gateway.events import Event, SchemaRejected, parse_ingest
from ..http.messages import HTTPError, Request, Response, json_response
from ..http.websocket import WebSocket

if TYPE_CHECKING:
    from ..runtime import Runtime

RECENT_IN_SNAPSHOT = 20


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


async def ingest(req: Request) -> Response:
    rt = req.app
    body = req.json()
    try:
        event = parse_ingest(body, now_ms())
    except SchemaRejected as exc:
        rt.metrics.events.inc(exc.type, "rejected")
        raise
    except HTTPError:
        rt.metrics.events.inc("invalid", "rejected")
        raise
    event = await accept(rt, event)
    return json_response({
        "status": "received", "event_id": event.event_id, "seq": event.seq, "source": event.source,
        "type": event.type, "canonical": event.canonical, "broadcast": event.broadcast,
    }, 201)


async def cardinality(req: Request) -> Response:
    return json_response(req.app.cardinality.snapshot())


async def correlations(req: Request) -> Response:
    return json_response(req.app.correlations.snapshot())


async def snapshot(req: Request) -> Response:
    rt = req.app
    t = req.int_query("t", 0, 0, 2**53)
    at = t or now_ms()
    ledger = rt.ledger
    modules = await ledger.health_at(at)
    counts = await ledger.counts_by_type(at)
    recent = await ledger.recent(at, RECENT_IN_SNAPSHOT)
    return json_response({
        "timestamp": at,
        "modules": modules,
        "events": {
            "counts_by_type": counts,
            "recent": [{k: v for k, v in e.frame().items() if k != "channel"} for e in recent],
        },
    })
