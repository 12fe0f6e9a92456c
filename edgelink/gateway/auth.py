"""Caller identity: the X-VX11-Token check and the correlation id (API.md §1)."""

from __future__ import annotations

import hmac
import uuid

from ..http.messages import HTTPError

MAX_CORRELATION_ID = 128


def check_token(expected: str, provided: str | None) -> None:
    """401 without a token, 403 with a wrong one; the comparison takes the same time
    whatever the provided value shares with the expected one."""
    if provided is None or provided == "":
        raise HTTPError(401, "auth_required", detail="X-VX11-Token header is required")
    if not hmac.compare_digest(provided.encode(), expected.encode()):
        raise HTTPError(403, "forbidden", detail="invalid token")


def correlation_id(incoming: str | None) -> str:
    """The caller's id when it is at most 128 printable ASCII characters, else a new one."""
    if incoming and len(incoming) <= MAX_CORRELATION_ID and all(33 <= ord(c) <= 126 for c in incoming):
        return incoming
    return uuid.uuid4().hex
