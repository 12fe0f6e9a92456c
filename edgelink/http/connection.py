"""One HTTP/1.1 connection: an asyncio protocol over h11 that reads the head, then the body,
then has the exchange answered; an upgrade hands the connection over to a
``WebSocketProtocol`` (upgrade.py).

``HttpProtocol`` is the phase machine below; each role it delegates has its own piece:
the head's limits and the answers it gives itself (head.py: ``Head``, ``Refusals``), the
body and its reservation in the memory account (body.py: ``Body``), writing the answer
once the handler has it (writer.py: ``ResponseWriter``), the upgrade (upgrade.py), its one
timer and the lingering close (timer.py: ``Timer``), and the wire helpers (wire.py).

h11 parses every byte a client sends; responses are serialized by the writer. Sending a
response through h11's state machine cost about half the CPU of a small request (measured:
65 µs for a full h11 cycle against 31 µs for parsing alone), so each request gets a fresh h11
parser fed what was pipelined behind the previous one, and keep-alive follows HTTP/1.1's
rules (close on ``Connection: close`` and for HTTP/1.0), as h11 itself would decide.

Theory of operation. Each connection is in one of these phases:

    IDLE     waiting for the first byte of a request (keep-alive idle timer)
    HEADERS  a request has started; its header block must be complete in time
    BODY     reading the body (counted against the body limit as it arrives)
    HANDLING the handler runs and its response is written; later pipelined requests wait
             in h11's buffer and are answered in order once this one is done
    CLOSED   closed or closing, or handed over to a WebSocket protocol

What the connection decides itself (never the handlers; head.py answers): 414 for a request line over the
limit, 431 for a header block over the limit, 413 for a body over the limit (from
Content-Length before reading, or while reading a chunked body), 400 for bytes that are
not HTTP, 408 when a request does not arrive in time. Each of these answers once, is
counted as a budget refusal and closes that connection only. Before a body is read (or
``100 Continue`` sent) the dispatcher's ``admit`` may refuse the request (unknown route,
missing token): a client without a token never makes us buffer a body.

Flow control, bounded in bytes per connection: the kernel's send buffer is sized by the
write-buffer setting; once it is full and anything waits in ours, we stop reading from
that socket and stop answering what it pipelined until ours is empty again, so what waits
in the process is at most the one answer that did not fit, and on input one read plus a
header block; a client stuck past the send timeout is dropped.

Closing: a connection is half-closed (FIN) and what the client still sends is read and
discarded for a short while, because closing a socket with unread data sends a RST that
can destroy the answer before the client reads it. A timer that fires while bytes wait
unread in the kernel (the process was stopped, the loop stalled) reads them first.

The request is told when its caller goes away (``Request.hang_up``), so a handler still
waiting for a stream's first byte can give up on the module at once.
"""

from __future__ import annotations

import asyncio
import enum
import socket
from typing import TYPE_CHECKING

import h11

from ..account import Share
from .body import Body
from .head import Head, Refusals
from .messages import Request, Response, StreamingResponse
from .timer import Timer
from .upgrade import upgrade
from .wire import ReadGate, SendWatch, raw_error, unread_bytes
from .writer import ResponseWriter

if TYPE_CHECKING:
    from .server import HttpServer
    from .upgrade import WebSocketProtocol


class Phase(enum.Enum):
    IDLE = 0
    HEADERS = 1
    BODY = 2
    HANDLING = 3
    CLOSED = 4


# Pipelined requests answered without a task in one turn of the loop, before the rest wait
# for the next turn: other connections are not kept waiting behind one client's burst.
_ANSWERS_PER_TURN = 32
# Methods whose routes take no body (API.md §1): a body they declare is read and dropped as
# it arrives, never held, reserved or answered with 100 Continue.
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "DELETE"})


