"""Event schemas, the ingest envelope and WebSocket client events (gateway/events.py)."""

from __future__ import annotations

import uuid

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgelink.api.events import schema_rejected
from edgelink.gateway.events import (
    SCHEMAS,
    Event,
    InvalidEnvelope,
    SchemaRejected,
    build_event,
    json_kind,
    normalize_client_event,
    parse_ingest,
    schema_problem,
)

NOW_MS = 1_700_000_000_000

# one valid value per JSON kind, and one clearly wrong value for each kind
SAMPLE = {"str": "x", "int": 7, "float": 0.5, "list": ["a"], "object": {"k": 1}}
WRONG = {"str": 1, "int": "7", "float": "0.5", "list": {"a": 1}, "object": ["k"]}

FIELDS = [(t, f) for t, s in SCHEMAS.items() for f in s.fields]
NUMERIC_FIELDS = [(t, f) for t, f in FIELDS if "int" in f.kinds]


def valid_payload(event_type: str) -> dict:
    return {f.name: SAMPLE[f.kinds[0]] for f in SCHEMAS[event_type].fields}


def padded_payload(event_type: str, size: int) -> dict:
    """A valid payload whose compact JSON is exactly ``size`` bytes."""
    payload = valid_payload(event_type) | {"pad": ""}
    payload["pad"] = "a" * (size - len(orjson.dumps(payload)))
    assert len(orjson.dumps(payload)) == size
    return payload


def ingest_body(event_type: str = "system.alert", **changes) -> dict:
    body = {"source": "madre", "type": event_type, "payload": valid_payload(event_type)
            if event_type in SCHEMAS else {"anything": [1, 2]}}
    body.update(changes)
    return body


def validation_detail(exc: pytest.ExceptionInfo) -> list[dict]:
    assert isinstance(exc.value, InvalidEnvelope) and not isinstance(exc.value, SchemaRejected)
    return [{"loc": loc, "msg": msg} for loc, msg in exc.value.problems]


# --- the schema table -------------------------------------------------------------------


def test_table_matches_api_md():
    assert {t: (s.nature, s.max_bytes, {f.name: f.kinds for f in s.fields}) for t, s in SCHEMAS.items()} == {
        "system.alert": ("incident", 2048, {"alert_id": ("str",), "severity": ("str",), "message": ("str",),
                                            "timestamp": ("int",)}),
        "system.correlation.updated": ("meta", 2048, {"correlation_id": ("str",), "related_events": ("list",),
                                                      "strength": ("int", "float"), "timestamp": ("int",)}),
        "forensic.snapshot.created": ("forensic", 1024, {"snapshot_id": ("str",), "reason": ("str",),
                                                         "timestamp": ("int",)}),
        "madre.decision.explained": ("decision", 3072, {"decision_id": ("str",), "summary": ("str",),
                                                        "confidence": ("int", "float"), "timestamp": ("int",)}),
        "switch.tension.updated": ("state", 1024, {"value": ("int",), "components": ("object",),
                                                   "timestamp": ("int",)}),
        "shub.action.narrated": ("narration", 2048, {"action": ("str",), "reason": ("str",),
                                                     "next_step": ("str",), "timestamp": ("int",)}),
    }


@pytest.mark.parametrize("value, kind", [
    (None, "null"), (True, "bool"), (False, "bool"), (0, "int"), (1.5, "float"), ("", "str"), ([], "list"),
    ({}, "object"),
])
def test_json_kind(value, kind):
    assert json_kind(value) == kind


@pytest.mark.parametrize("event_type", SCHEMAS)
def test_valid_payload_passes(event_type):
    assert schema_problem(SCHEMAS[event_type], valid_payload(event_type)) is None


@pytest.mark.parametrize("event_type, field", FIELDS, ids=[f"{t}.{f.name}" for t, f in FIELDS])
def test_missing_field(event_type, field):
    payload = valid_payload(event_type)
    del payload[field.name]
    assert schema_problem(SCHEMAS[event_type], payload) == f"payload.{field.name}: required field missing"


