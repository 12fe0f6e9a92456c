"""Nine fake VX11 modules on loopback for ``GET /vx11/status``: each answers ``GET /health`` with JSON.

Minimal HTTP/1.1 with keep-alive, served on the harness's own event loop so that both
gateways probe identical, near-zero-latency upstreams.
"""

from __future__ import annotations

import asyncio
import json

from edgelink.config import MODULE_DEFAULTS

HOST = "127.0.0.1"
NOT_FOUND = b'{"error":"not_found","status_code":404}'


def _reply(status: bytes, body: bytes) -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        status, len(body), body)


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


class FakeModules:
    """Start with ``await start()``; ``env`` then maps each module URL variable to its server."""

    def __init__(self) -> None:
        self._servers: list[asyncio.Server] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self.env: dict[str, str] = {}

    async def start(self) -> None:
        for name, env_name, _ in MODULE_DEFAULTS:
            health = _reply(b"200 OK", json.dumps({"status": "ok", "module": name}).encode())
            server = await asyncio.start_server(
                lambda r, w, health=health: self._serve(r, w, health), HOST, 0)
            self._servers.append(server)
            self.env[env_name] = f"http://{HOST}:{server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for writer in list(self._writers):
            writer.close()
        for server in self._servers:
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, health: bytes) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(_content_length(head))
                target = head.split(b" ", 2)[1]
                writer.write(health if target.split(b"?")[0] == b"/health" else _reply(b"404 Not Found", NOT_FOUND))
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # the gateway closed its keep-alive connection
        finally:
            self._writers.discard(writer)
            writer.close()
