"""Caller identity: the X-VX11-Token check and the correlation id (API.md §1)."""

from __future__ import annotations

import hmac
import os

MAX_CORRELATION_ID = 128


class AuthRefused(Exception):
    """The caller is not let in: ``code`` is ``auth_required`` (no token) or ``forbidden``
    (a wrong one); the dispatcher answers 401 or 403."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code
        self.detail = detail


def check_token(expected: str, provided: str | None) -> None:
    """Refuse a missing or wrong token; the comparison takes the same time whatever the
    provided value shares with the expected one."""
    if provided is None or provided == "":
        raise AuthRefused("auth_required", "X-VX11-Token header is required")
    if not hmac.compare_digest(provided.encode(), expected.encode()):
        raise AuthRefused("forbidden", "invalid token")


def correlation_id(incoming: str | None) -> str:
    """The caller's id when it is at most 128 printable ASCII characters, else a new one."""
    if incoming and len(incoming) <= MAX_CORRELATION_ID and all(33 <= ord(c) <= 126 for c in incoming):
        return incoming
    # uuid4().hex without the UUID object (a third of the cost): version 4, RFC 4122 variant
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40
    raw[8] = raw[8] & 0x3F | 0x80
    return raw.hex()
