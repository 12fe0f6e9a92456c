"""One health check of one service (a module, or the gateway itself): what its probe saw.

``GET /vx11/status`` shows it as a ModuleHealth (``module_health()``, API.md §2); the
ledger records it in the health tables (API.md §7). One value for both, so the two cannot
drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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

    @property
    def endpoint_ok(self) -> bool:
        return self.status == "ok"

    def module_health(self) -> dict[str, Any]:
        """The ModuleHealth object of API.md §2."""
        return {"status": self.status, "http_code": self.http_code, "latency_ms": self.latency_ms,
                "url": self.url, "error": self.error}