class HttpProtocol(asyncio.Protocol):
    __slots__ = ("server", "settings", "loop", "transport", "conn", "phase", "client", "gate", "watch", "writer",
                 "refuse", "head", "body", "share", "must_close", "timer", "_request", "_task", "_stall_read",
                 "_eof", "_refusal", "_processing", "_parser_empty", "_answered")

    transport: asyncio.Transport
    gate: ReadGate
    watch: SendWatch

    def __init__(self, server: HttpServer):
        self.server = server
        self.settings = server.settings
        self.loop = server.loop
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.settings.max_header)
        self.phase = Phase.IDLE
        self.client: tuple[str, int] | None = None
        self.writer = ResponseWriter(self)
        self.refuse = Refusals(self)  # the answers it gives itself
        self.head = Head(self.settings, self.refuse)  # the head being read, against its limits
        self.body = Body(self)  # the body being read, and its reservation in the account
        self.share: Share | None = None  # this connection's part of the account, while open
        self.must_close = False  # answer this request, then close (ambiguous framing)
        self.timer = Timer(self.loop, self._on_timeout)  # the phase's deadline, or the linger's
        self._request: Request | None = None
        self._task: asyncio.Task[None] | None = None
        self._stall_read = False  # a timer already waited once for unread bytes
        self._eof = False  # the client has half-closed its side
        self._refusal: Response | None = None  # admit's answer, given once the body is discarded
        self._processing = False  # _process is running: an answer given inside it does not recurse
        self._parser_empty = False  # a fresh parser was fed nothing: asking it would only say NEED_DATA
        self._answered = False  # a request on this connection was answered (it is not fresh)

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.client = (peer[0], peer[1]) if isinstance(peer, tuple) else None
        self.gate = ReadGate(self.transport)
        self.watch = SendWatch(self.loop, self.settings.send_timeout, self.transport, self.client,
                               self.server.dispatcher, self.abort)
        # A connection accepted once shutdown began (in the loop pass that closed the listener)
        # is served like one accepted just before: its request is answered, /health with its
        # 503 "stopping" body, then it is closed; the header timeout and the grace bound it.
        if len(self.server.connections) >= self.settings.max_connections:
            self.server.refuse_connection(self.client)
            self.transport.write(raw_error(503, "too_many_connections"))
            # No lingering here: at the limit we spend no descriptors on refused clients.
            transport.close()
            self.phase = Phase.CLOSED
            return
        self.server.connections.add(self)
        self.share = self.server.account.open()
        # "Paused" means anything waits in our buffer, the kernel's being full (it is
        # sized by write_buffer_high below); the next pipelined answer waits until ours is
        # empty, so a connection holds at most the one answer that did not fit.
        self.transport.set_write_buffer_limits(high=0)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # The kernel's send buffer counts against the unit's memory too, and autotuned
            # it grows to megabytes for a client that never reads, each bit of growth
            # looking like progress to the send timeout: bound it by the setting.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.settings.write_buffer_high)
        self.timer.arm(self.settings.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = Phase.CLOSED
        self.timer.cancel()
        self.watch.stop()
        self.server.connections.discard(self)
        self.body.reserved = 0
        if self.share is not None:
            self.share.close()  # whatever the connection held, at whatever point it was lost
        if self._request is not None:
            self._request.hang_up()
        if self.writer.streaming and self._task is not None:
            self._task.cancel()  # nobody reads the stream any more: stop producing it
        self.server.busy_changed()

    def data_received(self, data: bytes) -> None:
        if self.phase is Phase.CLOSED:
            return
        self._parser_empty = False
        self.conn.receive_data(data)
        if self.phase is Phase.IDLE or self.phase is Phase.HEADERS:
            # A head of many short fields costs h11 far more to parse than its bytes suggest:
            # count line ends as they come and look closer (rarely) only past the limit.
            head = self.head
            head.lines += data.count(b"\n")
            if head.lines > self.settings.max_header_fields + 1 and head.too_many_fields(self.conn.trailing_data[0]):
                return
        if self.phase is Phase.HANDLING:
            # Pipelined bytes wait in h11's buffer until this answer is out; read no more
            # meanwhile, so what we hold is one read's worth, whatever the client sends.
            self.gate.block("pipeline")
            return
        if self.phase is Phase.IDLE:
            self.phase = Phase.HEADERS
            self._stall_read = False
            idle_timer = self.timer.handle
            self._process()
            # Most requests arrive whole and are answered above; one still incomplete gets
            # the header timeout from now (a body's own reads re-arm it as they arrive).
            if self.timer.handle is idle_timer and self.phase in (Phase.HEADERS, Phase.BODY):
                self.timer.arm(self.settings.header_timeout)
            return
        self._process()

    def eof_received(self) -> bool:
        self._eof = True
        if self.phase is Phase.CLOSED:
            return False  # the end of a lingering close
        self._parser_empty = False
        if self._request is not None and self.phase is Phase.HANDLING:
            self._request.hang_up()
        if self.writer.streaming and self._task is not None:
            # A caller that stops sending mid-stream has gone (clients do not half-close to
            # read a stream): stop now rather than at the next write or idle timeout.
            self.close()
            self._task.cancel()
            return False
        self.conn.receive_data(b"")
        if self.phase is not Phase.HANDLING:
            self._process()
        # Keep the transport open so a half-closed client still gets its answer.
        return True

    def pause_writing(self) -> None:
        self.gate.block("write")
        # A client that reads nothing for this long is gone as far as we are concerned. Its
        # own timer: the phase timer is re-armed as buffered requests are answered.
        self.watch.start()

    def resume_writing(self) -> None:
        self.watch.stop()
        self.gate.unblock("write")
        self.writer.written_out()
        if self.phase is Phase.IDLE:
            # Answer what was pipelined while the client was not reading.
            self.timer.arm(self.settings.keepalive_timeout)
            self._process()

    # --- state the server looks at -------------------------------------------------------

    @property
    def busy(self) -> bool:
        """True while a request is in flight, or, once shutdown began, while a fresh
        connection has not sent its request yet (a client connects to send one: closing it
        unanswered would lose that request; the header timeout still bounds the wait)."""
        return self.phase in (Phase.HEADERS, Phase.BODY, Phase.HANDLING) or (
            self.server.stopping and self.phase is Phase.IDLE and not self._answered)

    def held_bytes(self) -> int:
        """What this connection holds for its client: its share of the account and what
        waits in its buffer (the overload manager closes the heaviest first)."""
        held = self.share.held if self.share is not None else 0
        if self.phase is not Phase.CLOSED:
            held += self.transport.get_write_buffer_size()
        return held

    def overload_reading(self, on: bool) -> bool:
        """Stop (or resume) reading for the overload manager; whether it was stopped."""
        if on:
            self.gate.unblock("overload")
            return True
        if self.phase is Phase.CLOSED or self.phase is Phase.HANDLING:
            # While an answer is being made, what the client pipelines is held back already;
            # reading on is what tells us the caller left (a stream is then stopped at once).
            return False
        self.gate.block("overload")
        return True

    def begin_shutdown(self) -> None:
        """Nothing to do at once: idle keep-alive connections stay open while requests
        elsewhere finish; a request on one is answered (/health with 503 stopping) and then
        the connection is closed (the writer sees the server stopping)."""

    def finish(self) -> None:
        """At the end of shutdown: close an idle connection, drop anything else."""
        if self.phase is Phase.IDLE:
            self.close()
        elif self.writer.streaming and self._task is not None:
            self._task.cancel()  # the stream writes its last chunk and closes (ResponseWriter.stream)
        else:
            self.abort()

    def abort(self) -> None:
        # Also when CLOSED: a closed transport still holds what the client did not read.
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
                self.gate.unblock("pipeline")  # what NEED_DATA below does, without h11's work
                return
            if answered == _ANSWERS_PER_TURN:
                self.gate.block("pipeline")
                self.loop.call_soon(self._process)
                return
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                self.refuse.protocol_error(exc)
                return
            if event is h11.NEED_DATA:
                if self.phase is Phase.HEADERS and not self.head.line_checked \
                        and self.head.line_too_long(self.conn.trailing_data[0]):
                    return
                self.gate.unblock("pipeline")
                return
            if isinstance(event, h11.Request):
                if self._start_request(event):
                    continue
                return
            if isinstance(event, h11.Data):
                if not self.body.receive(event.data):
                    return  # refused: over the body limit, or past the account
                # Each chunk buys another header timeout, but never past the body deadline:
                # a body trickled in a byte at a time cannot hold the connection for ever.
                left = self.body.deadline - self.loop.time()
                self.timer.arm(min(self.settings.header_timeout, max(left, 0.0)))
            elif isinstance(event, h11.EndOfMessage):
                if self._refusal is not None:
                    assert self._request is not None
                    self._answer_refusal(self._request)
                else:
                    self._dispatch()
                if "write" in self.gate.blockers:
                    return  # the client is not reading: resume_writing carries on
                answered += 1  # answered already unless a task took it (phase HANDLING)
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                self.close()
                return

    def _start_request(self, event: h11.Request) -> bool:
        request = self._request = self.head.read(event, self.client)
        if request is None:
            return False  # refused
        request.share = self.share
        headers = request.headers
        length = headers.get("content-length")
        chunked = "transfer-encoding" in headers
        # Both framings: h11 reads the body as chunked; RFC 9112 §6.1 says close after answering.
        self.must_close = chunked and length is not None
        if length is not None and not chunked and int(length) > self.settings.max_body:
            # Decided before reading a byte of the body (h11 has checked it is a number).
            self.refuse.body_too_large()
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
                self.must_close = True
                self._answer_refusal(request)
                return False
            keep = self.body.keep = self._refusal is None and request.admitted is not None
            if keep and self.server.overloaded:
                self.refuse.overloaded("request bodies")
                return False
            if keep and length is not None and not chunked and not self.body.reserve(int(length)):
                return False  # decided before reading the body (and before 100 Continue)
            if expects and keep:
                self.transport.write(self.conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        self.phase = Phase.BODY
        self.body.deadline = self.loop.time() + self.settings.body_timeout
        return True

    # --- the exchange ---------------------------------------------------------------------

    def _answer_refusal(self, request: Request) -> None:
        refusal, self._refusal = self._refusal, None
        assert refusal is not None
        self.phase = Phase.HANDLING
        self.timer.cancel()
        self.writer.write(request, refusal)

    def _dispatch(self) -> None:
        request = self._request
        assert request is not None
        if self.body.parts:  # else the request's body is b"" already, at no call
            request.body = self.body.take()
        self.phase = Phase.HANDLING
        self.timer.cancel()
        if request.headers.get("upgrade", "").lower() == "websocket":
            upgrade(self, request)
            return
        try:
            outcome = self.server.dispatcher.respond(request)
        except Exception as exc:
            self.writer.failed(request, exc)
            return
        if isinstance(outcome, StreamingResponse):  # a handler that streams without waiting first
            self._task = self.loop.create_task(self.writer.stream(request, outcome))
        elif isinstance(outcome, Response):
            self.writer.write(request, outcome)
        else:
            self._task = self.loop.create_task(self.writer.answer(request, outcome))

    def end_response(self, keep_alive: bool) -> None:
        """The writer is done with this answer: on to the next request, or close."""
        if keep_alive:
            self._next_cycle()
        else:
            self.close()

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
        self.body.release()
        self._stall_read = False
        self.server.busy_changed()
        if "write" in self.gate.blockers:
            # The client is not reading what we send: answering what it pipelined would
            # only pile answers up in memory. resume_writing carries on from here; until
            # then the send timeout, not the keep-alive one, decides how long it may wait.
            self.timer.cancel()
            return
        self.timer.arm(self.settings.keepalive_timeout)
        # Answer what was pipelined behind this request before reading more; _process
        # resumes reading once h11 needs data.
        self._process()

    # --- WebSocket upgrade ------------------------------------------------------------

    def hand_over(self, protocol: WebSocketProtocol) -> bytes:
        """From here the connection is ``protocol``'s (installed with ``set_protocol``):
        this one is done (CLOSED, without closing the transport) and gets no more events.
        Returns what the client sent behind the request."""
        trailing, _ = self.conn.trailing_data
        self.phase = Phase.CLOSED
        self.server.connections.discard(self)
        self.server.connections.add(protocol)
        self.transport.set_protocol(protocol)
        return trailing

    # --- timeouts, closing ------------------------------------------------------------------

    def _on_timeout(self) -> None:
        if self.phase not in (Phase.IDLE, Phase.HEADERS, Phase.BODY):
            return
        if not self._stall_read and unread_bytes(self.transport):
            # The loop ran this timer before reading the socket (the process was stopped,
            # the loop stalled): what waits may be a whole request. Read it first, once.
            self._stall_read = self.phase is not Phase.IDLE
            self.timer.arm(self.settings.header_timeout)
        elif self.phase is Phase.IDLE:
            self.close()  # keep-alive idle: a quiet close is the norm
        else:
            self.refuse.timeout()

    def close(self) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        self.timer.cancel()
        transport = self.transport
        if transport.is_closing():
            return
        if self._eof or not transport.can_write_eof():
            transport.close()
            return
        # Lingering close: FIN after what is buffered, then read and discard until the
        # client closes too (eof_received) or the keep-alive timeout passes.
        transport.write_eof()
        self.gate.open()
        self.timer.linger(transport, self.settings.keepalive_timeout)
