"""The request/response values handlers see, so that no handler ever touches h11.

A handler is ``async def handler(req: Request) -> Response``. It raises ``HTTPError`` for
any answer that is an error in the API.md §1 shape; the dispatcher renders it.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncGenerator, Generic, Iterable, TypeVar
from urllib.parse import parse_qsl

import orjson

from ..account import DECODED
from ..jsonbounds import CostlyJSON, DecodeRefused, InvalidJSON, decode

if TYPE_CHECKING:
    from ..account import Share

JSON_TYPE = b"application/json"
_INTEGER = re.compile(r"-?[0-9]+")


class HTTPError(Exception):
    """An error answer: ``{"error": code, "status_code": status, **body, **extra}``. ``body``
    carries fields whose names cannot be keywords here (``status``, for one)."""

    def __init__(self, status: int, code: str, headers: Iterable[tuple[bytes, bytes]] = (),
                 body: dict[str, Any] | None = None, **extra: Any):
        super().__init__(code)
        self.status = status
        self.code = code
        self.extra = {**(body or {}), **extra}
        self.headers = list(headers)

    def response(self) -> "Response":
        return json_response({"error": self.code, "status_code": self.status, **self.extra}, self.status,
                             self.headers)


def validation_error(*problems: tuple[list[Any], str]) -> HTTPError:
    """422 ``validation_error`` whose ``detail`` lists ``{"loc": [...], "msg": ...}``."""
    return HTTPError(422, "validation_error", detail=[{"loc": loc, "msg": msg} for loc, msg in problems])


@dataclass(slots=True)
class Response:
    status: int = 200
    body: bytes | bytearray = b""  # a module's reply is forwarded as read (upstream.Reply.body)
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    content_type: bytes | None = JSON_TYPE


@dataclass(slots=True)
class StreamingResponse(Response):
    """A body produced over time: ``body`` (if any) goes out with the head, then ``chunks``
    as they come (chunked to HTTP/1.1, close-delimited to HTTP/1.0), the next one asked for
    only while the client keeps up. An exception from ``chunks`` ends the body truncated (no
    last chunk) so the caller sees it failed. The server closes the generator on every path
    (``aclose()``); a generator never started (a HEAD) runs none of its code, so one that
    holds something (an upstream call) must be started before it is returned, as
    ``api/streams.respond`` does by taking the first chunk."""

    chunks: AsyncGenerator[bytes, None] | None = None


def json_response(data: Any, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None) -> Response:
    return Response(status, orjson.dumps(data), headers if headers is not None else [])


def error_response(status: int, code: str, headers: list[tuple[bytes, bytes]] | None = None, **extra: Any) -> Response:
    return HTTPError(status, code, headers or (), **extra).response()  # one way to build an error body


def empty_response(status: int = 204, headers: list[tuple[bytes, bytes]] | None = None) -> Response:
    return Response(status, b"", headers if headers is not None else [], None)


_NO_BODY = object()
# The gateway state a request carries (``Request.runtime``), named by the layer above: the
# transport neither reads it nor imports its type, so http/ imports nothing from above it;
# handlers take ``Request[Runtime]`` (api/), the dispatcher sets it.
R = TypeVar("R")


class Request(Generic[R]):
    """One parsed HTTP request. ``runtime`` is the gateway state the dispatcher attaches
    (unset until then)."""

    __slots__ = ("method", "target", "path", "query_string", "headers", "body", "client",
                 "http_version", "params", "route_template", "admitted", "correlation_id", "runtime", "share",
                 "_query", "_json", "_gone", "_decoded")

    def __init__(self, method: str, target: str, headers: dict[str, str], body: bytes = b"",
                 client: tuple[str, int] | None = None, http_version: str = "1.1"):
        self.method = method
        self.target = target
        path, _, self.query_string = target.partition("?")
        self.path = path or "/"
        self.headers = headers  # lower-case names; repeated headers joined with ", "
        self.body = body
        self.client = client
        self.http_version = http_version
        self.params: dict[str, str] = {}
        self.route_template: str | None = None  # the matched route's template, for metrics and logs
        self.admitted: Any = None  # the router's Route, once the dispatcher's admit accepted it
        self.correlation_id = ""
        self.runtime: R  # set by the dispatcher, before any handler runs
        self._query: dict[str, str] | None = None
        self._json: Any = _NO_BODY
        self._gone: asyncio.Event | None = None
        # The caller's part of the memory account, if the transport gives one: the decoded
        # body is taken from it (API.md §1) and given back by ``release``.
        self.share: Share | None = None
        self._decoded = 0

    def caller_gone(self) -> asyncio.Event:
        """Set once the caller has closed or dropped its connection (for a handler that
        would rather stop waiting on a module than answer nobody)."""
        if self._gone is None:
            self._gone = asyncio.Event()
        return self._gone

    def hang_up(self) -> None:
        """Called by the transport when the caller goes away."""
        self.caller_gone().set()

    def drop_body(self) -> None:
        """Forget the body and what was parsed from it (the handler is done with them: a
        stream is being relayed), so a long stream does not keep them."""
        self.body = b""
        self._json = _NO_BODY

    @property
    def query(self) -> dict[str, str]:
        """Query parameters; a repeated name keeps its first value."""
        if self._query is None:
            q: dict[str, str] = {}
            for k, v in parse_qsl(self.query_string, keep_blank_values=True):
                q.setdefault(k, v)
            self._query = q
        return self._query

    def json(self) -> Any:
        """The body as JSON, or 400 ``invalid_json``, or 413 ``payload_too_large`` for a body
        that would cost too much decoded (``jsonbounds``), or 503 ``gateway_overloaded`` when
        the caller's share of the memory account has no room for it."""
        if self._json is _NO_BODY:
            if not self.body.strip():
                raise HTTPError(400, "invalid_json", detail="request body is empty; a JSON document is required")
            try:
                self._json, self._decoded = decode(self.body, self.share)
            except InvalidJSON as exc:
                raise HTTPError(400, "invalid_json", detail=f"body is {exc}") from None
            except CostlyJSON as exc:  # refused before it was decoded
                raise HTTPError(413, "payload_too_large", detail=f"body refused: {exc}") from None
            except DecodeRefused as exc:
                raise HTTPError(503, "gateway_overloaded", [(b"retry-after", b"1")], detail=str(exc)) from None
        return self._json

    def release(self) -> None:
        """Give back to the account what the decoded body was counted for (the handler is
        done with it); idempotent."""
        if self.share is not None and self._decoded:
            self.share.give(DECODED, self._decoded)
        self._decoded = 0

    def json_object(self) -> dict[str, Any]:
        """The body as a JSON object, or 422 naming the body."""
        data = self.json()
        if not isinstance(data, dict):
            raise validation_error((["body"], "a JSON object is required"))
        return data

    def int_query(self, name: str, default: int, minimum: int, maximum: int) -> int:
        """An integer query parameter within bounds, or 422 naming it."""
        raw = self.query.get(name)
        if raw is None or raw == "":
            return default
        # int() alone would take "1_000", " +5 " and non-ASCII digits
        if not _INTEGER.fullmatch(raw):
            raise validation_error((["query", name], "must be an integer"))
        value = int(raw)
        if not minimum <= value <= maximum:
            raise validation_error((["query", name], f"must be between {minimum} and {maximum}"))
        return value
