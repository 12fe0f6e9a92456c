"""The OpenAPI 3.1 document served at ``GET /openapi.json`` (API.md §7): the schema data,
and a builder that walks the endpoint table.

Theory of operation
-------------------
Each entry of the endpoint table (app.py) declares its path once, with its handler and
auth; the handler's summary, tags and ``Operation`` (what the router cannot know, its
parameters, request body and responses) are declared beside it (``@documented``, in
api/operation.py, which also holds the pieces operations are made of). Aliases
(``/v1/health``) repeat their route's ``Operation``. The WebSocket route (``"WS"``) is
documented as a ``GET`` that answers ``101 Switching Protocols``. This file holds the
schemas, the cases every operation gets, and the builder.

``document(router)`` walks the router. A route without an ``Operation`` raises
``DocumentError``, so an endpoint cannot ship undocumented.

Responses are assembled from *cases*, one cause of one status code each. An operation
lists its own cases; protected routes also get 401/403, and every operation gets the
connection-level cases that the HTTP server answers before any route is chosen
(400/408/413/431/503). Cases sharing a status merge into one response object: the
descriptions are joined, the error codes of ``Error`` bodies are united into one enum,
different body schemas become an ``anyOf``, and the ``X-Correlation-ID`` response header is
required only when every case sends it (the server's connection-level refusals are written
before a correlation id exists).

Routes that forward a module's reply (``forwards``) answer with the module's own status
and JSON body, whatever they are: each of their responses also admits ``ModuleReply``, and
``default`` covers the statuses not listed.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from . import __version__
from .api.chat import MAX_MESSAGE as MAX_CHAT_MESSAGE
from .api.events import RECENT_IN_SNAPSHOT, SNAPSHOT_TYPES, TIMELINE_MAX
from .api.health import MAX_HISTORY
from .api.operation import JSON, Case, Operation, error, param, ref
from .config import KNOB
from .gateway.auth import MAX_CORRELATION_ID
from .gateway.events import MAX_NAME_LENGTH
from .gateway.events import SCHEMAS as EVENT_SCHEMAS
from .gateway.events import Schema as EventSchema
from .gateway.observe import MAX_NODES
from .http.router import Route, Router

OPENAPI_VERSION = "3.1.0"


class DocumentError(RuntimeError):
    """A route is served but not described, or is described with other path parameters,
    or two routes would be one operation."""


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


_STR = {"type": "string"}
_INT = {"type": "integer"}
_COUNT = {"type": "integer", "minimum": 0}
_NUMBER = {"type": "number"}
_BOOL = {"type": "boolean"}
_MS = {"type": "integer", "description": "Unix epoch milliseconds."}
_SECONDS = {"type": "number", "description": "Unix epoch seconds."}
_ISO_UTC = {"type": "string", "format": "date-time", "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$"}
_CORRELATION_VALUE = {"type": "string", "pattern": rf"^[!-~]{{1,{MAX_CORRELATION_ID}}}$"}


def _object(required: dict[str, Any], optional: dict[str, Any] | None = None, *, closed: bool = False,
            description: str | None = None) -> dict[str, Any]:
    """An object schema whose ``required`` keys must all be present."""
    schema: dict[str, Any] = {"type": "object", "required": list(required),
                              "properties": {**required, **(optional or {})}}
    if closed:
        schema["additionalProperties"] = False
    if description:
        schema["description"] = description
    return schema


def _map(values: dict[str, Any], description: str) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": values, "description": description}


# JSON Schema types for the kinds of gateway/events.py. The JSON decoder reads 1.0, 1e3 and
# integers outside [-2**63, 2**64 - 1] as floats, which the validator refuses where an
# integer is required, although JSON Schema calls them integers.
_KIND_TYPES = {"str": "string", "int": "integer", "float": "number", "list": "array", "object": "object"}
_INTEGER = {"type": "integer", "minimum": -(2**63), "maximum": 2**64 - 1,
            "description": "Written without a fraction or exponent (`1`, not `1.0` or `1e0`)."}


def _payload_name(event_type: str) -> str:
    return "".join(part.title() for part in re.split(r"[._]", event_type)) + "Payload"


def _payload_schema(schema: EventSchema) -> dict[str, Any]:
    """The JSON Schema of one canonical payload, from the validator's own table."""
    properties: dict[str, Any] = {}
    for f in schema.fields:
        types = {_KIND_TYPES[k] for k in f.kinds}
        kind = "number" if "number" in types else types.pop()
        properties[f.name] = dict(_INTEGER) if kind == "integer" else {"type": kind}
        if kind == "array":  # any items (the validator checks only the list); generators need the key
            properties[f.name]["items"] = {}
    return {"type": "object", "required": [f.name for f in schema.fields], "properties": properties,
            "description": f"`{schema.type}` ({schema.nature}): at most {schema.max_bytes} bytes as compact JSON."}


