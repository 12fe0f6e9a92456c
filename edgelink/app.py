"""The endpoint table: every path the gateway serves, in one place (API.md)."""

from __future__ import annotations

from .api import chat, events, health, modules, ops, ws
from .http.router import Router


def build_router() -> Router:
    r = Router()
    r.add("GET", "/health", health.health, public=True, summary="Gateway liveness", tags=("health",))
    r.add("GET", "/v1/health", health.health, public=True, summary="Gateway liveness", tags=("health",))
    r.add("GET", "/vx11/status", modules.status, public=True, summary="Gateway and module health", tags=("modules",))
    r.add("GET", "/v1/status", modules.status, public=True, summary="Gateway and module health", tags=("modules",))
    r.add("GET", "/vx11/overview", modules.overview, summary="Module health overview", tags=("modules",))
    r.add("GET", "/vx11/circuit-breaker/status", modules.breakers, summary="Circuit breaker per module",
          tags=("modules",))
    r.add("GET", "/vx11/routes", modules.routes, summary="The intent route table", tags=("modules",))
    r.add("GET", "/vx11/forward/status", ops.forward_status, summary="Forwarding to the fleet broker",
          tags=("operations",))
    r.add("POST", "/vx11/intent/{intent}", modules.intent, summary="Forward an intent to its module",
          tags=("modules",))
    r.add("GET", "/shub/dashboard", modules.shub_dashboard, summary="Proxy: shubniggurath dashboard",
          tags=("modules",))
    r.add("GET", "/resources", modules.resources, summary="Proxy: hermes resources", tags=("modules",))
    r.add("GET", "/hormiguero/queen/status", modules.queen_status, summary="Proxy: hormiguero queen status",
          tags=("modules",))
    r.add("GET", "/hormiguero/report", modules.hormiguero_report, summary="Proxy: hormiguero report",
          tags=("modules",))

    r.add("POST", "/operator/chat", chat.chat, summary="Chat with fallback", tags=("chat",))
    r.add("POST", "/operator/api/chat", chat.chat, summary="Chat with fallback", tags=("chat",))
    r.add("GET", "/operator/session/{session_id}", chat.session, summary="One Context-7 session", tags=("chat",))
    r.add("DELETE", "/operator/session/{session_id}", chat.delete_session, summary="Delete a session",
          tags=("chat",))
    r.add("GET", "/vx11/context-7/sessions", chat.sessions, summary="Live Context-7 sessions", tags=("chat",))

    r.add("POST", "/events/ingest", events.ingest, summary="Validate and store an event", tags=("events",))
    r.add("GET", "/debug/events/cardinality", events.cardinality, summary="Events per type, last 60 s",
          tags=("events",))
    r.add("GET", "/debug/events/correlations", events.correlations, summary="Correlation graph of recent events",
          tags=("events",))
    r.add("GET", "/operator/snapshot", events.snapshot, summary="Module health and events at time t",
          tags=("events",))
    r.add("GET", "/metrics", ops.metrics, public=True, summary="Prometheus metrics", tags=("operations",))
    r.add("GET", "/openapi.json", ops.openapi_json, public=True, summary="This document", tags=("operations",))
    r.add("WS", "/ws", ws.websocket, summary="Event stream (WebSocket)", tags=("events",))
    return r