@pytest.mark.parametrize("event_type, field", FIELDS, ids=[f"{t}.{f.name}" for t, f in FIELDS])
def test_wrong_type(event_type, field):
    payload = valid_payload(event_type) | {field.name: WRONG[field.kinds[0]]}
    got = json_kind(WRONG[field.kinds[0]])
    assert schema_problem(SCHEMAS[event_type], payload) == \
        f"payload.{field.name}: expected {' or '.join(field.kinds)}, got {got}"


@pytest.mark.parametrize("event_type, field", FIELDS, ids=[f"{t}.{f.name}" for t, f in FIELDS])
def test_null_is_not_a_value(event_type, field):
    payload = valid_payload(event_type) | {field.name: None}
    assert schema_problem(SCHEMAS[event_type], payload).endswith(", got null")


@pytest.mark.parametrize("event_type, field", NUMERIC_FIELDS, ids=[f"{t}.{f.name}" for t, f in NUMERIC_FIELDS])
@pytest.mark.parametrize("flag", [True, False])
def test_boolean_is_not_a_number(event_type, field, flag):
    payload = valid_payload(event_type) | {field.name: flag}
    assert schema_problem(SCHEMAS[event_type], payload) == \
        f"payload.{field.name}: expected {' or '.join(field.kinds)}, got bool"


def test_float_is_not_an_int_but_is_a_number():
    alert = valid_payload("system.alert") | {"timestamp": 1.0}
    assert schema_problem(SCHEMAS["system.alert"], alert) == "payload.timestamp: expected int, got float"
    decision = valid_payload("madre.decision.explained") | {"confidence": 0.25}
    assert schema_problem(SCHEMAS["madre.decision.explained"], decision) is None


def test_first_failing_rule_is_reported_in_table_order():
    payload = {"alert_id": 1, "severity": None}
    assert schema_problem(SCHEMAS["system.alert"], payload) == "payload.alert_id: expected str, got int"


@pytest.mark.parametrize("event_type", SCHEMAS)
def test_size_limit_is_inclusive(event_type):
    limit = SCHEMAS[event_type].max_bytes
    assert schema_problem(SCHEMAS[event_type], padded_payload(event_type, limit)) is None
    assert schema_problem(SCHEMAS[event_type], padded_payload(event_type, limit + 1)) == \
        f"payload: {limit + 1} bytes exceeds {limit}"


def test_size_is_compact_utf8_json():
    # pretty-printed this would be larger, and "é" is two bytes on the wire
    payload = padded_payload("forensic.snapshot.created", 1024)
    payload["pad"] = payload["pad"][:-2] + "é"
    assert schema_problem(SCHEMAS["forensic.snapshot.created"], payload) is None
    payload["pad"] += "a"
    assert schema_problem(SCHEMAS["forensic.snapshot.created"], payload) == "payload: 1025 bytes exceeds 1024"


@pytest.mark.parametrize("payload, kind", [([], "list"), ("x", "str"), (None, "null"), (3, "int")])
def test_payload_not_an_object(payload, kind):
    assert schema_problem(SCHEMAS["system.alert"], payload) == f"payload: expected object, got {kind}"


# --- properties -------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300)
@given(event_type=st.sampled_from(sorted(SCHEMAS)), payload=json_values)
def test_any_json_gets_a_verdict(event_type, payload):
    problem = schema_problem(SCHEMAS[event_type], payload)
    assert problem is None or problem.startswith("payload")


@settings(max_examples=200)
@given(event_type=st.sampled_from(sorted(SCHEMAS)), extra=st.dictionaries(st.text(max_size=8), json_values,
                                                                           max_size=4))
def test_extra_fields_are_allowed_within_the_size_limit(event_type, extra):
    schema = SCHEMAS[event_type]
    payload = {k: v for k, v in extra.items() if k not in {f.name for f in schema.fields}}
    payload.update(valid_payload(event_type))
    size = len(orjson.dumps(payload))
    problem = schema_problem(schema, payload)
    if size <= schema.max_bytes:
        assert problem is None
    else:
        assert problem == f"payload: {size} bytes exceeds {schema.max_bytes}"


@settings(max_examples=200)
@given(field=st.sampled_from(FIELDS), value=json_values)
def test_a_value_of_a_wrong_kind_names_its_field(field, value):
    event_type, f = field
    payload = valid_payload(event_type) | {f.name: value}
    problem = schema_problem(SCHEMAS[event_type], payload)
    if json_kind(value) in f.kinds:
        assert problem is None or problem.startswith("payload: ")  # only the size can fail
    else:
        assert problem == f"payload.{f.name}: expected {' or '.join(f.kinds)}, got {json_kind(value)}"


