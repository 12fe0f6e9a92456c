"""The HTTP/1.1 server: an asyncio protocol over h11, handing upgraded connections to wsproto.

h11 parses every byte a client sends; responses are serialized here. Sending a response
through h11's state machine cost about half the CPU of a small request (measured: 65 µs
for a full h11 cycle against 31 µs for parsing alone), so each request gets a fresh h11
parser fed what was pipelined behind the previous one, and keep-alive follows HTTP/1.1's
rules (close on ``Connection: close`` and for HTTP/1.0), as h11 itself would decide.

Theory of operation. Each connection is an ``HttpProtocol`` in one of these phases:

    IDLE     waiting for the first byte of a request (keep-alive idle timer)
    HEADERS  a request has started; its header block must be complete in time
    BODY     reading the body (counted against the body limit as it arrives)
    HANDLING the handler runs and its response is written; later pipelined requests wait
             in h11's buffer and are answered in order once this one is done
    WEBSOCKET the connection belongs to a ``WebSocket``

What the server decides itself (never the handlers): 414 for a request line over the
limit, 431 for a header block over the limit, 413 for a body over the limit (from
Content-Length before reading, or while reading a chunked body), 400 for bytes that are
not HTTP, 408 when a request does not arrive in time, 503 when the connection limit is
reached. Each of these answers once, is counted as a budget refusal and closes that
connection only. Before a body is read (or ``100 Continue`` sent) the dispatcher's
``admit`` may refuse the request (unknown route, missing token): a client without a token
never makes us buffer a body.

Flow control, bounded in bytes per connection: the kernel's send buffer is sized by the
write-buffer setting; once it is full and anything waits in ours, we stop reading from
that socket and stop answering what it pipelined until ours is empty again, so what waits
in the process is at most the one answer that did not fit, and on input one read plus a
header block; a client stuck past the send timeout is dropped. After a WebSocket upgrade
our buffer may fill up to the setting before frames queue in the WebSocket.

Closing: a connection is half-closed (FIN) and what the client still sends is read and
discarded for a short while, because closing a socket with unread data sends a RST that
can destroy the answer before the client reads it. A timer that fires while bytes wait
unread in the kernel (the process was stopped, the loop stalled) reads them first.

Streamed bodies (``StreamingResponse``): the head goes out at once, then each chunk as the
handler's generator yields it, the next one asked for only once nothing waits in our buffer
(the same rule as above), so a slow client slows the producer instead of growing our
buffer. A client that goes away cancels the stream; at the end of the shutdown grace a
stream still running is ended with its last chunk and closed. The request is told when its
caller goes away (``Request.hang_up``), so a handler still waiting for a stream's first
byte can give up on the module at once.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import fcntl
import socket
import sys
import termios
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Coroutine, Protocol, cast
from urllib.parse import unquote

import h11

from ..account import BODIES, REPLIES, STREAMS, Account, Share
from ..log import address, client_log, log, traceback_text
from .frames import CLOSE_GOING_AWAY, CLOSE_TRY_AGAIN_LATER
from .messages import HTTPError, Request, Response, StreamingResponse

if TYPE_CHECKING:
    from .websocket import WebSocket

WsHandler = Callable[["WebSocket"], Awaitable[None]]


class Dispatcher(Protocol):
    """What the server needs from the application."""

    def respond(self, request: Request) -> Response | Coroutine[Any, Any, Response]:
        """The answer, or a coroutine to run in a task for it."""

    def websocket(self, request: Request) -> Response | WsHandler: ...

    def admit(self, request: Request) -> Response | None:
        """Before its body is read: a Response refuses the request, None lets it in; the
        body is held only if ``request.admitted`` is then set (a route that takes one)."""

    def refused(self, budget: str) -> None:
        """Count one refusal by a transport budget (``request_line``, ``connections``, ...)."""


class OverloadCounter(Protocol):
    """What the server needs from the overload manager (overload.py, above http/)."""

    def count(self, action: str, n: int = 1) -> None: ...


class Phase(enum.Enum):
    IDLE = 0
    HEADERS = 1
    BODY = 2
    HANDLING = 3
    WEBSOCKET = 4
    CLOSED = 5


_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_SHARE_BODY_OVER = 16 * 1024  # below this, one joined write is cheaper than two buffers
# Pipelined requests answered without a task in one turn of the loop, before the rest wait
# for the next turn: other connections are not kept waiting behind one client's burst.
_ANSWERS_PER_TURN = 32
_VERSIONS = {b"1.1": "1.1", b"1.0": "1.0"}


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(seconds: int) -> bytes:
    """RFC 9110 IMF-fixdate (``Sun, 06 Nov 1994 08:49:37 GMT``): English names whatever the
    locale, and without email.utils, whose import alone was ~4 ms of the start-up."""
    t = time.gmtime(seconds)
    return b"%s, %02d %s %04d %02d:%02d:%02d GMT" % (
        _DAYS[t.tm_wday].encode(), t.tm_mday, _MONTHS[t.tm_mon - 1].encode(), t.tm_year, t.tm_hour, t.tm_min,
        t.tm_sec)


class _Clock:
    """The Date header, formatted once a second rather than per response."""

    second = 0
    value = b""

    @classmethod
    def date(cls) -> bytes:
        now = int(time.time())
        if now != cls.second:
            cls.second = now
            cls.value = http_date(now)
        return cls.value


def raw_error(status: int, code: str, headers: bytes = b"", **extra: Any) -> bytes:
    """A complete HTTP/1.1 error response that closes the connection, for answers given
    when h11's state can no longer be trusted (bad bytes, limits, timeouts). ``headers``:
    more header lines, each ending in CRLF."""
    body = HTTPError(status, code, **extra).response().body
    return b"".join((
        b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Error")),
        b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body), headers,
        b"connection: close\r\ndate: ", _Clock.date(), b"\r\n\r\n", body,
    ))


RETRY_AFTER = b"retry-after: 1\r\n"
# Methods whose routes take no body (API.md §1): a body they declare is read and dropped as
# it arrives, never held, reserved or answered with 100 Continue.
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "DELETE"})
STREAM_SLICE = 64 * 1024  # the most of a stream that waits to be written (API.md §3)


class StreamRefused(Exception):
    """A stream's next slice did not fit in the account: the stream ends there."""


