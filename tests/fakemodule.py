"""A real loopback HTTP/1.1 server that plays a VX11 module in tests.

It runs on its own event loop in a background thread, so the same object serves sync
tests, async tests (``asyncio.run`` in the test thread) and a gateway started as a
subprocess and pointed at ``fake.url``::

    with FakeModule() as switch:
        switch.reply("/switch/route-v5", {"response": "hi", "model_used": "m1"})
        switch.behave("/health", HANG)
        ...  # MADRE_URL=switch.url etc.
        assert switch.requests[0].headers["x-vx11-token"] == TOKEN

Each path answers with its JSON reply (``reply()``; default ``{"status": "ok", "path": ...}``)
in the way its behaviour says (``behave()``; a ``None`` path sets the default for every
path). Every request is recorded, with the id of the connection it came on.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from dataclasses import dataclass
from typing import Any

import h11
import orjson

HEALTHY = "healthy"  # the path's JSON reply
HANG = "hang"  # read the request, never answer (until the client goes away)
ERROR_500 = "error_500"  # 500 with a JSON error body
NOT_JSON = "not_json"  # an HTML body, with the path's reply status
NOT_HTTP = "not_http"  # bytes that are not an HTTP response, then wait for the client to leave
HUGE = "huge"  # 200 declaring and sending a body over 8 MiB
HUGE_CHUNKED = "huge_chunked"  # the same without Content-Length (chunked)
HUGE_HEADERS_ONLY = "huge_headers_only"  # declare a body over 8 MiB, then send nothing
CLOSE_BEFORE_REPLY = "close_before_reply"  # read the request, close without a byte of reply
CLOSE_MID_REPLY = "close_mid_reply"  # headers and part of the body, then close
CLOSE_AFTER_REPLY = "close_after_reply"  # the JSON reply as keep-alive, then close anyway
MANY_CONTAINERS = "many_containers"  # 200 with just under 8 MiB of valid JSON: [[],[],...]
PUNCTUATED_TEXT = "punctuated_text"  # 200 with one text of 600,000 commas and colons
MANY_STRINGS = "many_strings"  # 200 with just under 8 MiB of valid JSON: ["","",...]
BEHAVIOURS = frozenset({HEALTHY, HANG, ERROR_500, NOT_JSON, NOT_HTTP, HUGE, HUGE_CHUNKED, HUGE_HEADERS_ONLY,
                        CLOSE_BEFORE_REPLY, CLOSE_MID_REPLY, CLOSE_AFTER_REPLY, MANY_CONTAINERS, PUNCTUATED_TEXT,
                        MANY_STRINGS})

HUGE_SIZE = 9 * 1024 * 1024
# ~2.8 million empty lists: cheap to send, ~250 MiB of Python objects if parsed
MANY_CONTAINERS_BODY = b"[" + b"[]," * ((8 * 1024 * 1024 - 16) // 3) + b"[]]"
# ~2.8 million empty strings: costly to parse, and costly to scan one piece per string
MANY_STRINGS_BODY = b"[" + b'"",' * ((8 * 1024 * 1024 - 16) // 3) + b'""]'
# brackets, separators and escaped quotes, all inside strings: a few objects when parsed
PUNCTUATED_TEXT_BODY = b'{"response": "' + b'a, b: [c], {d}, \\"e\\": ' * 50_000 + b'", "k": [1, {"x": 2}]}'


@dataclass(frozen=True)
class Received:
    method: str
    path: str  # without the query string
    target: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    json: Any  # the body parsed, or None
    connection: int  # which connection (1, 2, ...) it came on


def unused_port() -> int:
    """A loopback port nothing listens on (for "module down")."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeModule:
    def __init__(self, name: str = "fake"):
        self.name = name
        self.port = 0
        self._lock = threading.Lock()
        self._requests: list[Received] = []
        self._replies: dict[str, tuple[int, Any]] = {}
        self._behaviours: dict[str | None, tuple[str, float]] = {None: (HEALTHY, 0.0)}
        self._connections = 0
        self._open = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # --- control (any thread) -----------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[Received]:
        with self._lock:
            return list(self._requests)

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        with self._lock:
            return self._connections

    @property
    def open_connections(self) -> int:
        with self._lock:
            return self._open

    def behave(self, path: str | None, behaviour: str, delay: float = 0.0) -> None:
        """How ``path`` (every path if ``None``) answers, after waiting ``delay`` seconds."""
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"unknown behaviour {behaviour!r}")
        with self._lock:
            self._behaviours[path] = (behaviour, delay)

    def reply(self, path: str, data: Any, status: int = 200) -> None:
        """The JSON ``path`` answers with when it answers normally."""
        with self._lock:
            self._replies[path] = (status, data)

    def reset(self) -> None:
        """Forget requests, replies and behaviours (connection counts stay)."""
        with self._lock:
            self._requests.clear()
            self._replies.clear()
            self._behaviours = {None: (HEALTHY, 0.0)}

    def start(self) -> "FakeModule":
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"fakemodule-{self.name}", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        assert self._loop is not None and self._thread is not None
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> "FakeModule":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- server (its own loop) ------------------------------------------------------------

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def _plan(self, path: str) -> tuple[str, float, int, Any]:
        with self._lock:
            behaviour, delay = self._behaviours.get(path, self._behaviours[None])
            status, data = self._replies.get(path, (200, {"status": "ok", "path": path}))
        return behaviour, delay, status, data

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        with self._lock:
            self._connections += 1
            self._open += 1
            conn_id = self._connections
        h = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = await self._read_request(h, reader)
                if request is None:
                    return
                target = request.target.decode()
                path = target.partition("?")[0]
                try:
                    parsed = orjson.loads(body) if body else None
                except orjson.JSONDecodeError:
                    parsed = None
                with self._lock:
                    self._requests.append(Received(
                        request.method.decode(), path, target,
                        {k.decode(): v.decode() for k, v in request.headers}, body, parsed, conn_id))
                behaviour, delay, status, data = self._plan(path)
                if delay:
                    await asyncio.sleep(delay)  # real time: a module that is slow to answer
                if not await self._answer(h, reader, writer, behaviour, status, data):
                    return
                if h.our_state is not h11.DONE or h.their_state is not h11.DONE:
                    return
                h.start_next_cycle()
        except (ConnectionError, h11.ProtocolError):
            pass  # a client that goes away or speaks bad HTTP just loses its connection
        finally:
            writer.close()
            with self._lock:
                self._open -= 1
            self._tasks.discard(task)

    @staticmethod
    async def _read_request(h: h11.Connection, reader: asyncio.StreamReader) -> tuple[h11.Request | None, bytes]:
        request = None
        body = bytearray()
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                h.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None, b""

    @staticmethod
    async def _answer(h: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      behaviour: str, status: int, data: Any) -> bool:
        """Send the answer; False when the connection must end here."""
        def send(*events: h11.Event) -> None:
            writer.write(b"".join(h.send(e) or b"" for e in events))

        def respond(code: int, body: bytes, content_type: bytes = b"application/json") -> None:
            send(h11.Response(status_code=code, headers=[(b"content-type", content_type),
                                                         (b"content-length", str(len(body)).encode())]),
                 h11.Data(data=body), h11.EndOfMessage())

        if behaviour == HANG:
            await reader.read()  # until the client gives up and closes
            return False
        if behaviour == ERROR_500:
            respond(500, orjson.dumps({"error": "internal_error", "detail": "fake failure"}))
        elif behaviour == NOT_JSON:
            respond(status, b"<html><body>Bad gateway page</body></html>", b"text/html")
        elif behaviour == NOT_HTTP:
            writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
            await reader.read()
            return False
        elif behaviour == HUGE:
            respond(200, b" " * HUGE_SIZE)
        elif behaviour == MANY_CONTAINERS:
            respond(200, MANY_CONTAINERS_BODY)
        elif behaviour == MANY_STRINGS:
            respond(200, MANY_STRINGS_BODY)
        elif behaviour == PUNCTUATED_TEXT:
            respond(200, PUNCTUATED_TEXT_BODY)
        elif behaviour == HUGE_HEADERS_ONLY:
            send(h11.Response(status_code=200, headers=[(b"content-length", str(HUGE_SIZE).encode())]))
            await reader.read()
            return False
        elif behaviour == HUGE_CHUNKED:
            send(h11.Response(status_code=200, headers=[(b"content-type", b"application/json"),
                                                        (b"transfer-encoding", b"chunked")]))
            chunk = b" " * 65536
            for _ in range(HUGE_SIZE // len(chunk)):
                send(h11.Data(data=chunk))
                await writer.drain()
            send(h11.EndOfMessage())
        elif behaviour == CLOSE_BEFORE_REPLY:
            return False
        elif behaviour == CLOSE_MID_REPLY:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"partial\":")
            await writer.drain()
            return False
        else:  # HEALTHY, CLOSE_AFTER_REPLY
            respond(status, orjson.dumps(data))
        await writer.drain()
        return behaviour != CLOSE_AFTER_REPLY