# --- ingest -------------------------------------------------------------------------------


def test_ingest_canonical_event():
    event = parse_ingest(ingest_body(broadcast=True, metadata={"trace": "t1"}), NOW_MS)
    assert (event.type, event.source, event.timestamp, event.canonical, event.broadcast, event.seq) == \
        ("system.alert", "madre", NOW_MS, True, True, None)
    assert event.payload == valid_payload("system.alert") and event.metadata == {"trace": "t1"}
    assert uuid.UUID(hex=event.event_id).version == 4 and len(event.event_id) == 32


def test_ingest_broadcast_defaults_to_false_and_null_means_default():
    assert parse_ingest(ingest_body(), NOW_MS).broadcast is False
    assert parse_ingest(ingest_body(broadcast=None, metadata=None), NOW_MS).broadcast is False


def test_ingest_unknown_type_is_accepted_unchecked_and_never_broadcast():
    event = parse_ingest(ingest_body("custom.thing", broadcast=True, payload={"timestamp": True}), NOW_MS)
    assert event.canonical is False and event.broadcast is False and event.payload == {"timestamp": True}


def test_event_ids_are_unique():
    assert len({parse_ingest(ingest_body(), NOW_MS).event_id for _ in range(100)}) == 100


@pytest.mark.parametrize("body", [[], "x", 1, None, True])
def test_ingest_body_must_be_an_object(body):
    with pytest.raises(InvalidEnvelope) as exc:
        parse_ingest(body, NOW_MS)
    assert validation_detail(exc) == [{"loc": ["body"], "msg": "a JSON object is required"}]


@pytest.mark.parametrize("changes, loc, msg", [
    ({"source": None}, ["body", "source"], "field required"),
    ({"type": None}, ["body", "type"], "field required"),
    ({"payload": None}, ["body", "payload"], "field required"),
    ({"source": 3}, ["body", "source"], "must be a string"),
    ({"type": ["system.alert"]}, ["body", "type"], "must be a string"),
    ({"payload": [1, 2]}, ["body", "payload"], "must be an object"),
    ({"payload": "{}"}, ["body", "payload"], "must be an object"),
    ({"broadcast": "true"}, ["body", "broadcast"], "must be a boolean"),
    ({"broadcast": 1}, ["body", "broadcast"], "must be a boolean"),
    ({"metadata": [1]}, ["body", "metadata"], "must be an object"),
    ({"source": ""}, ["body", "source"], "must be 1 to 256 characters"),
    ({"type": "t" * 257}, ["body", "type"], "must be 1 to 256 characters"),
])
def test_ingest_envelope_problems_are_validation_errors(changes, loc, msg):
    with pytest.raises(InvalidEnvelope) as exc:
        parse_ingest(ingest_body(**changes), NOW_MS)
    assert validation_detail(exc) == [{"loc": loc, "msg": msg}]


def test_ingest_envelope_lists_every_problem():
    with pytest.raises(InvalidEnvelope) as exc:
        parse_ingest({"type": 1, "payload": [], "broadcast": "no"}, NOW_MS)
    assert [d["loc"] for d in validation_detail(exc)] == \
        [["body", "source"], ["body", "type"], ["body", "payload"], ["body", "broadcast"]]


def test_ingest_envelope_is_checked_before_the_schema():
    # a canonical type with a broken envelope is a validation error, not a schema rejection
    with pytest.raises(InvalidEnvelope) as exc:
        parse_ingest(ingest_body(payload={"alert_id": 1}, broadcast="x"), NOW_MS)
    assert validation_detail(exc) == [{"loc": ["body", "broadcast"], "msg": "must be a boolean"}]


def test_ingest_canonical_schema_failure_is_rejected():
    body = ingest_body(payload=valid_payload("system.alert") | {"timestamp": True})
    with pytest.raises(SchemaRejected) as exc:
        parse_ingest(body, NOW_MS)
    response = schema_rejected(exc.value).response()
    assert response.status == 422
    assert orjson.loads(response.body) == {
        "status": "rejected", "reason": "schema_validation_failed", "source": "madre", "type": "system.alert",
        "detail": "payload.timestamp: expected int, got bool",
        "error": "schema_validation_failed", "status_code": 422,
    }


