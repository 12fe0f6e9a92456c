"""Runtime truth (API.md §7): one round of health checks, recorded in the ledger's health
tables with the gateway's own row beside the modules'.

The gateway records a round every ``EDGELINK_PROBE_INTERVAL`` seconds (runtime.py); the
``edgelink probe`` command (probe.py) records one by itself into the same tables.
"""

from __future__ import annotations

import dataclasses
import time

from .config import Settings
from .gateway.health import HealthCheck
from .ledger import Ledger
from .modules import Modules

GATEWAY_SERVICE = "tentaculo_link"  # the gateway is a VX11 service too, recorded beside the modules


def gateway_url(settings: Settings, port: int) -> str:
    host = "127.0.0.1" if settings.host in ("", "0.0.0.0") else "::1" if settings.host == "::" else settings.host
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def record_round(modules: Modules, ledger: Ledger, gateway: HealthCheck) -> dict[str, HealthCheck]:
    """Check every module once (one shared round) and record it with ``gateway``, the
    gateway's own state, as the gateway does every EDGELINK_PROBE_INTERVAL; returns the round."""
    checks = {GATEWAY_SERVICE: gateway, **await modules.check_round()}
    await record(ledger, checks)
    return checks


def stamped(checks: dict[str, HealthCheck]) -> list[HealthCheck]:
    """The checks of one round, every one stamped with the same time."""
    checked_at = int(time.time() * 1000)
    return [dataclasses.replace(c, checked_at=checked_at) for c in checks.values()]


async def record(ledger: Ledger, checks: dict[str, HealthCheck]) -> None:
    """Write one round to the health tables."""
    await ledger.record_health(stamped(checks))
