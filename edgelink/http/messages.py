"""The request/response values handlers see, so that no handler ever touches h11.

A handler is ``async def handler(req: Request) -> Response``. It raises ``HTTPError`` for
any answer that is an error in the API.md §1 shape; the dispatcher renders it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable
from urllib.parse import parse_qsl

import orjson

if TYPE_CHECKING:  # for the annotation only: the transport does not use the runtime
    from ..runtime import Runtime

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
                self._json = orjson.loads(self.body)
            except orjson.JSONDecodeError as exc:
                raise HTTPError(400, "invalid_json", detail=f"body is not valid JSON: {exc}") from None
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
