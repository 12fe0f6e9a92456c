"""The ingest step (API.md §5): an event that passed validation is committed to the ledger,
counted, noted for the forwarder and the correlation timeline, and broadcast if it asked to
be. ``POST /events/ingest`` and a flat event sent on ``/ws`` both end here.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Mapping

from .gateway.events import Event

if TYPE_CHECKING:
    from .runtime import Runtime


def now_ms() -> int:
    return int(time.time() * 1000)


def _type_label(event_type: str, canonical: bool) -> str:
    # Free-form types would make one metric series per made-up name.
    return event_type if canonical else "non_canonical"


async def accept(rt: Runtime, event: Event, top_level: Mapping[str, Any] | None = None) -> Event:
    """Commit ``event`` to the ledger, count it, and broadcast it if it asked to be
    (``top_level``: fields its broadcast frame also carries at the top level)."""
    seq = await rt.ledger.append(event)
    event = event.with_seq(seq)
    rt.metrics.events.inc(_type_label(event.type, event.canonical), "accepted")
    rt.cardinality.record(event.type)
    if rt.forwarder is not None:
        rt.forwarder.wake(seq)
    if event.canonical:
        rt.correlations.add(event)
    if event.broadcast:
        rt.hub.broadcast(event, top_level)
    return event
