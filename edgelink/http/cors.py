"""CORS: off unless origins are configured; allowed origins are echoed, never ``*``."""

from __future__ import annotations

ALLOWED_HEADERS = b"X-VX11-Token, Content-Type, X-Correlation-ID"
PREFLIGHT_MAX_AGE = b"600"


def response_headers(origins: tuple[str, ...], origin: str | None) -> list[tuple[bytes, bytes]]:
    """Headers for an actual (non-preflight) response to ``origin``."""
    if not origins or origin is None or origin.rstrip("/") not in origins:
        return []
    return [
        (b"access-control-allow-origin", origin.encode("latin-1")),
        (b"access-control-allow-credentials", b"true"),
        (b"access-control-expose-headers", b"X-Correlation-ID"),
        (b"vary", b"Origin"),
    ]


def preflight_headers(origins: tuple[str, ...], origin: str, allow: str) -> list[tuple[bytes, bytes]]:
    """Headers for a 204 answer to an allowed preflight; ``allow`` lists the path's methods."""
    return response_headers(origins, origin) + [
        (b"access-control-allow-methods", allow.encode()),
        (b"access-control-allow-headers", ALLOWED_HEADERS),
        (b"access-control-max-age", PREFLIGHT_MAX_AGE),
    ]


def origin_allowed(origins: tuple[str, ...], origin: str | None) -> bool:
    """For WebSocket handshakes: a present Origin must be listed when origins are set."""
    return not origins or origin is None or origin.rstrip("/") in origins
