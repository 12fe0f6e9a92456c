"""The endpoint table: every path the gateway serves (API.md), in one place, with its method,
handler and auth. Each handler's documentation (summary, tags, OpenAPI operation) is declared
beside it in edgelink/api/ (``@documented``); openapi.py builds the document from the router.
Aliases share their route's handler and documentation."""

from __future__ import annotations

from typing import NamedTuple

from .api import chat, console, events, health, modules, ops, ws
from .api.operation import documentation
from .http.router import Handler, Router


class Endpoint(NamedTuple):
    method: str  # or "WS": a WebSocket (a GET with Upgrade)
    path: str
    handler: Handler
    public: bool = False  # served without the token
    aliases: tuple[str, ...] = ()  # older paths of the same endpoint


PUBLIC = True

ENDPOINTS = (
    Endpoint("GET", "/health", health.health, PUBLIC, aliases=("/v1/health",)),
    Endpoint("GET", "/vx11/status", modules.status, PUBLIC, aliases=("/v1/status",)),
    Endpoint("GET", "/vx11/overview", modules.overview),
    Endpoint("GET", "/vx11/circuit-breaker/status", modules.breakers),
    Endpoint("GET", "/vx11/routes", modules.intent_table),
    Endpoint("GET", "/vx11/forward/status", ops.forward_status),
    Endpoint("GET", "/vx11/forward/dead-letters", ops.forward_dead_letters),
    Endpoint("POST", "/vx11/forward/rewind", ops.forward_rewind),
    Endpoint("POST", "/vx11/intent/{intent}", modules.intent),
    Endpoint("GET", "/shub/dashboard", modules.shub_dashboard),
    Endpoint("GET", "/resources", modules.resources),
    Endpoint("GET", "/hormiguero/queen/status", modules.queen_status),
    Endpoint("GET", "/hormiguero/report", modules.hormiguero_report),

    Endpoint("POST", "/operator/chat", chat.chat, aliases=("/operator/api/chat",)),
    Endpoint("GET", "/operator/session/{session_id}", chat.session),
    Endpoint("DELETE", "/operator/session/{session_id}", chat.delete_session),
    Endpoint("GET", "/vx11/context-7/sessions", chat.sessions),
    Endpoint("POST", "/vx11/context-7/cleanup", chat.cleanup),

    Endpoint("POST", "/events/ingest", events.ingest),
    Endpoint("GET", "/debug/events/cardinality", events.cardinality),
    Endpoint("GET", "/debug/events/correlations", events.correlations),
    Endpoint("GET", "/debug/events/timeline", events.timeline),
    Endpoint("GET", "/operator/snapshot", events.snapshot),
    Endpoint("GET", "/metrics", ops.metrics, PUBLIC),
    Endpoint("GET", "/openapi.json", ops.openapi_json, PUBLIC),
    Endpoint("GET", "/vx11/health/history", health.history),
    Endpoint("GET", "/console", console.console, PUBLIC),
    Endpoint("GET", "/console/{asset}", console.asset, PUBLIC),
    Endpoint("GET", "/docs", console.docs, PUBLIC),
    Endpoint("GET", "/redoc", console.redoc, PUBLIC),
    Endpoint("WS", "/ws", ws.websocket),
)


def build_router() -> Router:
    """The router of ``ENDPOINTS``; LookupError names a handler without its ``@documented``."""
    router = Router()
    for e in ENDPOINTS:
        doc = documentation(e.handler)
        router.add(e.method, e.path, e.handler, public=e.public, aliases=e.aliases,
                   summary=doc.summary, tags=doc.tags, doc=doc.operation)
    return router
