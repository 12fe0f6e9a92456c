"""A minimal RFC 6455 client that counts messages instead of parsing them.

The fan-out figures need hundreds of clients in the harness process to read frames faster
than the server under test can send them; a general client library spends more CPU per frame
than the servers do, so the figure would measure the harness. This one reads frame headers in
``data_received`` and skips payloads, answers pings, and keeps only the first message (the
``connected`` control frame) to check it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import struct
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from . import BenchError

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
FIN = 0x80
CLOSE_TIMEOUT = 2.0


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (clients must mask, RFC 6455 §5.3); payloads here are < 126 bytes."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((FIN | opcode, 0x80 | len(payload))) + mask + masked


class CountingClient(asyncio.Protocol):
    """One ``/ws`` connection; ``on_message()`` is called for each data message after the first."""

    def __init__(self, on_message: Callable[[], None]) -> None:
        self._on_message = on_message
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._key = base64.b64encode(os.urandom(16))
        self._handshaken = False
        self._first: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closing = False
        self.lost = False  # the connection ended without our asking

    @classmethod
    async def connect(cls, url: str, on_message: Callable[[], None]) -> tuple[CountingClient, dict[str, Any]]:
        """Open, upgrade and return the client with its first message, decoded."""
        parts = urlsplit(url)
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(lambda: cls(on_message), parts.hostname, parts.port)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        client._transport.write(
            f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {client._key.decode()}\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n".encode())
        try:
            first = await client._first
        except BaseException:
            client._transport.abort()
            raise
        return client, first

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = not self._closing
        if not self._first.done():
            self._first.set_exception(BenchError(f"/ws connection lost during the handshake: {exc}"))
        if not self._gone.done():
            self._gone.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if not self._handshaken and not self._handshake():
            return
        self._frames()

    def _handshake(self) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
        del self._buffer[:end + 4]
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
        accept = base64.b64encode(hashlib.sha1(self._key + GUID).digest()).decode()
        if not head[0].startswith("HTTP/1.1 101") or headers.get("sec-websocket-accept") != accept:
            self._first.set_exception(BenchError(f"/ws upgrade refused: {head[0]}"))
            self._transport.close()
            return False
        self._handshaken = True
        return True

    def _frames(self) -> None:
        buf, pos = self._buffer, 0
        while len(buf) - pos >= 2:
            opcode, length, start = buf[pos] & 0x0F, buf[pos + 1] & 0x7F, pos + 2
            if length == 126:
                if len(buf) - pos < 4:
                    break
                length, start = struct.unpack_from("!H", buf, pos + 2)[0], pos + 4
            elif length == 127:
                if len(buf) - pos < 10:
                    break
                length, start = struct.unpack_from("!Q", buf, pos + 2)[0], pos + 10
            if len(buf) - start < length:
                break
            if opcode in (TEXT, BINARY, CONTINUATION):
                if buf[pos] & FIN:
                    self._message(buf, start, length)
            elif opcode == PING:
                self._transport.write(_client_frame(PONG, bytes(buf[start:start + length])))
            elif opcode == CLOSE:
                self._transport.close()
            pos = start + length
        del buf[:pos]

    def _message(self, buf: bytearray, start: int, length: int) -> None:
        if self._first.done():
            self._on_message()
            return
        text = bytes(buf[start:start + length])
        try:
            self._first.set_result(json.loads(text))
        except ValueError:
            self._first.set_exception(BenchError(f"first /ws frame is not JSON: {text[:200]!r}"))

    async def close(self) -> None:
        """Send a close frame and wait briefly for the server to end the connection."""
        self._closing = True
        if self._gone.done():
            return
        self._transport.write(_client_frame(CLOSE, struct.pack("!H", 1000)))
        try:
            await asyncio.wait_for(asyncio.shield(self._gone), CLOSE_TIMEOUT)
        except TimeoutError:
            self._transport.abort()