def _ingest_requests() -> dict[str, dict[str, Any]]:
    """The ingest envelope: ``IngestRequest`` is one of a complete, named schema per canonical
    ``type`` (with its payload schema) and one for any other type, so that a generated
    client has a model per branch with every field (``source`` included)."""
    def branch(type_schema: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
        return _object(
            {"source": {"type": "string", "minLength": 1, "maxLength": MAX_NAME_LENGTH},
             "type": type_schema, "payload": payload},
            {"broadcast": {**_nullable(_BOOL), "default": False,
                           "description": "Send a canonical event to WebSocket clients."},
             "metadata": _nullable({"type": "object"})})

    branches = {f"Ingest{_payload_name(t).removesuffix('Payload')}": branch({"const": t}, ref(_payload_name(t)))
                for t in EVENT_SCHEMAS}
    branches["IngestOtherEvent"] = branch(
        {"type": "string", "minLength": 1, "maxLength": MAX_NAME_LENGTH, "not": {"enum": list(EVENT_SCHEMAS)}},
        {"type": "object"})
    return {
        "IngestRequest": {
            "oneOf": [ref(name) for name in branches],
            "description": "A canonical `type` is checked against its payload schema (else 422 "
                           "`schema_validation_failed`); any other type is stored unchecked and never broadcast.",
        },
        **branches,
    }


_MODULE_HEALTH_STATUSES = ["ok", "error", "unreachable", "timeout", "disabled"]

# One stored event, as the snapshot lists it and (with "channel") as /ws broadcasts it.
_EVENT_FIELDS = {
    "event_id": _STR,
    "seq": {"type": "integer", "minimum": 1},
    "type": _STR,
    "source": _STR,
    "timestamp": _MS,
    "payload": {"type": "object"},
    "metadata": _nullable({"type": "object"}),
}

SCHEMAS: dict[str, dict[str, Any]] = {
    # --- errors (API.md §1)
    "Error": _object(
        {"error": {"type": "string", "description": "Machine-readable code."},
         "status_code": {"type": "integer", "minimum": 400, "maximum": 599, "description": "The HTTP status."}},
        {"detail": {"type": "string", "description": "What went wrong, for a human."},
         "correlation_id": _STR,
         "module": {"type": "string", "description": "The module an upstream error is about."}},
        description="Every error body. Some codes add fields (`session_id`, `known`, `status`).",
    ),
    "ValidationProblem": _object({"loc": {"type": "array", "items": {"type": ["string", "integer"]},
                                          "description": "Where: `body`, `query`, then field names."},
                                  "msg": _STR}),
    "ValidationError": _object(
        {"error": {"const": "validation_error"}, "status_code": {"const": 422},
         "detail": {"type": "array", "minItems": 1, "items": ref("ValidationProblem")}},
        {"correlation_id": _STR},
        description="A malformed request: every problem found, each with its location.",
    ),
    # --- health and modules (API.md §2)
    "Health": _object(
        {"status": {"enum": ["ok", "stopping"]}, "module": {"const": "tentaculo_link"},
         "version": {"const": "7.0"}, "edgelink": {"type": "string", "description": "The package version."}},
        {"error": {"const": "stopping"}, "status_code": {"const": 503}},
    ),
    "ModuleHealth": _object({
        "status": {"enum": _MODULE_HEALTH_STATUSES},
        "http_code": _nullable(_INT),
        "latency_ms": _nullable(_NUMBER),
        "url": _STR,
        "error": _nullable(_STR),
        "trend": {"enum": ["stable", "degrading", "recovering", "unknown"],
                  "description": "The module's health prediction (API.md §11): its recent latency and error rate "
                                 "against its baseline; `unknown` until enough samples (and for a disabled module)."},
        "anomaly_score": {"type": "number", "minimum": 0,
                          "description": "How far the recent behaviour is from the baseline, in standard "
                                         "deviations: 0 = as usual; `degrading` from 4."},
    }, description="One module's `GET <url>/health` probe; a disabled module is listed, not probed. The fields "
                   "of the module's own `/health` JSON object are there too (up to 4 KiB of it, as Tentáculo "
                   "Link showed them); the gateway's fields win a clash."),
    "Status": _object({
        "ok": {"const": True},
        "status": {"const": "ok"},
        "module": {"const": "tentaculo_link"},
        "version": {"const": "7.0"},
        "timestamp": _ISO_UTC,
        "ports": {**_map(_INT, "Port per module, plus the gateway's own as `tentaculo_link` and `gateway`."),
                  "required": ["tentaculo_link", "gateway"]},
        "modules": _map(ref("ModuleHealth"), "Health per module, disabled ones included."),
        "summary": _object({"healthy_modules": _COUNT, "total_modules": _COUNT, "all_healthy": _BOOL},
                           description="Over enabled modules only."),
    }),
    "Overview": _object({
        "status": {"const": "ok"},
        "gateway": {"const": "tentaculo_link"},
        "version": {"const": "7.0"},
        "modules_health": _map(ref("ModuleHealth"), "Health per module, disabled ones included."),
        "summary": _object({"total_modules": _COUNT, "healthy": _COUNT, "unhealthy": _COUNT},
                           description="Over enabled modules only."),
    }),
    "Breaker": _object({
        "state": {"enum": ["closed", "open", "half_open"]},
        "failure_count": _COUNT,
        "last_failure": _nullable(_SECONDS),
    }),
    "BreakerStatus": _object({
        "status": {"const": "ok"},
        "breakers": _map(ref("Breaker"), "Per enabled module."),
        "timestamp": _SECONDS,
    }),
    # --- routing to modules (API.md §3)
    "RouteTarget": _object({"module": _STR, "endpoint": _STR, "method": _STR,
                            "timeout": {"type": "number", "description": "Seconds."}}),
    "Route": _object({
        "module": _STR, "endpoint": _STR, "method": _STR,
        "timeout": {"type": "number", "description": "Seconds."},
        "description": _STR, "auth_required": _BOOL,
        "stream": {"type": "boolean", "description": "The module's reply is relayed as it arrives (API.md §3)."},
        "fallback": _nullable(ref("RouteTarget")),
    }),
    "Routes": _object({"routes": _map(ref("Route"), "Per intent.")}),
    "IntentRequest": {"type": "object", "description": "Any JSON object; forwarded to the module as is."},
    "ModuleReply": {"description": "Any JSON value: the module's reply, forwarded as is."},
    # --- chat and sessions (API.md §4)
    "ChatRequest": _object(
        {"message": {"type": "string", "minLength": 1, "maxLength": MAX_CHAT_MESSAGE}},
        {"session_id": {**_nullable(_STR), "description": "Continue this session; absent: a new one."},
         "user_id": {**_nullable(_STR), "description": "Sent to the modules as `local` when absent or null."},
         "metadata": {**_nullable({"type": "object"}), "description": "Sent to the modules as `{}` when absent "
                                                                    "or null."},
         "stream": {**_BOOL, "description": "true: answer `text/event-stream` (meta, delta..., done | error)."}},
    ),
    # text/event-stream answers are described one event at a time ({event, data, id, retry}).
    "ChatEvent": _object(
        {"event": {"enum": ["meta", "delta", "done", "error"]},
         "data": {"type": "string", "contentMediaType": JSON, "description": (
             "JSON: `meta` {session_id, correlation_id, provider}, then `delta` {text} as the `stream` route "
             "produces text, then `done` {response, model_used, provider, latency_ms, degraded} or `error` "
             "{error: \"chat_unavailable\"}. A reply longer than a quarter of EDGELINK_UPSTREAM_MAX_REPLY (in "
             "bytes) is relayed whole, but `done` carries its start as `response` with `truncated: true`.")}},
        description="One server-sent event of a streamed chat."),
    "StreamedEvent": {"type": "object", "description": (
        "One event of the module's stream, relayed as it arrives. A module silent for EDGELINK_STREAM_IDLE after "
        "the first byte ends an SSE stream with an `error` event (data {error, module, detail}), and any other "
        "body without its last chunk.")},
    "ChatResponse": _object({
        "session_id": _STR,
        "response": _STR,
        "model_used": _STR,
        "provider": {"type": "string", "description": "The module that answered: `switch`, or `madre` "
                                                      "(the fallback) with the default route table."},
        "latency_ms": _NUMBER,
        "correlation_id": _STR,
        "status": {"const": "ok"},
        "degraded": {"type": "boolean", "description": "True when the fallback answered."},
    }, description="The module's other top-level fields (`tokens`, `sources`, ...) are passed through as it "
                   "sent them; the fields above are the gateway's."),
    "ChatUnavailable": _object(
        {"error": {"const": "chat_unavailable"}, "status_code": {"const": 503}, "session_id": _STR,
         "correlation_id": _STR},
        {"detail": _STR},
        description="Neither the chat route nor its fallback answered; the user message is in the session.",
    ),
    "SessionMessage": _object({
        "role": {"type": "string", "description": "`user` or `assistant`."},
        "content": _STR,
        "timestamp": _MS,
        "metadata": _nullable({"type": "object"}),
    }),
    "Session": _object({
        "session_id": _STR,
        "user_id": {"type": "string", "description": "`local` when the chat named none."},
        "summary": {"type": "string", "description": "The context summary sent to the modules: the last "
                                                     "messages as `role: content` lines."},
        "created_at": _MS,
        "last_active_at": _MS,
        "expires_at": _MS,
        "message_count": _COUNT,
        "messages": {"type": "array", "items": ref("SessionMessage")},
    }),
    "SessionSummary": _object({"session_id": _STR, "created_at": _MS, "expires_at": _MS,
                               "message_count": _COUNT}),
    "SessionList": _object({
        "sessions": {"type": "array", "items": ref("SessionSummary"),
                     "description": "Live sessions, most recently active first."},
        "total": _COUNT,
    }),
    "SessionCleanup": _object({
        "status": {"const": "ok"},
        "removed": {**_COUNT, "description": "Expired sessions removed by this sweep."},
        "total": {**_COUNT, "description": "Live sessions after the sweep."},
    }),
    # --- events (API.md §5)
    **_ingest_requests(),
    **{_payload_name(t): _payload_schema(schema) for t, schema in EVENT_SCHEMAS.items()},
    "IngestAccepted": _object({
        "status": {"const": "received"},
        "event_id": _STR,
        "seq": {"type": "integer", "minimum": 1},
        "source": _STR,
        "type": _STR,
        "canonical": _BOOL,
        "broadcast": {"type": "boolean", "description": "Whether it went out to WebSocket clients."},
    }, description="Committed to the ledger before this answer."),
    "IngestRejected": _object(
        {"status": {"const": "rejected"}, "reason": {"const": "schema_validation_failed"},
         "source": _STR, "type": _STR,
         "detail": {"type": "string", "description": "The rule that failed."},
         "error": {"const": "schema_validation_failed"}, "status_code": {"const": 422}},
        {"correlation_id": _STR},
        description="A canonical event broke its schema; nothing was stored.",
    ),
    "Cardinality": _object({
        "status": {"const": "ok"},
        "timestamp": _MS,
        "window_seconds": _NUMBER,
        "events": _map(_object({"count": {"type": "integer", "minimum": 1}, "rate_per_min": _NUMBER}),
                       "Per event type."),
        "total_events": _COUNT,
    }),
    "CorrelationNode": _object({
        "id": {"type": "string", "description": "The event id."},
        "type": {"enum": list(EVENT_SCHEMAS)},
        "timestamp": _MS,
        "severity": _nullable(_STR),
        "nature": {"enum": list(dict.fromkeys(s.nature for s in EVENT_SCHEMAS.values()))},
    }),
    "CorrelationEdge": _object({"source": _STR, "target": _STR, "strength": _NUMBER}),
    "Correlations": _object({
        "status": {"const": "ok"},
        "timestamp": _MS,
        "graph": _object({
            "nodes": {"type": "array", "maxItems": MAX_NODES, "items": ref("CorrelationNode")},
            "edges": {"type": "array", "items": ref("CorrelationEdge")},
            "total_nodes": _COUNT,
            "total_edges": _COUNT,
        }),
    }),
    "StoredEvent": _object(_EVENT_FIELDS, closed=True),
    "RecordedModuleHealth": _object({
        "status": {"type": "string", "description": "A ModuleHealth status (a database from an older "
                                                    "version may hold others)."},
        "http_code": _nullable(_INT),
        "latency_ms": _nullable(_NUMBER),
        "url": _nullable(_STR),
        "error": _nullable(_STR),
        "checked_at": _MS,
    }),
    "Snapshot": _object({
        "timestamp": _MS,
        "state": _map(_object({"status": _STR}),
                      "Tentáculo Link's key: per module, its recorded status at `timestamp`."),
        "modules": _map(ref("RecordedModuleHealth"),
                        "Per module, its last recorded probe at or before `timestamp`."),
        "events": _object({
            "counts_by_type": _map(_COUNT, "Stored events per type at or before `timestamp`: the "
                                           f"{SNAPSHOT_TYPES} types with most events at most."),
            "other_types": {**_COUNT, "description": "Stored events of the types not listed in "
                                                     "`counts_by_type`."},
            "recent": {"type": "array", "maxItems": RECENT_IN_SNAPSHOT, "items": ref("StoredEvent"),
                       "description": "Newest first."},
        }),
    }),
    "Timeline": _object({
        "status": {"const": "ok"},
        "since": _MS,
        "until": _MS,
        "correlation_id": _nullable(_STR),
        "events": {"type": "array", "maxItems": TIMELINE_MAX, "items": ref("StoredEvent"),
                   "description": "Oldest first, by the gateway's receive time (`timestamp`); the event's "
                                  "own time is its payload's `timestamp`."},
        "truncated": {"type": "boolean", "description": "More events match than were returned (the limit, "
                                                        "the byte bound or the correlation scan was reached)."},
    }),
    # --- WebSocket frames (API.md §6), described by GET /ws
    "WsConnected": _object({
        "channel": {"const": "control"}, "type": {"const": "connected"}, "client_id": _STR,
        "last_seq": _COUNT, "replayed": _COUNT, "truncated": _BOOL,
    }),
    "WsEvent": _object({"channel": {"const": "event"}, **_EVENT_FIELDS},
                       description="An event sent by a WebSocket client in the flat form (`type` plus the "
                                   "payload fields) also has its payload fields at the top level, as "
                                   "Tentáculo Link broadcast it; the fields above win a clash."),
    "WsError": _object({"channel": {"const": "control"}, "type": {"const": "error"}, "error": _STR},
                       {"detail": _STR,
                        "event_type": {"type": "string", "description": "The type of a rejected event."}}),
    "HealthPoint": _object({"checked_at": _MS, "status": _STR, "http_code": _nullable(_INT),
                            "latency_ms": _nullable(_NUMBER)}),
    "HealthHistory": _object({"module": _STR, "points": {"type": "array", "maxItems": MAX_HISTORY,
                                                         "items": ref("HealthPoint"),
                                                         "description": "Oldest first."}}),
    # --- forwarding (API.md §9)
    "ForwardStatus": _object({
        "enabled": _BOOL, "engine": _nullable({"enum": ["nats", "mqtt"]}),
        "url": _nullable({"type": "string", "description": "The broker URL without credentials."}),
        "edge_id": _STR, "epoch": _STR, "state": {"enum": ["disabled", "connecting", "connected", "backoff"]},
        "acked_seq": _COUNT, "last_seq": _COUNT, "backlog": _COUNT, "in_flight": _COUNT,
        "last_error": _nullable(_STR), "last_error_at": _nullable(_MS), "last_ack_at": _nullable(_MS),
        "dropped": _COUNT, "dead_letters": _COUNT,
        "lag_seconds": {"type": "number", "minimum": 0,
                        "description": "Age of the oldest event not yet forwarded (0 when none)."},
    }, closed=True),
    "ForwardDeadLetters": _object({
        "dead_letters": {"type": "array", "items": _object({
            "seq": _COUNT, "event_id": _STR, "type": _STR,
            "reason": {"enum": ["too_large", "acl", "invalid"]}, "detail": _STR, "at": _MS, "stored": _BOOL,
        }, closed=True)},
        "total": _COUNT,
    }, closed=True),
    "ForwardRewind": _object({}, {"from_seq": {"type": "integer", "minimum": 1,
                                               "description": "Absent: the oldest stored event."}}),
    "ForwardRewound": _object({"from_seq": _COUNT, "acked_seq": _COUNT, "backlog": _COUNT}, closed=True),
    # --- operations
    "PrometheusText": {"type": "string", "description": "Prometheus text exposition format 0.0.4."},
    "Text": {"type": "string", "description": "An HTML page, a stylesheet or a script."},
    "OpenAPIDocument": _object({"openapi": {"const": OPENAPI_VERSION}, "info": {"type": "object"},
                                "paths": {"type": "object"}}),
}

# --- what every operation gets --------------------------------------------------------

# Answered by the HTTP server before a route is chosen, on any path.
CONNECTION_CASES = (
    error(400, "bad_request", "the request is not valid HTTP/1.1.", correlated=False),
    error(408, "request_timeout", "the header block or the body did not arrive within the header "
                                   f"timeout ({KNOB['header_timeout'].quote()}).", correlated=False),
    error(413, "payload_too_large", f"the body is over the limit ({KNOB['max_body'].quote()}), decided "
                                     "from Content-Length before reading it, or while reading a chunked body; "
                                     "or a JSON body whose structure would cost more than 8 times its size to "
                                     "decode (such as `[[],[],...]`), refused before decoding, the detail says so.",
           correlated=False),
    error(431, "headers_too_large", f"the header block is over the limit ({KNOB['max_header'].quote()}), "
                                     f"or has more fields than allowed ({KNOB['max_header_fields'].quote()}).",
           correlated=False),
    error(503, ("too_many_connections", "gateway_overloaded", "stopping"),
           "the connection limit is reached; or (`gateway_overloaded`, with `Retry-After`, the body not read) "
           "the body would take the memory account, its bodies' part or this connection's share past "
           f"their bounds ({KNOB['memory_budget'].quote()}; {KNOB['max_bodies'].quote()}; "
           f"{KNOB['client_share'].quote()}), or resident memory is over the soft mark "
           f"({KNOB['memory_soft'].quote()}); or the gateway is shutting down.", correlated=False),
)
FORWARDED = Case("default", "The module's own reply, forwarded with its status and JSON body.",
                 schema=ref("ModuleReply"))

COMPONENTS: dict[str, Any] = {
    "securitySchemes": {
        "VX11Token": {"type": "apiKey", "in": "header", "name": "X-VX11-Token",
                      "description": "The gateway token (VX11_TENTACULO_LINK_TOKEN or VX11_GATEWAY_TOKEN)."},
        "VX11TokenQuery": {"type": "apiKey", "in": "query", "name": "token",
                           "description": "The gateway token as a query parameter; WebSocket only."},
    },
    "parameters": {
        "CorrelationId": param(
            "X-Correlation-ID", "header",
            f"Your id for this request, passed to every module call and sent back. Kept when it is 1 to "
            f"{MAX_CORRELATION_ID} visible ASCII characters (no spaces), else replaced by a new uuid4 hex.", _STR),
    },
    "headers": {
        "CorrelationId": {"description": "The request's correlation id.", "required": True,
                          "schema": _CORRELATION_VALUE},
        "CorrelationIdIfRead": {"description": "The request's correlation id; absent when the connection was "
                                               "refused before the request was read.",
                                "required": False, "schema": _CORRELATION_VALUE},
    },
    "responses": {
        "MethodNotAllowed": {
            "description": "`method_not_allowed`: the path exists with other methods, listed in Allow.",
            "headers": {"Allow": {"description": "The path's methods (HEAD with GET).", "required": True,
                                  "schema": _STR},
                        "X-Correlation-ID": {"$ref": "#/components/headers/CorrelationId"}},
            "content": {JSON: {"schema": {**ref("Error"),
                                          "properties": {"error": {"const": "method_not_allowed"},
                                                         "status_code": {"const": 405}}}}},
        },
    },
}

DESCRIPTION = f"""\
edgelink is a drop-in for the VX11 "Tentáculo Link" v7 gateway.

**Auth.** Protected operations need the gateway token in `X-VX11-Token`: without it they answer
401 `auth_required`, with a wrong one 403 `forbidden`. Public operations have `security: []`.

**Errors.** Every error body is an `Error`: `{{"error": "<code>", "status_code": <int>}}` plus optional
fields. A method a path does not serve answers 405 `method_not_allowed` with an `Allow` header
(`#/components/responses/MethodNotAllowed`); a path no route serves answers 404 `not_found`.

**Correlation.** Each request gets a correlation id (`X-Correlation-ID`, see the parameter), sent
back in the `X-Correlation-ID` response header and passed to every module call.

**HTTP.** HTTP/1.1 with keep-alive and pipelining, and HTTP/1.0. `HEAD` is served on every `GET`
operation. A query parameter given twice counts with its first value. CORS is off unless
`EDGELINK_CORS_ORIGINS` is set.

edgelink {__version__}."""


def _error_schema(status: str, codes: list[str]) -> dict[str, Any]:
    return {**ref("Error"), "properties": {"error": {"enum": codes}, "status_code": {"const": int(status)}}}


def _describe(case: Case) -> str:
    return f"`{'`, `'.join(case.codes)}`: {case.description}" if case.codes else case.description


def _response(cases: list[Case]) -> dict[str, Any]:
    """One response object from the cases of one status (see the module docstring)."""
    response: dict[str, Any] = {"description": " ".join(_describe(c) for c in cases)}
    headers: dict[str, Any] = {}
    if all(c.correlated for c in cases):
        headers["X-Correlation-ID"] = {"$ref": "#/components/headers/CorrelationId"}
    elif any(c.correlated for c in cases):
        headers["X-Correlation-ID"] = {"$ref": "#/components/headers/CorrelationIdIfRead"}
    for case in cases:
        for name, description in case.headers:
            headers.setdefault(name, {"description": description, "schema": _STR})
    if headers:
        response["headers"] = headers
    content: dict[str, Any] = {}
    for media_type in dict.fromkeys(c.media_type for c in cases if c.codes or c.schema is not None):
        group = [c for c in cases if c.media_type == media_type]
        codes = list(dict.fromkeys(code for c in group for code in c.codes))
        alternatives = [_error_schema(cases[0].status, codes)] if codes else []
        for case in group:
            if case.schema is not None and case.schema not in alternatives:
                alternatives.append(case.schema)
        content[media_type] = {"schema": alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}}
    if content:
        response["content"] = content
    return response


