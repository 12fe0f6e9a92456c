"""The body of the request a connection is reading, and what it holds of the memory account.

A body is counted against the body limit as it arrives (413 past it). Only a body the
connection keeps (its route takes one and its token was accepted: ``keep``) is held, and
its bytes are reserved first in the account's piece ``bodies`` and the connection's share:
all of them from Content-Length before a byte is read, or a chunked body's as it grows;
past either, 503 ``gateway_overloaded``. Any other body is read and dropped as it arrives.
The reservation lasts until the exchange is over, or until a stream no longer needs the
body (``release``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..account import BODIES

if TYPE_CHECKING:
    from .connection import HttpProtocol


class Body:
    """One connection's body being read (``parts``, ``size``), whether it is kept, the bytes
    reserved for it, and ``deadline``, the time by which it must have arrived (the loop's
    clock)."""

    __slots__ = ("conn", "parts", "size", "keep", "reserved", "deadline")

    def __init__(self, conn: HttpProtocol) -> None:
        self.conn = conn
        self.parts: list[bytes] = []
        self.size = 0
        self.keep = False  # this request's body is held (admitted, authenticated, reserved)
        self.reserved = 0  # body bytes this request holds of the account (piece "bodies")
        self.deadline = 0.0

    def reserve(self, size: int) -> bool:
        """Hold ``size`` body bytes for this request (in all, not more) of the account and
        this connection's share; past either, answer 503 ``gateway_overloaded`` and close
        (the account counts the refusal under ``bodies``)."""
        share = self.conn.share
        assert share is not None
        if not share.take(BODIES, size - self.reserved):
            self.conn.refuse.bodies_over_account()
            return False
        self.reserved = size
        return True

    def receive(self, data: bytes) -> bool:
        """A piece of the body arrived: count it, and hold it if the body is kept; False
        once refused (over the body limit, or past the account)."""
        self.size += len(data)
        if self.size > self.conn.settings.max_body:
            self.conn.refuse.body_too_large()
            return False
        if self.keep:  # any other body is read and dropped as it arrives
            if self.size > self.reserved and not self.reserve(self.size):
                return False  # a chunked body past what the account or this share may hold
            self.parts.append(data)
        return True

    def take(self) -> bytes:
        """The whole body, for the request (it keeps its reservation until ``release``)."""
        body = b"".join(self.parts)
        self.parts = []
        return body

    def release(self) -> None:
        """The exchange is over (or a stream no longer needs the body): give its bytes back
        and make ready for the next request's."""
        self.size = 0
        self.keep = False
        if self.reserved:
            self.reserved = 0
            share = self.conn.share
            if share is not None:
                share.give(BODIES, share.by_piece.get(BODIES, 0))
