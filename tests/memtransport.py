"""A connection without a socket: an in-memory transport and a loop whose clock the test
advances, to drive the server's protocols (edgelink/http) byte by byte, deterministically.

``SteerableLoop`` is what the protocols use of a loop (``time``, ``call_later``,
``call_soon``): nothing runs until the test says so (``run_ready``, ``advance``), and time
moves only by ``advance``. Tasks and futures are the running asyncio loop's, as in
uvicorn's tests (a mock loop for timers, the real one for coroutines): a test with a
handler task runs under ``asyncio.run`` and lets it go on with ``await turns()``.

``MemoryTransport`` keeps what the server writes and models the kernel on the other side:
``client_reads=False`` is a client that reads nothing, so writes wait in our buffer and
pause writing past the high mark, as asyncio's transports do; ``read_all`` drains it."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import replace
from typing import Any, Callable

from edgelink.config import Settings
from edgelink.http.messages import Response
from edgelink.http.server import HttpServer


class Timer:
    """A ``call_later`` handle of the steerable loop."""

    def __init__(self, when: float, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class SteerableLoop:
    def __init__(self) -> None:
        self.now = 1000.0
        self._timers: list[tuple[float, int, Timer]] = []
        self._ready: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Timer:
        timer = Timer(self.now + delay, callback, args)
        heapq.heappush(self._timers, (timer.when, next(self._order), timer))
        return timer

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        self._ready.append((callback, args))

    def create_task(self, coro: Any) -> asyncio.Task[Any]:
        return asyncio.get_running_loop().create_task(coro)

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    def pending(self) -> list[Timer]:
        """The timers still to run, soonest first."""
        return [t for _, _, t in sorted(self._timers) if not t.cancelled]

    def run_ready(self) -> None:
        while self._ready:
            ready, self._ready = self._ready, []
            for callback, args in ready:
                callback(*args)

    def advance(self, seconds: float) -> None:
        """Move the clock on by ``seconds``, running what falls due on the way, in order."""
        until = self.now + seconds
        self.run_ready()
        while self._timers and self._timers[0][0] <= until:
            when, _, timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self.now = max(self.now, when)
            timer.callback(*timer.args)
            self.run_ready()
        self.now = until


class MemoryTransport:
    """What the protocols use of a transport, in memory."""

    def __init__(self, loop: SteerableLoop, peer: tuple[str, int] = ("127.0.0.1", 40000)) -> None:
        self.loop = loop
        self.peer = peer
        self.protocol: Any = None
        self.received = bytearray()  # what the client has read
        self.unread = bytearray()  # what waits in our buffer: the client is not reading
        self.client_reads = True
        self.high = 64 * 1024
        self.low = 16 * 1024
        self.write_paused = False
        self.reading = True
        self.held_input: list[bytes] = []  # sent by the client while we did not read
        self.eof_written = False  # our FIN
        self.closing = False
        self.aborted = False
        self.lost = False

    # --- the transport, as the server sees it -------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = 64 * 1024 if high is None else high
        self.low = self.high // 4 if low is None else low

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.low, self.high

    def get_write_buffer_size(self) -> int:
        return len(self.unread)

    def write(self, data: bytes | memoryview) -> None:
        assert not self.eof_written and not self.lost, "written after FIN or close"
        if self.closing:
            return
        if self.client_reads and not self.unread:
            self.received += data
            return
        self.unread += data
        if not self.write_paused and len(self.unread) > self.high:
            self.write_paused = True
            self.protocol.pause_writing()

    def writelines(self, parts: Any) -> None:
        self.write(b"".join(bytes(p) for p in parts))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True
        held, self.held_input = self.held_input, []
        for data in held:
            self.loop.call_soon(self._deliver, data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            if not self.unread:
                self.loop.call_soon(self._lose)

    def abort(self) -> None:
        self.aborted = True
        self.unread.clear()
        if not self.lost:
            self.closing = True
            self.loop.call_soon(self._lose)

    # --- the client's side ------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """The client sends ``data``; it waits in the kernel while we do not read."""
        if self.reading and not self.lost:
            self._deliver(data)
        else:
            self.held_input.append(data)

    def send_eof(self) -> None:
        """The client half-closes; the transport closes if the protocol says so."""
        if not self.protocol.eof_received():
            self.close()

    def read_all(self) -> bytes:
        """The client reads what waits (the kernel's buffer drains); writing resumes."""
        self.received += self.unread
        self.unread.clear()
        if self.write_paused:
            self.write_paused = False
            self.protocol.resume_writing()
        if self.closing and not self.lost:
            self.loop.call_soon(self._lose)
        return self.take()

    def take(self) -> bytes:
        """What the client has read since the last take."""
        data = bytes(self.received)
        self.received.clear()
        return data

    def _deliver(self, data: bytes) -> None:
        if self.reading:
            self.protocol.data_received(data)
        else:
            self.held_input.append(data)

    def _lose(self) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(None)


class App:
    """A dispatcher: ``/slow...`` answers from a task once the test resolves it, ``/ws`` is
    a WebSocket that echoes, anything else answers its path and body at once."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.refusals: list[str] = []
        self.slow: list[asyncio.Future[None]] = []
        self.ws_messages: list[Any] = []

    def respond(self, request: Any) -> Any:
        self.seen.append(request.path)
        if request.path.startswith("/slow"):
            return self._slow(request)
        return Response(200, request.path.encode() + b"|" + request.body, content_type=b"text/plain")

    async def _slow(self, request: Any) -> Response:
        done = asyncio.get_running_loop().create_future()
        self.slow.append(done)
        await done
        return Response(200, request.path.encode() + b"|", content_type=b"text/plain")

    def websocket(self, request: Any) -> Any:
        return self._echo

    async def _echo(self, ws: Any) -> None:
        while (message := await ws.receive()) is not None:
            self.ws_messages.append(message)
            ws.send(b"echo:" + message.encode())

    def admit(self, request: Any) -> None:
        request.admitted = True
        return None

    def refused(self, budget: str) -> None:
        self.refusals.append(budget)


def make_server(dispatcher: Any, loop: SteerableLoop | None = None, **settings: Any) -> HttpServer:
    """An ``HttpServer`` on a steerable loop (and clock), with these settings changed."""
    loop = loop or SteerableLoop()
    return HttpServer(dispatcher, replace(Settings(), **settings), loop=loop, clock=loop.time)  # type: ignore[arg-type]


def connect(server: HttpServer) -> MemoryTransport:
    """A new client connection to ``server``."""
    transport = MemoryTransport(server.loop)  # type: ignore[arg-type]
    protocol = server._make_protocol()
    transport.protocol = protocol
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return transport


async def turns(count: int = 5) -> None:
    """Let the running loop's tasks take ``count`` turns (no time passes)."""
    loop = asyncio.get_running_loop()
    for _ in range(count):
        done = loop.create_future()
        loop.call_soon(done.set_result, None)
        await done