def _operation_id(method: str, template: str) -> str:
    return f"{method}_{re.sub(r'[^A-Za-z0-9]+', '_', template).strip('_')}"


def _operation(route: Route, op: Operation, method: str) -> dict[str, Any]:
    path_params = [p["name"] for p in op.parameters if p["in"] == "path"]
    if path_params != route.param_names:
        raise DocumentError(f"{route.method} {route.template}: the router's path parameters "
                            f"{route.param_names} are documented as {path_params}")
    cases = [*op.cases, *(() if route.public else op.auth_cases), *CONNECTION_CASES]
    by_status: dict[str, list[Case]] = {}
    for case in cases:
        by_status.setdefault(case.status, []).append(case)
    if op.forwards:
        for group in by_status.values():
            if FORWARDED.schema not in (c.schema for c in group):
                group.append(FORWARDED)
        by_status["default"] = [FORWARDED]
    responses = {status: _response(by_status[status])
                 for status in sorted(by_status, key=lambda s: (s == "default", s))}
    operation: dict[str, Any] = {
        "operationId": _operation_id(method, route.template),
        "summary": route.summary,
        "tags": list(route.tags),
        "parameters": [*op.parameters, {"$ref": "#/components/parameters/CorrelationId"}],
        "responses": responses,
        "security": [] if route.public else [{name: []} for name in op.security],
    }
    if op.description:
        operation["description"] = op.description
    if op.request_body is not None:
        operation["requestBody"] = op.request_body
    return operation


def document(router: Router) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route ``router`` serves.

    Raises ``DocumentError`` for a route without its ``Operation``."""
    paths: dict[str, dict[str, Any]] = {}
    tags: dict[str, None] = {}
    for route in router.routes:
        op = route.doc
        if not isinstance(op, Operation):
            raise DocumentError(f"{route.method} {route.template} is served but not described: give it an "
                                f"Operation (doc=; in edgelink/api/, @documented beside its handler)")
        method = "get" if route.method == "WS" else route.method.lower()
        item = paths.setdefault(route.template, {})
        if method in item:
            raise DocumentError(f"{route.template}: two routes are documented as {method.upper()}")
        item[method] = _operation(route, op, method)
        tags.update(dict.fromkeys(route.tags))
    doc = {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "edgelink", "version": __version__, "description": DESCRIPTION},
        "tags": [{"name": t} for t in tags],
        "paths": paths,
        "components": {"schemas": SCHEMAS, **COMPONENTS},
        "security": [{"VX11Token": []}],
    }
    # callers get their own copy: the tables above are shared by every call
    return copy.deepcopy(doc)