class HttpServer:
    """Owns the listening sockets and the set of live connections; knows nothing of routes."""

    def __init__(self, dispatcher: Dispatcher, settings: Any, account: Account | None = None):
        self.dispatcher = dispatcher
        self.settings = settings
        # The one account of bytes held for others (account.py); each connection opens its
        # share of it. A server on its own (the demo modules, benches) keeps its own.
        if account is None:
            account = Account(settings.memory_budget, settings.client_share)
            account.limit(BODIES, settings.max_bodies)
        self.account = account
        # Set by the overload manager (overload.py) while resident memory is over the soft
        # mark: no new body, stream or WebSocket is accepted. ``overload`` counts what it refuses.
        self.overloaded = False
        self.overload: OverloadCounter | None = None
        self.connections: set[HttpProtocol] = set()
        self.stopping = False
        self._servers: list[asyncio.Server] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self._refused_since_log = 0
        self._refusal_logged_at = -1.0

    def refuse_connection(self, client: tuple[str, int] | None) -> None:
        """Count a connection refused at the limit; log at most once a second, with the
        number refused since, so that a flood of connections is not a flood of lines."""
        self.dispatcher.refused("connections")
        self._refused_since_log += 1
        now = time.monotonic()
        if now - self._refusal_logged_at >= 1.0:
            log.warning("connection_refused", reason="too_many_connections", client=address(client),
                        refused=self._refused_since_log, limit=self.settings.max_connections)
            self._refused_since_log = 0
            self._refusal_logged_at = now

    async def start(self, host: str | None = None, port: int = 0,
                    socks: list[socket.socket] | None = None) -> None:
        """Listen on ``host:port``, or on already-bound sockets (systemd socket activation)."""
        loop = asyncio.get_running_loop()
        if socks:
            for sock in socks:
                self._servers.append(await loop.create_server(self._make_protocol, sock=sock, backlog=1024))
        else:
            self._servers.append(await loop.create_server(self._make_protocol, host, port,
                                                          reuse_address=True, backlog=1024))

    @property
    def sockets(self) -> list[socket.socket]:
        return [sock for server in self._servers for sock in server.sockets]

    def _make_protocol(self) -> "HttpProtocol":
        return HttpProtocol(self)

    def busy_changed(self) -> None:
        if self.stopping and not any(c.busy for c in self.connections):
            self._idle.set()

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, close WebSockets with 1001, let requests in flight finish within
        ``grace`` seconds, then drop whatever is left."""
        self.stopping = True
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.begin_shutdown()
        if any(c.busy for c in self.connections):
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except asyncio.TimeoutError:
                log.warning("shutdown_grace_expired", connections=len(self.connections))
        for conn in list(self.connections):
            conn.finish()
        # Give closed transports one loop turn to run connection_lost.
        await asyncio.sleep(0)


class HttpProtocol(asyncio.Protocol):
    __slots__ = ("server", "settings", "transport", "conn", "phase", "client", "_timer", "_send_timer",
                 "_request", "_body", "_body_size", "_body_deadline", "_reading", "_read_blockers",
                 "_ws", "_task", "_loop", "_line_checked", "_must_close", "_stall_read", "_eof", "_refusal",
                 "_streaming", "_drain", "_processing", "_parser_empty", "_reserved", "_share", "_keep_body",
                 "_head_lines", "_sent_mark", "_answered")

    def __init__(self, server: HttpServer):
        self.server = server
        self.settings = server.settings
        self.transport: asyncio.Transport | None = None
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.settings.max_header)
        self.phase = Phase.IDLE
        self.client: tuple[str, int] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._request: Request | None = None
        self._body: list[bytes] = []
        self._body_size = 0
        self._body_deadline = 0.0
        self._reading = True
        self._read_blockers: set[str] = set()
        self._ws: WebSocket | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._line_checked = False  # the request line is known to be within its limit
        self._must_close = False  # answer this request, then close (ambiguous framing)
        self._stall_read = False  # a timer already waited once for unread bytes
        self._eof = False  # the client has half-closed its side
        self._refusal: Response | None = None  # admit's answer, given once the body is discarded
        self._streaming = False
        self._drain: asyncio.Future[None] | None = None
        self._processing = False  # _process is running: an answer given inside it does not recurse
        self._parser_empty = False  # a fresh parser was fed nothing: asking it would only say NEED_DATA
        self._reserved = 0  # body bytes this request holds of the account (piece "bodies")
        self._share: Share | None = None  # this connection's part of the account, while open
        self._keep_body = False  # this request's body is held (admitted, authenticated, reserved)
        self._head_lines = 0  # line ends read since the current head began (field count check)
        self._sent_mark = 0  # write buffer size when the send timer was armed (progress check)
        self._answered = False  # a request on this connection was answered (it is not fresh)

    @property
    def _wire(self) -> asyncio.Transport:
        """The transport, for what runs only once connected (connection_made set it)."""
        assert self.transport is not None
        return self.transport

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's stubs say BaseTransport; a stream server's is a Transport (uvloop's has its
        # methods without subclassing it)
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.client = (peer[0], peer[1]) if isinstance(peer, tuple) else None
        if self.server.stopping:
            transport.write(raw_error(503, "stopping"))
            self._close()
            return
        if len(self.server.connections) >= self.settings.max_connections:
            self.server.refuse_connection(self.client)
            transport.write(raw_error(503, "too_many_connections"))
            # No lingering here: at the limit we spend no descriptors on refused clients.
            transport.close()
            self.phase = Phase.CLOSED
            return
        self.server.connections.add(self)
        self._share = self.server.account.open()
        # HTTP: "paused" means anything waits in our buffer, the kernel's being full (it is
        # sized by write_buffer_high below); the next pipelined answer waits until ours is
        # empty, so a connection holds at most the one answer that did not fit.
        transport.set_write_buffer_limits(high=0)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # The kernel's send buffer counts against the unit's memory too, and autotuned
            # it grows to megabytes for a client that never reads, each bit of growth
            # looking like progress to the send timeout: bound it by the setting.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.settings.write_buffer_high)
        self._set_timer(self.settings.header_timeout, self._on_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = Phase.CLOSED
        self._cancel_timer()
        if self._send_timer is not None:
            self._send_timer.cancel()
        self.server.connections.discard(self)
        self._reserved = 0
        if self._share is not None:
            self._share.close()  # whatever the connection held, at whatever point it was lost
        if self._ws is not None:
            self._ws.connection_lost()
        if self._request is not None:
            self._request.hang_up()
        if self._streaming and self._task is not None:
            self._task.cancel()  # nobody reads the stream any more: stop producing it
        self.server.busy_changed()

    def data_received(self, data: bytes) -> None:
        if self.phase is Phase.WEBSOCKET:
            assert self._ws is not None
            self._ws.feed(data)
            return
        if self.phase is Phase.CLOSED:
            return
        self._parser_empty = False
        self.conn.receive_data(data)
        if self.phase is Phase.IDLE or self.phase is Phase.HEADERS:
            # A head of many short fields costs h11 far more to parse than its bytes suggest:
            # count line ends as they come and look closer (rarely) only past the limit.
            self._head_lines += data.count(b"\n")
            if self._head_lines > self.settings.max_header_fields + 1 and self._too_many_fields():
                return
        if self.phase is Phase.HANDLING:
            # Pipelined bytes wait in h11's buffer until this answer is out; read no more
            # meanwhile, so what we hold is one read's worth, whatever the client sends.
            self._block_reading("pipeline")
            return
        if self.phase is Phase.IDLE:
            self.phase = Phase.HEADERS
            self._stall_read = False
            idle_timer = self._timer
            self._process()
            # Most requests arrive whole and are answered above; one still incomplete gets
            # the header timeout from now (a body's own reads re-arm it as they arrive).
            if self._timer is idle_timer and self.phase in (Phase.HEADERS, Phase.BODY):
                self._set_timer(self.settings.header_timeout, self._on_timeout)
            return
        self._process()

    def eof_received(self) -> bool:
        if self.phase is Phase.WEBSOCKET:
            assert self._ws is not None
            self._ws.feed(None)
            return False
        self._eof = True
        if self.phase is Phase.CLOSED:
            return False  # the end of a lingering close
        self._parser_empty = False
        if self._request is not None and self.phase is Phase.HANDLING:
            self._request.hang_up()
        if self._streaming and self._task is not None:
            # A caller that stops sending mid-stream has gone (clients do not half-close to
            # read a stream): stop now rather than at the next write or idle timeout.
            self._close()
            self._task.cancel()
            return False
        self.conn.receive_data(b"")
        if self.phase is not Phase.HANDLING:
            self._process()
        # Keep the transport open so a half-closed client still gets its answer.
        return True

    def pause_writing(self) -> None:
        self._block_reading("write")
        if self._ws is not None:
            self._ws.pause_writing()
        # A client that reads nothing for this long is gone as far as we are concerned. Its
        # own timer: the phase timer is re-armed as buffered requests are answered.
        if self._send_timer is None and self.transport is not None:
            self._arm_send_timer(self.transport.get_write_buffer_size())

    def resume_writing(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        self._unblock_reading("write")
        if self._share is not None:
            self._share.give(REPLIES, self._share.by_piece.get(REPLIES, 0))  # written out
        if self._ws is not None:
            self._ws.resume_writing()
        elif self.phase is Phase.IDLE:
            # Answer what was pipelined while the client was not reading.
            self._set_timer(self.settings.keepalive_timeout, self._on_timeout)
            self._process()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # --- state the server looks at -------------------------------------------------------

    @property
    def busy(self) -> bool:
        """True while a request is in flight, or, once shutdown began, while a WebSocket
        is finishing its close handshake or a fresh connection has not sent its request yet
        (a client connects to send one: closing it unanswered would lose that request; the
        header timeout still bounds the wait)."""
        return self.phase in (Phase.HEADERS, Phase.BODY, Phase.HANDLING) or (self.server.stopping and (
            self.phase is Phase.WEBSOCKET or (self.phase is Phase.IDLE and not self._answered)))

    def held_bytes(self) -> int:
        """What this connection holds for its client: its share of the account and what
        waits in its buffers (the overload manager closes the heaviest first)."""
        held = self._share.held if self._share is not None else 0
        if self.transport is not None and self.phase is not Phase.CLOSED:
            held += self.transport.get_write_buffer_size()
        if self._ws is not None:
            held += self._ws.waiting_bytes()
        return held

    def overload_reading(self, on: bool) -> bool:
        """Stop (or resume) reading for the overload manager; whether it was stopped."""
        if on:
            self._unblock_reading("overload")
            return True
        if self.phase is Phase.CLOSED or self.phase is Phase.HANDLING:
            # While an answer is being made, what the client pipelines is held back already;
            # reading on is what tells us the caller left (a stream is then stopped at once).
            return False
        self._block_reading("overload")
        return True

    def begin_shutdown(self) -> None:
        # Idle keep-alive connections stay open while requests elsewhere finish: a request
        # on one is answered (/health with 503 stopping) and then closed.
        if self.phase is Phase.WEBSOCKET and self._ws is not None:
            self._ws.close(CLOSE_GOING_AWAY, "server shutting down")

    def finish(self) -> None:
        """At the end of shutdown: close an idle connection, drop anything else."""
        if self.phase is Phase.IDLE and self.transport is not None:
            self._close()
        elif self._streaming and self._task is not None:
            self._task.cancel()  # the stream writes its last chunk and closes (_write_stream)
        else:
            self.abort()

    def abort(self) -> None:
        # Also when CLOSED: a closed transport still holds what the client did not read.
        if self.transport is not None:
            self.transport.abort()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    # --- request parsing --------------------------------------------------------------

    def _process(self) -> None:
        if self._processing:
            return  # an answer given synchronously inside the loop below: it carries on
        self._processing = True
        try:
            self._process_events()
        finally:
            self._processing = False

    def _process_events(self) -> None:
        answered = 0
        while self.phase in (Phase.IDLE, Phase.HEADERS, Phase.BODY):
            if self._parser_empty and self.phase is Phase.IDLE:
                self._unblock_reading("pipeline")  # what NEED_DATA below does, without h11's work
                return
            if answered == _ANSWERS_PER_TURN:
                self._block_reading("pipeline")
                self._loop.call_soon(self._process)
                return
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._protocol_error(exc)
                return
            if event is h11.NEED_DATA:
                if self.phase is Phase.HEADERS and not self._line_checked and self._request_line_too_long():
                    return
                self._unblock_reading("pipeline")
                return
            if isinstance(event, h11.Request):
                if self._start_request(event):
                    continue
                return
            if isinstance(event, h11.Data):
                self._body_size += len(event.data)
                if self._body_size > self.settings.max_body:
                    self._refuse(413, "payload_too_large", "body", detail=f"body exceeds {self.settings.max_body} bytes")
                    return
                if self._keep_body:  # any other body is read and dropped as it arrives
                    if self._body_size > self._reserved and not self._reserve_body(self._body_size):
                        return  # a chunked body past what the account or this share may hold
                    self._body.append(event.data)
                # Each chunk buys another header timeout, but never past the body deadline:
                # a body trickled in a byte at a time cannot hold the connection for ever.
                left = self._body_deadline - self._loop.time()
                self._set_timer(min(self.settings.header_timeout, max(left, 0.0)), self._on_timeout)
            elif isinstance(event, h11.EndOfMessage):
                if self._refusal is not None:
                    assert self._request is not None
                    self._answer_refusal(self._request)
                else:
                    self._dispatch()
                if "write" in self._read_blockers:
                    return  # the client is not reading: resume_writing carries on
                answered += 1  # answered already unless a task took it (phase HANDLING)
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                self._close()
                return

    def _start_request(self, event: h11.Request) -> bool:
        if len(event.method) + len(event.target) + 10 > self.settings.max_request_line:  # "M T HTTP/1.1"
            self._refuse_line()
            return False
        # h11 bounds only a block still incomplete; one that arrived whole is measured here.
        size = len(event.target)
        headers: dict[str, str] = {}
        for name, value in event.headers.raw_items():  # a list: cheaper than iterating Headers
            size += len(name) + len(value) + 4
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        if size > self.settings.max_header:
            self._refuse_headers()
            return False
        if len(event.headers) > self.settings.max_header_fields:  # those the line count missed
            self._refuse_fields()
            return False
        target = event.target.decode("latin-1")
        if not target.startswith("/"):
            target = _origin_form(target)
        request = self._request = Request(event.method.decode("ascii"), target, headers, client=self.client,
                                          http_version=_VERSIONS.get(event.http_version) or event.http_version.decode())
        if "%" in request.path:
            request.path = unquote(request.path)
        request.share = self._share
        self._body = []
        self._body_size = 0
        self._head_lines = 0
        self._keep_body = False
        length = headers.get("content-length")
        chunked = "transfer-encoding" in headers
        # Both framings: h11 reads the body as chunked; RFC 9112 §6.1 says close after answering.
        self._must_close = chunked and length is not None
        if length is not None and not chunked and int(length) > self.settings.max_body:
            # Decided before reading a byte of the body (h11 has checked it is a number).
            self._refuse(413, "payload_too_large", "body", detail=f"body exceeds {self.settings.max_body} bytes")
            return False
        expects = self.conn.they_are_waiting_for_100_continue
        if (chunked or expects or (length is not None and length != "0")) \
                and request.method not in _NO_BODY_METHODS:
            # Only a route that takes a body, with its token accepted, has its body held
            # (and is told 100 Continue); any other body is read and dropped as it arrives.
            self._refusal = self.server.dispatcher.admit(request)
            if self._refusal is not None and expects:
                # The client holds its body back: answer, then close, as it may send the
                # body or not (lingering, so the answer is not lost to a RST).
                self._must_close = True
                self._answer_refusal(request)
                return False
            self._keep_body = self._refusal is None and request.admitted is not None
            if self._keep_body and self.server.overloaded:
                self._refuse_overloaded("request bodies")
                return False
            if self._keep_body and length is not None and not chunked and not self._reserve_body(int(length)):
                return False  # decided before reading the body (and before 100 Continue)
            if expects and self._keep_body:
                self._wire.write(self.conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        self.phase = Phase.BODY
        self._body_deadline = self._loop.time() + self.settings.body_timeout
        return True

    def _reserve_body(self, size: int) -> bool:
        """Hold ``size`` body bytes for this request (in all, not more) of the account and
        this connection's share; past either, answer 503 ``gateway_overloaded`` and close
        (the account counts the refusal under ``bodies``)."""
        assert self._share is not None
        if not self._share.take(BODIES, size - self._reserved):
            self._refuse(503, "gateway_overloaded", headers=RETRY_AFTER,
                         detail="request bodies in progress would exceed the memory account "
                                "(EDGELINK_MEMORY_BUDGET, EDGELINK_MAX_BODIES) or this connection's share; retry")
            return False
        self._reserved = size
        return True

    def _release_body(self) -> None:
        if self._reserved:
            self._reserved = 0
            if self._share is not None:
                self._share.give(BODIES, self._share.by_piece.get(BODIES, 0))

    def _answer_refusal(self, request: Request) -> None:
        refusal, self._refusal = self._refusal, None
        assert refusal is not None
        self.phase = Phase.HANDLING
        self._cancel_timer()
        self._write_response(request, refusal)

    def _dispatch(self) -> None:
        request = self._request
        assert request is not None
        request.body = b"".join(self._body)
        self._body = []
        self.phase = Phase.HANDLING
        self._cancel_timer()
        if request.headers.get("upgrade", "").lower() == "websocket":
            self._upgrade(request)
            return
        try:
            outcome = self.server.dispatcher.respond(request)
        except Exception as exc:
            self._dispatch_failed(request, exc)
            return
        if isinstance(outcome, StreamingResponse):  # a handler that streams without waiting first
            self._task = self._loop.create_task(self._write_stream(request, outcome))
        elif isinstance(outcome, Response):
            self._write_response(request, outcome)
        else:
            self._task = self._loop.create_task(self._respond(request, outcome))

    async def _respond(self, request: Request, pending: Coroutine[Any, Any, Response]) -> None:
        if self.phase is Phase.CLOSED:
            # The caller left before the handler ran (a burst of requests whose callers hung
            # up at once): none of its work is done for nobody.
            pending.close()
            return
        try:
            response = await pending
        except Exception as exc:
            self._dispatch_failed(request, exc)
            return
        if isinstance(response, StreamingResponse):
            await self._write_stream(request, response)
        else:
            self._write_response(request, response)

    def _dispatch_failed(self, request: Request, exc: Exception) -> None:
        # The dispatcher answers handler errors; this is a bug of its own.
        log.error("dispatch_failed", error=repr(exc), path=request.path, traceback=traceback_text(exc))
        if self.phase is not Phase.CLOSED:
            self._wire.write(raw_error(500, "internal_error"))
            self._close()

    def _write_response(self, request: Request, response: Response) -> None:
        if self.phase is Phase.CLOSED:
            return
        head = self._head(request, response, b"content-length: %d\r\n" % len(response.body))
        if head is None:
            return
        parts, keep_alive = head
        body = response.body if request.method != "HEAD" and response.status not in (204, 304) else b""
        if len(body) > _SHARE_BODY_OVER:
            # Written as it is: a body shared by many answers (a cached document) is then
            # held once, not copied into each slow client's buffer.
            self._wire.writelines((b"".join(parts), body))
        else:
            parts.append(body)
            self._wire.write(b"".join(parts))
        self._hold_reply()
        self._end_response(keep_alive)

    def _hold_reply(self) -> None:
        """What the client has not taken yet waits in our buffer: it is the account's
        (``replies``) until written out (resume_writing gives it back). The reply's bytes
        may already be reserved (a module's reply, read under the same piece): only what
        waits beyond that is taken now. Past this share or the account, the connection is
        dropped, counted: we do not hold it."""
        share = self._share
        if share is None or self.transport is None:
            return
        buffered = self.transport.get_write_buffer_size()
        held = share.by_piece.get(REPLIES, 0)
        if not buffered:
            if held:
                share.give(REPLIES, held)
        elif buffered > held and not share.take(REPLIES, buffered - held):
            if client_log.allow(address(self.client)) is not None:
                log.info("connection_dropped", reason="reply over the memory account", client=address(self.client),
                         buffered=buffered)
            self.abort()

    def _head(self, request: Request, response: Response,
              framing: bytes) -> tuple[list[bytes | bytearray], bool] | None:
        """The status line and headers (``framing`` says how the body is delimited), and
        whether the connection stays open; None if the handler's headers were invalid (a
        500 has been sent and the connection closed)."""
        status = response.status
        keep_alive = _keep_alive(request) and not self.server.stopping and not self._must_close
        parts: list[bytes | bytearray] = [b"HTTP/1.1 %d %s\r\ndate: %s\r\nserver: edgelink\r\n"
                                          % (status, _REASONS.get(status, b""), _Clock.date())]
        if response.content_type is not None:
            parts.append(b"content-type: %s\r\n" % response.content_type)
        if status not in (204, 304):
            parts.append(framing)
        for name, value in response.headers:
            if b"\n" in value or b"\r" in value or b"\n" in name or b":" in name:
                log.error("response_invalid", header=name.decode("latin-1"), path=request.path,
                          correlation_id=request.correlation_id)
                self._wire.write(raw_error(500, "internal_error"))
                self._close()
                return None
            if name == b"connection" and b"close" in value.lower():
                keep_alive = False
                continue
            parts.append(b"%s: %s\r\n" % (name, value))
        parts.append(b"\r\n" if keep_alive else b"connection: close\r\n\r\n")
        return parts, keep_alive

    def _end_response(self, keep_alive: bool) -> None:
        if keep_alive:
            self._next_cycle()
        else:
            self._close()

    async def _write_stream(self, request: Request, response: StreamingResponse) -> None:
        """Write a streamed body: chunked to HTTP/1.1, close-delimited to HTTP/1.0."""
        chunks = response.chunks
        assert chunks is not None
        chunked = request.http_version == "1.1"
        try:
            head = None if self.phase is Phase.CLOSED else \
                self._head(request, response, b"transfer-encoding: chunked\r\n" if chunked else b"")
            if head is None:
                return
            parts, keep_alive = head
            if request.method == "HEAD" or response.status in (204, 304):
                self._wire.write(b"".join(parts))
                self._end_response(keep_alive)
                return
            self._wire.write(b"".join(parts))
            self._streaming = True
            # The handler has sent the body on: the stream may last long, its body need not.
            request.drop_body()
            self._release_body()
            try:
                first, response.body = response.body, b""
                await self._send_chunk(first, chunked)
                del first
                async for chunk in chunks:
                    await self._send_chunk(chunk, chunked)
            except asyncio.CancelledError:
                # shutdown grace over (not the caller gone, nor dropped): end it, not cut it
                if self.phase is not Phase.CLOSED and not self._wire.is_closing():
                    if chunked:
                        self._wire.write(b"0\r\n\r\n")
                    self._close()
                raise
            except Exception as exc:  # the producer failed: a truncated body tells the caller
                log.warning("stream_failed", error=repr(exc), path=request.path,
                            correlation_id=request.correlation_id)
                self._close()
                return
            finally:
                self._streaming = False
                self._drain = None
            if self.phase is Phase.CLOSED:
                return
            if chunked:
                self._wire.write(b"0\r\n\r\n")
            self._end_response(keep_alive)
        finally:
            await chunks.aclose()

    async def _send_chunk(self, chunk: bytes | bytearray, chunked: bool) -> None:
        """Write a stream's chunk STREAM_SLICE bytes at a time, each taken from the account
        (piece ``streams``) while it waits and given back once written out: what waits for
        a slow caller is one slice. Past its share or the account, the stream is ended
        (truncated: the caller sees it failed) rather than held."""
        share = self._share
        view = memoryview(chunk)
        for start in range(0, len(chunk), STREAM_SLICE):
            piece = view[start:start + STREAM_SLICE]
            if share is None or not share.take(STREAMS, len(piece)):
                raise StreamRefused("the stream's waiting bytes would exceed the memory account or its share")
            try:
                if chunked:
                    self._wire.writelines((b"%x\r\n" % len(piece), piece, b"\r\n"))
                else:
                    self._wire.write(piece)
                await self._drained()
            finally:
                share.give(STREAMS, len(piece))

    async def _drained(self) -> None:
        """Return once nothing waits in our buffer (writing is not paused): the next chunk
        is not asked for before."""
        if "write" in self._read_blockers:
            self._drain = self._loop.create_future()
            await self._drain

    def _next_cycle(self) -> None:
        # A fresh parser for the next request, fed what was pipelined behind this one: we
        # write responses ourselves, so the old one never saw this request answered.
        pending, eof = self.conn.trailing_data
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.settings.max_header)
        if pending:
            self.conn.receive_data(pending)
        if eof:
            self.conn.receive_data(b"")
        self._parser_empty = not pending and not eof
        self.phase = Phase.IDLE
        self._answered = True
        self._request = None
        self._task = None
        self._release_body()
        self._line_checked = False
        self._stall_read = False
        self.server.busy_changed()
        if "write" in self._read_blockers:
            # The client is not reading what we send: answering what it pipelined would
            # only pile answers up in memory. resume_writing carries on from here; until
            # then the send timeout, not the keep-alive one, decides how long it may wait.
            self._cancel_timer()
            return
        self._set_timer(self.settings.keepalive_timeout, self._on_timeout)
        # Answer what was pipelined behind this request before reading more; _process
        # resumes reading once h11 needs data.
        self._process()

    # --- WebSocket upgrade ------------------------------------------------------------

    def _upgrade(self, request: Request) -> None:
        problem = _handshake_problem(request)
        if problem is not None:
            status, code, detail = problem
            extra = [(b"sec-websocket-version", b"13")] if status == 426 else []
            self._write_response(request, HTTPError(status, code, extra + [(b"connection", b"close")],
                                                    detail=detail).response())
            self._close()
            return
        outcome = self.server.dispatcher.websocket(request)
        if isinstance(outcome, Response):
            outcome.headers.append((b"connection", b"close"))
            self._write_response(request, outcome)
            self._close()
            return
        # wsproto is imported at the first upgrade, not by every gateway (frames.py)
        from wsproto.events import AcceptConnection
        from wsproto.events import Request as WsRequest
        from wsproto.extensions import Extension

        from .websocket import BoundedDeflate, WebSocket, server_connection

        ws_conn = server_connection()
        raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()]
        try:
            ws_conn.initiate_upgrade_connection(raw_headers, request.target)
            offer = next(e for e in ws_conn.events() if isinstance(e, WsRequest))
            extensions: list[Extension] = \
                [BoundedDeflate(self.settings.ws_max_frame)] if self.settings.ws_compression else []
            accept = ws_conn.send(AcceptConnection(extensions=extensions,
                                                   extra_headers=[(b"x-correlation-id", request.correlation_id.encode())]))
        except Exception as exc:  # wsproto refused a handshake we thought valid
            if client_log.allow(address(self.client)) is not None:
                log.info("websocket_handshake_refused", error=type(exc).__name__, client=address(self.client))
            self._wire.write(raw_error(400, "bad_request", detail="invalid WebSocket handshake"))
            self._close()
            return
        compressed = bool(extensions) and any(
            "permessage-deflate" in ext for ext in offer.extensions if isinstance(ext, str))
        trailing, _ = self.conn.trailing_data
        self._wire.set_write_buffer_limits(high=self.settings.write_buffer_high)  # the WS queue takes over
        self._wire.write(accept)
        self.phase = Phase.WEBSOCKET
        self._unblock_reading("pipeline")
        self._ws = WebSocket(
            self._wire, ws_conn, request,
            max_message=self.settings.ws_max_frame, queue_limit=self.settings.ws_queue,
            queue_bytes=self.settings.ws_queue_bytes,
            ping_interval=self.settings.ws_ping_interval, compressed=compressed,
            set_reading=self._ws_reading, share=self._share,
        )
        self.server.busy_changed()
        if self.server.overloaded:
            if self.server.overload is not None:
                self.server.overload.count("refuse_new_work")
            self._ws.close(CLOSE_TRY_AGAIN_LATER, "gateway overloaded")
            return
        if trailing:
            self._ws.feed(trailing)
        self._task = self._loop.create_task(self._run_websocket(outcome, self._ws))

    async def _run_websocket(self, handler: WsHandler, ws: WebSocket) -> None:
        try:
            await handler(ws)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a handler bug must not leave the socket hanging
            log.error("websocket_handler_failed", error=repr(exc), correlation_id=ws.request.correlation_id,
                      traceback=traceback_text(exc))
            ws.close(1011, "internal error")
        else:
            ws.close()

    def _ws_reading(self, on: bool) -> None:
        if on:
            self._unblock_reading("ws-inbound")
        else:
            self._block_reading("ws-inbound")

    # --- errors, timers, reading control ----------------------------------------------------

    def _protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        status = exc.error_status_hint
        if status == 431:
            if not self._request_line_too_long():
                self._refuse_headers()
        else:
            # Never h11's own message: it quotes the offending line, which may hold a token.
            self._refuse(400, "bad_request", detail=_bad_request_detail(str(exc)))

    def _request_line_too_long(self) -> bool:
        """While a request has not been parsed: refuse it with 414 as soon as its first
        line is known to be over the limit (h11 would wait for the whole header block)."""
        limit = self.settings.max_request_line
        pending, _ = self.conn.trailing_data
        if pending.find(b"\n", 0, limit + 1) != -1:
            self._line_checked = True
            return False
        if len(pending) <= limit:
            return False
        self._refuse_line()
        return True

    def _refuse_line(self) -> None:
        self._refuse(414, "uri_too_long", "request_line",
                     detail=f"request line exceeds {self.settings.max_request_line} bytes")

    def _refuse_headers(self) -> None:
        self._refuse(431, "headers_too_large", "header_block",
                     detail=f"header block exceeds {self.settings.max_header} bytes")

    def _refuse_overloaded(self, what: str) -> None:
        if self.server.overload is not None:
            self.server.overload.count("refuse_new_work")
        self._refuse(503, "gateway_overloaded", headers=RETRY_AFTER,
                     detail=f"resident memory is over EDGELINK_MEMORY_SOFT: no new {what} for now; retry")

    def _refuse_fields(self) -> None:
        self._refuse(431, "headers_too_large", "header_fields",
                     detail=f"more than {self.settings.max_header_fields} header fields")

    def _too_many_fields(self) -> bool:
        """With the line count past the limit: whether the head being read has more fields
        than allowed (refused with 431 if so), counted up to its end or the header block
        limit, before h11 parses a field of it. Pipelined requests behind a head of few
        fields also push the count up: then it starts again."""
        pending, _ = self.conn.trailing_data
        limit = self.settings.max_header
        end = pending.find(b"\n\r\n", 0, limit)
        if end == -1:
            end = pending.find(b"\n\n", 0, limit)
        lines = pending.count(b"\n", 0, limit if end == -1 else end + 1)
        if lines > self.settings.max_header_fields + 1:  # the request line, then a field a line
            self._refuse_fields()
            return True
        self._head_lines = 0
        return False

    def _refuse(self, status: int, code: str, budget: str | None = None, headers: bytes = b"",
                **extra: Any) -> None:
        """Answer an error the server decides itself and close. Each ends its connection,
        so a client is logged once per connection, not once per request it sent, and
        client-caused lines are rate-limited (per address and in total)."""
        if budget is not None:
            self.server.dispatcher.refused(budget)
        if client_log.allow(address(self.client)) is not None:
            log.info("request_refused", status=status, error=code, client=address(self.client),
                     **({"detail": extra["detail"]} if "detail" in extra else {}))
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(raw_error(status, code, headers, **extra))
        self._close()

    def _on_timeout(self) -> None:
        self._timer = None
        if self.phase not in (Phase.IDLE, Phase.HEADERS, Phase.BODY):
            return
        if not self._stall_read and self.transport is not None and _unread_bytes(self.transport):
            # The loop ran this timer before reading the socket (the process was stopped,
            # the loop stalled): what waits may be a whole request. Read it first, once.
            self._stall_read = self.phase is not Phase.IDLE
            self._set_timer(self.settings.header_timeout, self._on_timeout)
        elif self.phase is Phase.IDLE:
            self._close()  # keep-alive idle: a quiet close is the norm
        else:
            self._refuse(408, "request_timeout", "request_time", detail="request not received in time")

    def _on_send_timeout(self) -> None:
        self._send_timer = None
        buffered = self.transport.get_write_buffer_size() if self.transport is not None else 0
        if 0 < buffered < self._sent_mark:
            # The client is reading, only slowly (a large answer): a slow reader is not a
            # stuck one, whatever the framing. It gets another send timeout from here.
            self._arm_send_timer(buffered)
            return
        self.server.dispatcher.refused("write_buffer")
        if client_log.allow(address(self.client)) is not None:
            log.info("connection_dropped", reason="client not reading", client=address(self.client),
                     buffered=buffered)
        self.abort()

    def _arm_send_timer(self, buffered: int) -> None:
        self._sent_mark = buffered
        self._send_timer = self._loop.call_later(self.settings.send_timeout, self._on_send_timeout)

    def _set_timer(self, delay: float, callback: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(delay, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _block_reading(self, reason: str) -> None:
        self._read_blockers.add(reason)
        if self._reading and self.transport is not None and not self.transport.is_closing():
            self._reading = False
            self.transport.pause_reading()

    def _unblock_reading(self, reason: str) -> None:
        self._read_blockers.discard(reason)
        if not self._reading and not self._read_blockers and self.transport is not None \
                and not self.transport.is_closing():
            self._reading = True
            self.transport.resume_reading()

    def _close(self) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        self._cancel_timer()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._eof or not transport.can_write_eof():
            transport.close()
            return
        # Lingering close: FIN after what is buffered, then read and discard until the
        # client closes too (eof_received) or the keep-alive timeout passes.
        transport.write_eof()
        self._read_blockers.clear()
        if not self._reading:
            self._reading = True
            transport.resume_reading()
        self._timer = self._loop.call_later(self.settings.keepalive_timeout, self._linger_expired)

    def _linger_expired(self) -> None:
        if self.transport is None:
            return
        if self.transport.get_write_buffer_size():
            # The answer is still going out: the send timer (running while anything waits)
            # drops a client that stops reading; one that reads slowly gets all of it.
            self._timer = self._loop.call_later(self.settings.keepalive_timeout, self._linger_expired)
        else:
            self.transport.close()


def _unread_bytes(transport: asyncio.Transport) -> int:
    """Bytes the kernel holds for this socket that the loop has not read yet."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(4)), sys.byteorder)
    except OSError:
        return 0


