"""The canonical event the benchmark ingests, and ``Poster``, which sends it for the WebSocket figures."""

from __future__ import annotations

import asyncio
import json
import time

from . import BenchError
from .httpclient import HttpConnection

INGEST_PATH = "/events/ingest"


def alert_body(broadcast: bool) -> str:
    """A valid ``system.alert`` envelope, so ingest pays for schema validation too."""
    return json.dumps({
        "source": "bench",
        "type": "system.alert",
        "payload": {"alert_id": "bench-alert", "severity": "info",
                    "message": "benchmark event", "timestamp": int(time.time() * 1000)},
        "broadcast": broadcast,
    })


class Poster:
    """Posts broadcast events over ``concurrency`` keep-alive connections and checks that each
    was stored and broadcast."""

    def __init__(self, host: str, port: int, token: str, concurrency: int) -> None:
        headers = {"X-VX11-Token": token, "Content-Type": "application/json"}
        self._connections = [HttpConnection(host, port, headers) for _ in range(concurrency)]
        self._body = alert_body(broadcast=True).encode()

    async def aclose(self) -> None:
        for connection in self._connections:
            await connection.close()

    async def _post(self, connection: HttpConnection) -> None:
        status, body = await connection.request("POST", INGEST_PATH, self._body)
        if status != 201 or json.loads(body).get("broadcast") is not True:
            raise BenchError(f"POST {INGEST_PATH} answered {status}: {body[:300]!r}")

    async def post_many(self, count: int) -> None:
        """``count`` events, as fast as the parallel connections allow."""
        remaining = iter(range(count))

        async def worker(connection: HttpConnection) -> None:
            for _ in remaining:
                await self._post(connection)

        await asyncio.gather(*(worker(c) for c in self._connections))

    async def post_paced(self, rate: float, seconds: float) -> int:
        """One event every ``1 / rate`` seconds for ``seconds``; returns how many were posted."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        posted = 0
        while posted < rate * seconds:
            await asyncio.sleep(max(0.0, start + posted / rate - loop.time()))
            await self._post(self._connections[0])
            posted += 1
        return posted
