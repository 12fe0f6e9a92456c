"""The reference peer's module health probes for ``GET /vx11/status`` (API.md §2), with httpx."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from edgelink.config import ModuleConfig


async def probe(client: httpx.AsyncClient, module: ModuleConfig, headers: dict[str, str]) -> dict[str, Any]:
    """One module's ModuleHealth; the client's timeout bounds the call."""
    health: dict[str, Any] = {"status": "disabled", "http_code": None, "latency_ms": None,
                              "url": module.url, "error": None}
    if not module.enabled:
        return health
    started = time.perf_counter()
    try:
        reply = await client.get(f"{module.url}/health", headers=headers)
    except httpx.TimeoutException:
        health.update(status="timeout", error="timed out")
    except httpx.HTTPError as exc:
        health.update(status="unreachable", error=str(exc) or type(exc).__name__)
    else:
        health.update(status="ok" if reply.is_success else "error", http_code=reply.status_code,
                      error=None if reply.is_success else f"HTTP {reply.status_code}")
    health["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
    return health


async def probe_all(client: httpx.AsyncClient, modules: tuple[ModuleConfig, ...],
                    headers: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Every module's health, probed concurrently."""
    results = await asyncio.gather(*(probe(client, m, headers) for m in modules))
    return {m.name: health for m, health in zip(modules, results, strict=True)}