def _origin_form(target: str) -> str:
    """``http://host/path?q`` as ``/path?q`` (RFC 9112 §3.2.2: servers accept the absolute form)."""
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return target
    slash = rest.find("/")
    query = rest.find("?")
    if slash == -1 or (query != -1 and query < slash):
        return "/" + rest[query:] if query != -1 else "/"
    return rest[slash:]


def _bad_request_detail(message: str) -> str:
    """A fixed description of what h11 refused, without the bytes it quotes."""
    for part, detail in (("request line", "malformed request line"), ("header", "malformed header line"),
                         ("Content-Length", "bad Content-Length"), ("chunk", "malformed chunked body"),
                         ("Transfer-Encoding", "unsupported Transfer-Encoding")):
        if part.lower() in message.lower():
            return detail
    return "malformed HTTP request"


def _keep_alive(request: Request) -> bool:
    """HTTP/1.1 keeps the connection unless the client says close; HTTP/1.0 closes."""
    if request.http_version != "1.1":
        return False
    return "close" not in request.headers.get("connection", "").lower()


def _handshake_problem(request: Request) -> tuple[int, str, str] | None:
    """Why an upgrade request is not a valid RFC 6455 handshake, or None."""
    headers = request.headers
    if request.method != "GET":
        return 400, "bad_request", "a WebSocket handshake must be a GET"
    if "upgrade" not in headers.get("connection", "").lower():
        return 400, "bad_request", "Connection header must include Upgrade"
    if headers.get("sec-websocket-version", "").strip() != "13":
        return 426, "upgrade_required", "Sec-WebSocket-Version must be 13"
    key = headers.get("sec-websocket-key", "").strip()
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except ValueError:
        return 400, "bad_request", "Sec-WebSocket-Key must be 16 base64-encoded bytes"
    return None
