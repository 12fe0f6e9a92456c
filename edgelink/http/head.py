"""The head of a request, read within its limits, and the answers a connection gives
itself when a client passes one (``Refusals``).

The limits are the request line (414), the header block (431) and the number of header
fields (431). h11 bounds only a head still incomplete and would wait for the whole block
before saying anything, and a head of many short fields costs it far more to parse than its
bytes suggest; so the connection counts line ends as bytes arrive (``Head.lines``) and looks
closer, rarely, only past the limit (``too_many_fields``), refuses a request line as soon as
it is known to be too long (``line_too_long``), and measures a head that arrived whole once
h11 has parsed it (``read``).

A refusal is answered once with ``raw_error``, counted as a budget refusal, logged (rate
limited per address and in total) and closes that connection only."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import h11

from ..log import address, client_log, log
from .messages import Request
from .wire import RETRY_AFTER, bad_request_detail, origin_form, raw_error

if TYPE_CHECKING:
    from .connection import HttpProtocol

_VERSIONS = {b"1.1": "1.1", b"1.0": "1.0"}


class Refusals:
    """The errors one connection answers itself, then closes: each ends its connection, so
    a client is logged once per connection, not once per request it sent."""

    __slots__ = ("conn",)

    def __init__(self, conn: HttpProtocol) -> None:
        self.conn = conn

    def refuse(self, status: int, code: str, budget: str | None = None, headers: bytes = b"",
               **extra: Any) -> None:
        """Answer ``status`` with ``code`` (``budget``: the transport budget to count it
        under), then close the connection."""
        conn = self.conn
        if budget is not None:
            conn.server.dispatcher.refused(budget)
        if client_log.allow(address(conn.client)) is not None:
            log.info("request_refused", status=status, error=code, client=address(conn.client),
                     **({"detail": extra["detail"]} if "detail" in extra else {}))
        if not conn.transport.is_closing():
            conn.transport.write(raw_error(status, code, headers, **extra))
        conn.close()

    def request_line(self) -> None:
        self.refuse(414, "uri_too_long", "request_line",
                    detail=f"request line exceeds {self.conn.settings.max_request_line} bytes")

    def header_block(self) -> None:
        self.refuse(431, "headers_too_large", "header_block",
                    detail=f"header block exceeds {self.conn.settings.max_header} bytes")

    def header_fields(self) -> None:
        self.refuse(431, "headers_too_large", "header_fields",
                    detail=f"more than {self.conn.settings.max_header_fields} header fields")

    def body_too_large(self) -> None:
        self.refuse(413, "payload_too_large", "body", detail=f"body exceeds {self.conn.settings.max_body} bytes")

    def bodies_over_account(self) -> None:
        """Past the account of bodies or this connection's share (counted under ``bodies``
        by the account itself)."""
        self.refuse(503, "gateway_overloaded", headers=RETRY_AFTER,
                    detail="request bodies in progress would exceed the memory account "
                           "(EDGELINK_MEMORY_BUDGET, EDGELINK_MAX_BODIES) or this connection's share; retry")

    def overloaded(self, what: str) -> None:
        """Resident memory is over the soft mark: no new ``what``."""
        overload = self.conn.server.overload
        if overload is not None:
            overload.count("refuse_new_work")
        self.refuse(503, "gateway_overloaded", headers=RETRY_AFTER,
                    detail=f"resident memory is over EDGELINK_MEMORY_SOFT: no new {what} for now; retry")

    def timeout(self) -> None:
        self.refuse(408, "request_timeout", "request_time", detail="request not received in time")

    def protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        """What h11 refused: 431 (or 414, when the request line is what is too long) for a
        head over its size, else 400, never with h11's own message: it quotes the
        offending line, which may hold a token."""
        if exc.error_status_hint == 431:
            if not self.conn.head.line_too_long(self.conn.conn.trailing_data[0]):
                self.header_block()
        else:
            self.refuse(400, "bad_request", detail=bad_request_detail(str(exc)))


class Head:
    """Where the head being read stands against its limits, for one connection:
    ``lines``, the line ends read since it began, and ``line_checked``, its request line
    known to be within the limit. Past a limit it refuses (``refuse``) and says so."""

    __slots__ = ("settings", "refuse", "lines", "line_checked")

    def __init__(self, settings: Any, refuse: Refusals) -> None:
        self.settings = settings
        self.refuse = refuse
        self.lines = 0
        self.line_checked = False

    def line_too_long(self, pending: bytes) -> bool:
        """While a request has not been parsed (``pending``: what h11 holds of it): refuse
        it with 414 as soon as its first line is known to be over the limit (h11 would
        wait for the whole header block)."""
        limit = self.settings.max_request_line
        if pending.find(b"\n", 0, limit + 1) != -1:
            self.line_checked = True
            return False
        if len(pending) <= limit:
            return False
        self.refuse.request_line()
        return True

    def too_many_fields(self, pending: bytes) -> bool:
        """With the line count past the limit: whether the head being read has more fields
        than allowed (refused with 431 if so), counted up to its end or the header block
        limit, before h11 parses a field of it. Pipelined requests behind a head of few
        fields also push the count up: then it starts again."""
        limit = self.settings.max_header
        end = pending.find(b"\n\r\n", 0, limit)
        if end == -1:
            end = pending.find(b"\n\n", 0, limit)
        lines = pending.count(b"\n", 0, limit if end == -1 else end + 1)
        if lines > self.settings.max_header_fields + 1:  # the request line, then a field a line
            self.refuse.header_fields()
            return True
        self.lines = 0
        return False

    def read(self, event: h11.Request, client: tuple[str, int] | None) -> Request | None:
        """The request h11 parsed, measured against the limits (a head that arrived whole
        was not bounded by h11); None once refused."""
        settings = self.settings
        if len(event.method) + len(event.target) + 10 > settings.max_request_line:  # "M T HTTP/1.1"
            self.refuse.request_line()
            return None
        size = len(event.target)
        headers: dict[str, str] = {}
        for name, value in event.headers.raw_items():  # a list: cheaper than iterating Headers
            size += len(name) + len(value) + 4
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        if size > settings.max_header:
            self.refuse.header_block()
            return None
        if len(event.headers) > settings.max_header_fields:  # those the line count missed
            self.refuse.header_fields()
            return None
        self.lines = 0
        self.line_checked = False
        target = event.target.decode("latin-1")
        if not target.startswith("/"):
            target = origin_form(target)
        request: Request = Request(event.method.decode("ascii"), target, headers, client=client,
                          http_version=_VERSIONS.get(event.http_version) or event.http_version.decode())
        if "%" in request.path:
            request.path = unquote(request.path)
        return request
