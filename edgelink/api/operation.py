"""The words an endpoint's OpenAPI operation is written in, and ``@documented``, which
declares it beside its handler (API.md §7).

An ``Operation`` says what the router does not know about an endpoint: its parameters,
request body and responses. Responses are *cases*, one cause of one status code each;
openapi.py merges the cases of one status into one response object, adds 401/403 to
protected routes and the server's connection-level refusals to every operation.

Each handler in ``edgelink/api/`` carries its summary, tags and ``Operation`` in a
``@documented(...)`` line above it; the endpoint table (app.py) reads it from there, so the
table says only method, path, handler and auth, and a handler cannot be served undocumented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from ..config import KNOB

JSON = "application/json"
PROMETHEUS = "text/plain; version=0.0.4"
HTML = "text/html"
SSE = "text/event-stream"


def ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


# --- responses ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Case:
    """One cause of one status. ``codes``: the body is an ``Error`` with one of these codes;
    ``schema``: the body has this schema; neither: no body."""

    status: str
    description: str
    codes: tuple[str, ...] = ()
    schema: dict[str, Any] | None = None
    media_type: str = JSON
    correlated: bool = True  # sends X-Correlation-ID
    headers: tuple[tuple[str, str], ...] = ()  # (name, description)


def error(status: int, codes: str | tuple[str, ...], description: str, *, correlated: bool = True,
           headers: tuple[tuple[str, str], ...] = ()) -> Case:
    """A case whose body is an ``Error`` with one of ``codes``."""
    codes = (codes,) if isinstance(codes, str) else codes
    return Case(str(status), description, codes=codes, correlated=correlated, headers=headers)


def returns(status: int, description: str, schema: str, *, media_type: str = JSON) -> Case:
    """A case whose body has the schema named ``schema`` (of openapi.py's ``SCHEMAS``)."""
    return Case(str(status), description, schema=ref(schema), media_type=media_type)


# Cases several operations share.
AUTH_CASES = (
    error(401, "auth_required", "no X-VX11-Token header."),
    error(403, "forbidden", "the X-VX11-Token header is not the gateway token."),
)
WS_AUTH_CASES = (
    error(401, "auth_required", "no token, neither as X-VX11-Token header nor as `?token=`."),
    error(403, "forbidden", "the token is not the gateway token, or the Origin is not allowed "
                             "(when EDGELINK_CORS_ORIGINS is set)."),
)
INVALID_JSON = error(400, "invalid_json", "the body is empty or not valid JSON.")
VALIDATION = Case("422", "`validation_error`: a field is missing, of the wrong type or out of range.",
                  schema=ref("ValidationError"))
UPSTREAM_CASES = (
    error(502, "upstream_unavailable", "the module could not be reached, hung up, spoke invalid HTTP, or "
                                        f"answered without JSON or with more than {KNOB['upstream_max_reply'].shown()} "
                                        f"({KNOB['upstream_max_reply'].env[0]})."),
    error(503, ("circuit_open", "module_disabled", "gateway_overloaded"),
          "the module's circuit breaker is open (it is not contacted), the module is disabled, or the "
          "gateway itself is out of file descriptors or buffers (`gateway_overloaded`: not the module's fault, "
          "its breaker is not told)."),
    error(504, "upstream_timeout", "the module did not answer within the route's timeout."),
)
STREAM_HEADERS = (("Cache-Control", "`no-cache`"), ("X-Accel-Buffering", "`no`: proxies must not buffer it."))

# --- parameters -----------------------------------------------------------------------


def param(name: str, where: str, description: str, schema: dict[str, Any], *,
           required: bool = False, example: Any = None) -> dict[str, Any]:
    """``example`` is what /docs' "try it" starts from; a required parameter needs one."""
    found = {"name": name, "in": where, "description": description, "required": required, "schema": schema}
    return found if example is None else {**found, "example": example}


def query_param(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    """An optional query parameter, for which an empty value counts as absent (as in the handlers)."""
    return {**param(name, "query", f"{description} Empty: as absent.", schema), "allowEmptyValue": True}


def path_param(name: str, description: str, example: str) -> dict[str, Any]:
    return param(name, "path", description, {"type": "string", "minLength": 1}, required=True, example=example)


# --- operations ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Operation:
    """What the router does not know about an endpoint."""

    cases: tuple[Case, ...]
    description: str = ""
    parameters: tuple[dict[str, Any], ...] = ()  # path and query parameters, in that order
    request_body: dict[str, Any] | None = None
    forwards: bool = False
    auth_cases: tuple[Case, ...] = AUTH_CASES
    security: tuple[str, ...] = ("VX11Token",)  # alternatives, for protected routes


def json_body(schema: str, example: Any, *, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {JSON: {"schema": ref(schema), "example": example}}}


# --- the declaration beside a handler ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Documentation:
    """What ``GET /openapi.json`` says of one endpoint besides its method, path and auth."""

    summary: str
    tags: tuple[str, ...]
    operation: Operation


HandlerT = TypeVar("HandlerT", bound=Callable[..., Any])
_ATTRIBUTE = "edgelink_documentation"


def documented(summary: str, tags: tuple[str, ...], operation: Operation) -> Callable[[HandlerT], HandlerT]:
    """Declare the handler's documentation; the handler itself is returned unchanged (the
    router reads its code to know whether it suspends)."""
    def declare(handler: HandlerT) -> HandlerT:
        setattr(handler, _ATTRIBUTE, Documentation(summary, tags, operation))
        return handler
    return declare


def documentation(handler: Callable[..., Any]) -> Documentation:
    """The handler's ``@documented`` declaration; LookupError names a handler without one."""
    found = getattr(handler, _ATTRIBUTE, None)
    if not isinstance(found, Documentation):
        raise LookupError(f"{handler.__module__}.{handler.__qualname__} is served but not described: "
                          f"declare its documentation with @documented beside it")
    return found
