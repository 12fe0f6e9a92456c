"""One health check of one service (a module, or the gateway itself): what it saw.

``GET /vx11/status`` shows it as a ModuleHealth (``module_health()``, API.md §2); the
ledger records it in the health tables (API.md §7). One value for both, so the two cannot
drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import orjson


@dataclass(frozen=True, slots=True)
class HealthCheck:
    service: str
    status: str  # ModuleHealth status: ok, error, unreachable, timeout, disabled
    http_code: int | None
    latency_ms: float | None
    url: str
    error: str | None
    snippet: str = ""  # the start of the reply, for the recorded history
    port: int | None = None
    checked_at: int = 0  # Unix ms, stamped when the round is recorded
    # the fields of the module's own /health JSON object (at most MODULE_FIELDS_BYTES of them)
    module_fields: Mapping[str, Any] | None = None

    @property
    def endpoint_ok(self) -> bool:
        return self.status == "ok"

    def module_health(self) -> dict[str, Any]:
        """The ModuleHealth object of API.md §2, with the module's own health fields beside
        ours (as Tentáculo Link passed them on); ours win a clash."""
        return {**(self.module_fields or {}), "status": self.status, "http_code": self.http_code,
                "latency_ms": self.latency_ms, "url": self.url, "error": self.error}


MODULE_FIELDS_BYTES = 4096  # API.md §12: up to 4 KiB of a module's /health object is shown
MODULE_FIELDS_LIMIT = 64 * 1024  # a larger /health reply is not decoded for them


def module_fields(body: bytes | bytearray) -> dict[str, Any] | None:
    """The fields of a module's ``/health`` reply to show beside ours: the members of a JSON
    object in their order, while they fit in ``MODULE_FIELDS_BYTES`` of compact JSON (a
    member that does not fit is left out, the next ones may still fit). None when the reply
    is not a JSON object, or is too large to be worth decoding."""
    if len(body) > MODULE_FIELDS_LIMIT:
        return None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    kept: dict[str, Any] = {}
    size = 2  # the braces
    for key, value in data.items():
        cost = len(orjson.dumps({key: value})) - 1  # "key":value and a comma
        if size + cost <= MODULE_FIELDS_BYTES:
            kept[key] = value
            size += cost
    return kept
