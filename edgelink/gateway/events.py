"""Events: the canonical schemas of API.md §5, the ingest envelope, and the Event value.

Theory of operation
-------------------
``SCHEMAS`` is the whole contract for canonical events: one row per type naming its
nature, the largest compact-JSON payload it may have, and each required field with the
JSON kinds it accepts. ``schema_problem`` is the only code that reads it; it answers
``None`` or one short sentence naming the field and the rule that failed.

Two kinds of rejection are kept apart on purpose:

* the *envelope* is malformed (``source`` is not a string, ``payload`` is not an object,
  the body is not an object ...): ``InvalidEnvelope`` with its ``(loc, msg)`` problems,
  which ``api/`` answers as 422 ``validation_error`` like any other malformed request;
* the envelope is fine but a *canonical* payload breaks its schema: ``SchemaRejected``,
  which ``api/`` answers as 422 ``{"status": "rejected", "reason":
  "schema_validation_failed", "source", "type", "detail"}`` (and, over ``/ws``, as a control
  frame).

Both are domain errors: nothing here knows HTTP.

Types outside the table are accepted unchecked and never broadcast.

JSON kinds are decided by ``json_kind``: a JSON ``true``/``false`` is a ``bool`` and is
never accepted where an ``int`` or ``float`` is required, although Python's ``bool`` is
an ``int`` subclass.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, NamedTuple

import orjson

from .fields import Problem, field_problems

# ---------------------------------------------------------------------------
# the schema table


@dataclass(frozen=True, slots=True)
class Field:
    """A required payload field and the JSON kinds (see ``json_kind``) it may hold."""

    name: str
    kinds: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Schema:
    type: str
    nature: str
    max_bytes: int
    fields: tuple[Field, ...]


STR = ("str",)
INT = ("int",)
NUMBER = ("int", "float")
LIST = ("list",)
OBJECT = ("object",)


def _schema(type_: str, nature: str, max_bytes: int, **fields: tuple[str, ...]) -> Schema:
    return Schema(type_, nature, max_bytes, tuple(Field(n, k) for n, k in fields.items()))


SCHEMAS: Mapping[str, Schema] = MappingProxyType({s.type: s for s in (
    _schema("system.alert", "incident", 2048,
            alert_id=STR, severity=STR, message=STR, timestamp=INT),
    _schema("system.correlation.updated", "meta", 2048,
            correlation_id=STR, related_events=LIST, strength=NUMBER, timestamp=INT),
    _schema("forensic.snapshot.created", "forensic", 1024,
            snapshot_id=STR, reason=STR, timestamp=INT),
    _schema("madre.decision.explained", "decision", 3072,
            decision_id=STR, summary=STR, confidence=NUMBER, timestamp=INT),
    _schema("switch.tension.updated", "state", 1024,
            value=INT, components=OBJECT, timestamp=INT),
    _schema("shub.action.narrated", "narration", 2048,
            action=STR, reason=STR, next_step=STR, timestamp=INT),
)})

_KINDS: dict[type, str] = {
    bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "object", type(None): "null",
}


def json_kind(value: Any) -> str:
    """The JSON kind of a decoded value: null, bool, int, float, str, list or object."""
    # exact type lookup, so bool never passes as int
    return _KINDS.get(type(value), type(value).__name__)


def schema_problem(schema: Schema, payload: Any) -> str | None:
    """``None`` if ``payload`` satisfies ``schema``, else which rule failed (the first one)."""
    kind = json_kind(payload)
    if kind != "object":
        return f"payload: expected object, got {kind}"
    for f in schema.fields:
        if f.name not in payload:
            return f"payload.{f.name}: required field missing"
        kind = json_kind(payload[f.name])
        if kind not in f.kinds:
            return f"payload.{f.name}: expected {' or '.join(f.kinds)}, got {kind}"
    size = len(orjson.dumps(payload))
    if size > schema.max_bytes:
        return f"payload: {size} bytes exceeds {schema.max_bytes}"
    return None


# ---------------------------------------------------------------------------
# the Event value


@dataclass(frozen=True, slots=True)
class Event:
    """One accepted event. ``seq`` is ``None`` until the ledger has committed it.

    ``broadcast`` says whether the event goes out to WebSocket clients: only canonical
    events that asked for it (ingest) or came from a client (WebSocket) do.
    """

    event_id: str
    type: str
    source: str
    timestamp: int  # Unix ms, gateway clock at acceptance
    payload: Any
    metadata: dict[str, Any] | None
    canonical: bool
    broadcast: bool
    seq: int | None = None

    def with_seq(self, seq: int) -> "Event":
        # the constructor directly: dataclasses.replace costs several times more per event
        return Event(self.event_id, self.type, self.source, self.timestamp, self.payload, self.metadata,
                     self.canonical, self.broadcast, seq)

    def frame(self) -> dict[str, Any]:
        """The WebSocket broadcast frame (API.md §6): no internal fields."""
        return {
            "channel": "event", "event_id": self.event_id, "seq": self.seq, "type": self.type,
            "source": self.source, "timestamp": self.timestamp, "payload": self.payload,
            "metadata": self.metadata,
        }


class InvalidEnvelope(ValueError):
    """The body or message around an event is malformed; ``problems`` name each field."""

    def __init__(self, *problems: Problem):
        super().__init__("; ".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in problems))
        self.problems = list(problems)


class SchemaRejected(ValueError):
    """A canonical event failed its schema; nothing is stored."""

    def __init__(self, event_type: str, source: str, detail: str):
        super().__init__(f"{event_type}: {detail}")
        self.source = source
        self.type = event_type
        self.detail = detail


def build_event(event_type: str, source: str, payload: Any, metadata: dict[str, Any] | None,
                broadcast: bool, now_ms: int) -> Event:
    """A new Event, checked against its schema if canonical (else ``SchemaRejected``).

    A non-canonical event is accepted as is and never broadcast. Any event's ``metadata``
    is at most ``MAX_METADATA_BYTES`` of compact JSON (else ``InvalidEnvelope``): it is
    stored, replayed and broadcast with the event, so it is bounded like a payload.
    """
    if metadata is not None:
        try:
            size = len(orjson.dumps(metadata))
        except orjson.JSONEncodeError as exc:  # nested too deep to store
            raise InvalidEnvelope((["body", "metadata"], f"cannot be stored as JSON: {exc}")) from None
        if size > MAX_METADATA_BYTES:
            raise InvalidEnvelope((["body", "metadata"], f"{size} bytes of JSON exceeds {MAX_METADATA_BYTES}"))
    schema = SCHEMAS.get(event_type)
    if schema is not None:
        problem = schema_problem(schema, payload)
        if problem is not None:
            raise SchemaRejected(event_type, source, problem)
    return Event(uuid.uuid4().hex, event_type, source, now_ms, payload, metadata,
                 canonical=schema is not None, broadcast=broadcast and schema is not None)


# ---------------------------------------------------------------------------
# POST /events/ingest

# Sources and types become metric labels, counter keys and index entries: a production
# gateway refuses empty or unbounded names rather than storing them.
MAX_NAME_LENGTH = 256
MAX_METADATA_BYTES = 4096  # compact JSON, canonical or not (API.md §5)

_INGEST_FIELDS = {
    "source": (str, True),
    "type": (str, True),
    "payload": (dict, True),
    "broadcast": (bool, False),
    "metadata": (dict, False),
}


def parse_ingest(body: Any, now_ms: int) -> Event:
    """The Event an ingest body asks for.

    Raises ``InvalidEnvelope`` for a malformed envelope and ``SchemaRejected`` for a
    canonical payload that breaks its schema.
    """
    if not isinstance(body, dict):
        raise InvalidEnvelope((["body"], "a JSON object is required"))
    problems = field_problems(body, _INGEST_FIELDS) or [
        (["body", name], f"must be 1 to {MAX_NAME_LENGTH} characters")
        for name in ("source", "type") if not 0 < len(body[name]) <= MAX_NAME_LENGTH]
    if problems:
        raise InvalidEnvelope(*problems)
    return build_event(body["type"], body["source"], body["payload"], body.get("metadata"),
                       bool(body.get("broadcast")), now_ms)


# ---------------------------------------------------------------------------
# events sent by WebSocket clients


class ClientEvent(NamedTuple):
    type: str
    payload: Any
    source: str
    metadata: dict[str, Any] | None
    flat: bool = False  # sent in the flat form: its fields were at the top level


# Top-level keys of a flat client event that describe the event rather than belong to it.
_FLAT_ENVELOPE_KEYS = frozenset({"type", "source", "metadata", "channel"})


def normalize_client_event(message: Any, default_source: str) -> ClientEvent | None:
    """Read a JSON message from a WebSocket client as an event, or ``None`` if it is not one.

    Envelope form ``{"type", "payload", "source"?, "metadata"?}`` (recognised by the
    ``payload`` key, whatever its value, so a bad payload is reported rather than
    reinterpreted) or flat form: ``type`` plus the payload fields at top level. A
    ``source`` that is not a non-empty string falls back to ``default_source``; a
    ``metadata`` that is not an object is dropped.
    """
    if not isinstance(message, dict):
        return None
    event_type = message.get("type")
    if not isinstance(event_type, str) or not event_type:
        return None
    flat = "payload" not in message
    if flat:
        payload = {k: v for k, v in message.items() if k not in _FLAT_ENVELOPE_KEYS}
    else:
        payload = message["payload"]
    source = message.get("source")
    if not isinstance(source, str) or not source or len(source) > MAX_NAME_LENGTH:
        source = default_source
    metadata = message.get("metadata")
    return ClientEvent(event_type, payload, source, metadata if isinstance(metadata, dict) else None, flat)
