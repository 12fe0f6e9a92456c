"""CORS: off unless origins are configured; allowed origins are echoed, never ``*``."""

from __future__ import annotations

import re

ALLOWED_HEADERS = b"X-VX11-Token, Content-Type, X-Correlation-ID"
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")  # a header name (RFC 9110 token), bounded
MAX_REQUESTED_HEADERS = 32  # names taken from one preflight: a browser asks for a few
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


def preflight_headers(origins: tuple[str, ...], origin: str, allow: str,
                      requested: str | None = None) -> list[tuple[bytes, bytes]]:
    """Headers for a 204 answer to an allowed preflight; ``allow`` lists the path's methods.

    The headers the preflight asks for (``Access-Control-Request-Headers``) are allowed
    besides ours, as Tentáculo Link's ``allow_headers=["*"]`` did: only allowed origins get
    here, and the answer is never ``*`` (which a browser ignores with credentials)."""
    headers = ALLOWED_HEADERS.decode().split(", ")
    known = {name.lower() for name in headers}
    for name in (requested or "").split(",")[:MAX_REQUESTED_HEADERS]:
        name = name.strip()
        if _TOKEN.fullmatch(name) and name.lower() not in known:
            headers.append(name)
            known.add(name.lower())
    return response_headers(origins, origin) + [
        (b"access-control-allow-methods", allow.encode()),
        (b"access-control-allow-headers", ", ".join(headers).encode("ascii")),
        (b"access-control-max-age", PREFLIGHT_MAX_AGE),
    ]


def origin_allowed(origins: tuple[str, ...], origin: str | None) -> bool:
    """For WebSocket handshakes: a present Origin must be listed when origins are set."""
    return not origins or origin is None or origin.rstrip("/") in origins
