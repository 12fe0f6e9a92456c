"""Pydantic models for ``POST /events/ingest``: the envelope and the six canonical payloads (API.md §5).

Strict types, so JSON ``true``/``false`` is never taken for a number and ``"1"`` never for
an int. Fields beyond the required ones are allowed and kept; the whole payload's compact
JSON size is bounded per type.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

# A strict float takes JSON ints and floats but not booleans or strings: "int or float" in API.md.
Number = StrictFloat


class EventIn(BaseModel):
    source: StrictStr
    type: StrictStr
    payload: dict[str, Any]
    broadcast: StrictBool = False
    metadata: dict[str, Any] | None = None


class CanonicalPayload(BaseModel):
    """Base of the canonical payloads: required fields are typed, ``max_bytes`` bounds the size."""

    model_config = ConfigDict(extra="allow")
    max_bytes: ClassVar[int]

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, data: Any) -> Any:
        if isinstance(data, dict):
            size = len(json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode())
            if size > cls.max_bytes:
                raise ValueError(f"payload is {size} bytes of compact JSON, over the {cls.max_bytes}-byte limit")
        return data


class SystemAlert(CanonicalPayload):
    max_bytes = 2048
    alert_id: StrictStr
    severity: StrictStr
    message: StrictStr
    timestamp: StrictInt


class CorrelationUpdated(CanonicalPayload):
    max_bytes = 2048
    correlation_id: StrictStr
    related_events: list[Any]
    strength: Number
    timestamp: StrictInt


class SnapshotCreated(CanonicalPayload):
    max_bytes = 1024
    snapshot_id: StrictStr
    reason: StrictStr
    timestamp: StrictInt


class DecisionExplained(CanonicalPayload):
    max_bytes = 3072
    decision_id: StrictStr
    summary: StrictStr
    confidence: Number
    timestamp: StrictInt


class TensionUpdated(CanonicalPayload):
    max_bytes = 1024
    value: StrictInt
    components: dict[str, Any]
    timestamp: StrictInt


class ActionNarrated(CanonicalPayload):
    max_bytes = 2048
    action: StrictStr
    reason: StrictStr
    next_step: StrictStr
    timestamp: StrictInt


CANONICAL: dict[str, type[CanonicalPayload]] = {
    "system.alert": SystemAlert,
    "system.correlation.updated": CorrelationUpdated,
    "forensic.snapshot.created": SnapshotCreated,
    "madre.decision.explained": DecisionExplained,
    "switch.tension.updated": TensionUpdated,
    "shub.action.narrated": ActionNarrated,
}
