"""The endpoint table: every path the gateway serves, in one place (API.md)."""

from __future__ import annotations

from .api import events, health, ws
from .http.router import Router


def build_router() -> Router:
    r = Router()
    r.add("GET", "/health", health.health, public=True, summary="Gateway liveness", tags=("health",))
    r.add("GET", "/v1/health", health.health, public=True, summary="Gateway liveness", tags=("health",))

    r.add("POST", "/events/ingest", events.ingest, summary="Validate and store an event", tags=("events",))
    r.add("GET", "/debug/events/cardinality", events.cardinality, summary="Events per type, last 60 s",
          tags=("events",))
    r.add("GET", "/debug/events/correlations", events.correlations, summary="Correlation graph of recent events",
          tags=("events",))
    r.add("GET", "/operator/snapshot", events.snapshot, summary="Module health and events at time t",
          tags=("events",))
    r.add("WS", "/ws", ws.websocket, summary="Event stream (WebSocket)", tags=("events",))
    return r
