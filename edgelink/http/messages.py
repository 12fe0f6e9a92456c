"""The request/response values handlers see, so that no handler ever touches h11.

A handler is ``async def handler(req: Request) -> Response``. It raises ``HTTPError`` for
any answer that is an error in the API.md §1 shape; the dispatcher renders it.
"""

from __future__ import annotations

import re
from array import array
from dataclasses import dataclass, field
from itertools import accumulate
from typing import TYPE_CHECKING, Any, Iterable
from urllib.parse import parse_qsl

import orjson

if TYPE_CHECKING:  # for the annotation only: the transport does not use the runtime
    from ..runtime import Runtime

JSON_TYPE = b"application/json"
_INTEGER = re.compile(r"-?[0-9]+")

# API.md §1. orjson itself accepts ~1024 levels but refuses to encode past 255, so a deeper
# document would fail later, after it was stored or sent on: refuse it at the door.
MAX_JSON_DEPTH = 64
# translate() tables: keep only brackets and quotes; then openers +1, closers -1 (signed bytes)
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[{]}"')
_BRACKET_SIGNS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def _json_depth(raw: bytes) -> int:
    """How deep ``raw`` nests, in C-speed passes: escaped quotes removed (``\\\\`` first, as
    a left-to-right read pairs them), then only brackets and quotes kept, the pieces between
    quotes (strings) dropped, and the running sum of what remains is the depth."""
    if b"\\" in raw:
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(raw.translate(None, _NOT_STRUCTURE).split(b'"')[::2])
    return max(accumulate(array("b", outside.translate(_BRACKET_SIGNS))), default=0)


class InvalidJSON(ValueError):
    """A document refused by ``parse_json``; the message says why, after "body is"."""


def parse_json(raw: bytes) -> Any:
    """``orjson.loads`` for anything a client sends, refusing depth > ``MAX_JSON_DEPTH``.

    A body with fewer brackets than the limit (most) costs two ``count`` calls."""
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _json_depth(raw) > MAX_JSON_DEPTH:
        raise InvalidJSON(f"nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON(f"not valid JSON: {exc}") from None


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
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    content_type: bytes | None = JSON_TYPE


def json_response(data: Any, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None) -> Response:
    return Response(status, orjson.dumps(data), headers if headers is not None else [])


def error_response(status: int, code: str, headers: list[tuple[bytes, bytes]] | None = None, **extra: Any) -> Response:
    return HTTPError(status, code, headers or (), **extra).response()  # one way to build an error body


def empty_response(status: int = 204, headers: list[tuple[bytes, bytes]] | None = None) -> Response:
    return Response(status, b"", headers if headers is not None else [], None)


_NO_BODY = object()


class Request:
    """One parsed HTTP request. ``runtime`` is the gateway state the dispatcher attaches."""

    __slots__ = ("method", "target", "path", "query_string", "headers", "body", "client",
                 "http_version", "params", "route", "correlation_id", "runtime", "_query", "_json")

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
        self.route: str | None = None  # the matched route template, for metrics and logs
        self.correlation_id = ""
        self.runtime: Runtime = None  # type: ignore[assignment]  # set by the dispatcher
        self._query: dict[str, str] | None = None
        self._json: Any = _NO_BODY

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
        """The body as JSON, or 400 ``invalid_json``."""
        if self._json is _NO_BODY:
            if not self.body.strip():
                raise HTTPError(400, "invalid_json", detail="request body is empty; a JSON document is required")
            try:
                self._json = parse_json(self.body)
            except InvalidJSON as exc:
                raise HTTPError(400, "invalid_json", detail=f"body is {exc}") from None
        return self._json

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


# --- body field checks used by handlers ------------------------------------------------

_TYPE_NAMES = {str: "a string", dict: "an object", list: "a list", bool: "a boolean", int: "an integer"}


def check_fields(data: dict[str, Any], spec: dict[str, tuple[type, bool]]) -> None:
    """Check top-level fields: ``spec`` maps name -> (type, required). ``None`` passes for
    optional fields. Raises one 422 listing every problem. ``bool`` is never an int."""
    problems = []
    for name, (kind, required) in spec.items():
        value = data.get(name)
        if value is None:
            if required:
                problems.append((["body", name], "field required"))
            continue
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if not ok:
            problems.append((["body", name], f"must be {_TYPE_NAMES.get(kind, kind.__name__)}"))
    if problems:
        raise validation_error(*problems)
