"""The reference peer's module health probes for ``GET /vx11/status`` (API.md §2), with httpx.

Concurrent callers share one probe round, as API.md §2 requires: the first caller starts the
round as a task, every caller awaits it through ``asyncio.shield`` (so a caller that goes
away does not cancel the others' round), and the task is forgotten when it is done.
"""

from __future__ import annotations

import asyncio
import time
import uuid
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


class ProbeRounds:
    """Shares one probe round among the callers that arrive while it runs."""

    def __init__(self, client: httpx.AsyncClient, modules: tuple[ModuleConfig, ...], token: str) -> None:
        self._client = client
        self._modules = modules
        self._token = token
        self._round: asyncio.Task[dict[str, dict[str, Any]]] | None = None

    async def health(self) -> dict[str, dict[str, Any]]:
        """Every module's health from the round in progress, or from a new one. The result is
        shared by all of that round's callers: read it, do not change it."""
        if self._round is None:
            # the round is not one caller's, so it gets its own correlation id (as in edgelink)
            headers = {"X-VX11-Token": self._token, "X-Correlation-ID": uuid.uuid4().hex}
            self._round = asyncio.create_task(probe_all(self._client, self._modules, headers))
            self._round.add_done_callback(self._round_over)
        return await asyncio.shield(self._round)

    def _round_over(self, task: asyncio.Task[dict[str, dict[str, Any]]]) -> None:
        self._round = None
        if not task.cancelled():
            task.exception()  # retrieved, so that a round nobody awaited any more is not logged as lost

    async def close(self) -> None:
        if self._round is not None:
            self._round.cancel()
            await asyncio.gather(self._round, return_exceptions=True)
