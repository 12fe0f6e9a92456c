"""The endpoint table: every path the gateway serves, in one place (API.md)."""

from __future__ import annotations

from .api import health
from .http.router import Router


def build_router() -> Router:
    r = Router()
    r.add("GET", "/health", health.health, public=True, summary="Gateway liveness", tags=("health",))
    r.add("GET", "/v1/health", health.health, public=True, summary="Gateway liveness", tags=("health",))
    return r