def test_ingest_oversized_canonical_payload_is_rejected():
    body = ingest_body("switch.tension.updated", payload=padded_payload("switch.tension.updated", 1025))
    with pytest.raises(SchemaRejected) as exc:
        parse_ingest(body, NOW_MS)
    assert exc.value.detail == "payload: 1025 bytes exceeds 1024"


# --- the Event value ----------------------------------------------------------------------


def test_broadcast_frame_has_no_internal_fields():
    event = build_event("system.alert", "madre", valid_payload("system.alert"), None, True, NOW_MS).with_seq(12)
    assert event.frame() == {
        "channel": "event", "event_id": event.event_id, "seq": 12, "type": "system.alert", "source": "madre",
        "timestamp": NOW_MS, "payload": valid_payload("system.alert"), "metadata": None,
    }
    assert isinstance(orjson.dumps(event.frame()), bytes)


def test_event_is_immutable():
    event = build_event("x", "s", {}, None, False, NOW_MS)
    with pytest.raises(AttributeError):
        event.seq = 3  # type: ignore[misc]
    assert event.with_seq(3).seq == 3 and event.seq is None


# --- WebSocket client events --------------------------------------------------------------


def test_flat_client_event():
    flat = {"type": "system.alert", "channel": "event", "source": "ui", "metadata": {"m": 1}} | \
        valid_payload("system.alert")
    assert normalize_client_event(flat, "ws:c1") == \
        ("system.alert", valid_payload("system.alert"), "ui", {"m": 1}, True)


def test_envelope_client_event():
    message = {"type": "system.alert", "payload": valid_payload("system.alert"), "extra": 1}
    assert normalize_client_event(message, "ws:c1") == \
        ("system.alert", valid_payload("system.alert"), "ws:c1", None, False)


def test_flat_and_envelope_forms_give_the_same_event():
    payload = valid_payload("shub.action.narrated")
    flat = normalize_client_event({"type": "shub.action.narrated", **payload}, "ws:a")
    envelope = normalize_client_event({"type": "shub.action.narrated", "payload": payload}, "ws:a")
    assert flat._replace(flat=False) == envelope and flat.flat  # the flat form's frame also has them on top
    assert build_event(flat.type, flat.source, flat.payload, flat.metadata, True, NOW_MS).broadcast is True


def test_envelope_with_a_bad_payload_is_reported_not_reinterpreted():
    ce = normalize_client_event({"type": "system.alert", "payload": "text"}, "ws:c1")
    assert ce.payload == "text"
    with pytest.raises(SchemaRejected) as exc:
        build_event(ce.type, ce.source, ce.payload, ce.metadata, True, NOW_MS)
    assert exc.value.detail == "payload: expected object, got str"


def test_flat_client_event_missing_a_field():
    ce = normalize_client_event({"type": "system.alert", "alert_id": "a"}, "ws:c1")
    with pytest.raises(SchemaRejected) as exc:
        build_event(ce.type, ce.source, ce.payload, ce.metadata, True, NOW_MS)
    assert exc.value.detail == "payload.severity: required field missing"


@pytest.mark.parametrize("message", [[1], "system.alert", 3, None, {"payload": {}}, {"type": 5}, {"type": ""}])
def test_messages_that_are_not_events(message):
    assert normalize_client_event(message, "ws:c1") is None


@pytest.mark.parametrize("source", [None, "", 7, "s" * 257])
def test_client_source_falls_back_to_the_default(source):
    assert normalize_client_event({"type": "t", "payload": {}, "source": source}, "ws:c1").source == "ws:c1"


def test_client_metadata_that_is_not_an_object_is_dropped():
    assert normalize_client_event({"type": "t", "payload": {}, "metadata": "m"}, "ws:c1").metadata is None


def test_frame_roundtrip_of_a_client_event():
    ce = normalize_client_event({"type": "system.alert", **valid_payload("system.alert")}, "ws:c1")
    event = build_event(ce.type, ce.source, ce.payload, ce.metadata, True, NOW_MS)
    assert isinstance(event, Event) and event.canonical and event.broadcast
