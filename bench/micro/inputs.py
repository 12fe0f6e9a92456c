"""Inputs shared by the micro-benchmarks (a module, so that tests never import conftest)."""

from __future__ import annotations

from edgelink.dispatch import run_unsuspended as run_sync  # noqa: F401  (the benchmarks' name)

# A canonical event as a client sends it, and a copy that breaks its schema on the last rule
# checked (a JSON true where an int is required), so the invalid case pays for the whole walk.
ALERT_PAYLOAD = {"alert_id": "a-1", "severity": "warning", "message": "disk 91% full on board-7",
                 "timestamp": 1_763_776_000_000}
INGEST_BODY = {"source": "sensor-7", "type": "system.alert", "payload": ALERT_PAYLOAD, "broadcast": False,
               "metadata": None}
INVALID_INGEST_BODY = {**INGEST_BODY, "payload": {**ALERT_PAYLOAD, "timestamp": True}}

# About 1 KiB of JSON, as a client body: an ingest body whose metadata carries a few
# nested objects and strings with brackets in them. FLAT has under 64 brackets (the
# depth check only counts); BRACKETY has more, so the check cuts strings and sums.
_TAGS = [{"k": f"tag-{i}", "v": [i, i + 1, {"note": "[x] {y}"}]} for i in range(8)]
BODY_1K_FLAT = {**INGEST_BODY, "metadata": {"tags": _TAGS, "trace": "t" * 420}}
BODY_1K_BRACKETY = {**INGEST_BODY, "metadata": {"tags": _TAGS * 3}}
