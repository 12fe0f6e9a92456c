"""A minimal keep-alive HTTP/1.1 client for the harness's own requests.

The harness shares a two-core box with the server under test, so the requests it makes while
a figure is being measured (the events that feed the WebSocket fan-out) must cost it little
CPU; a general client spends several times more per request. Answers must carry a
``Content-Length`` (both servers send one for JSON); anything else is a ``BenchError``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from . import BenchError


class HttpConnection:
    """One connection to ``host:port``, opened on first use and again after the server closes it."""

    def __init__(self, host: str, port: int, headers: Mapping[str, str] | None = None) -> None:
        self._host, self._port = host, port
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in {"Host": f"{host}:{port}", **(headers or {})}.items())
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """Send one request and return the answer's status and body."""
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        head = f"{method} {path} HTTP/1.1\r\n{self._fixed}Content-Length: {len(body)}\r\n\r\n"
        self._writer.write(head.encode() + body)
        try:
            lines = (await self._reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            if "content-length" not in headers:
                raise BenchError(f"{method} {path}: answer {status} without Content-Length")
            payload = await self._reader.readexactly(int(headers["content-length"]))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            await self.close()
            raise BenchError(f"{method} {path}: the server closed the connection or sent a bad answer") from None
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, payload

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._reader = self._writer = None
