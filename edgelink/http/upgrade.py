"""The WebSocket upgrade (``upgrade``): the handshake, checked once, the dispatcher asked for
a handler, and the protocol the connection is handed to (``transport.set_protocol``) once
the 101 is written.

After the handover the HTTP protocol is out of the picture: what the client sends goes to
``WebSocketProtocol`` and from it to the ``WebSocket`` (websocket.py); the connection's
share of the account, its read gate and its send timeout come along. Our buffer may fill
up to the write-buffer setting before frames queue in the WebSocket. wsproto is imported
at the first upgrade, not by every gateway (frames.py holds what needs no wsproto)."""

from __future__ import annotations

import asyncio
import base64
from typing import TYPE_CHECKING, Awaitable, Callable, NamedTuple

from ..account import REPLIES
from ..log import address, client_log, log, traceback_text
from .frames import CLOSE_GOING_AWAY, CLOSE_TRY_AGAIN_LATER
from .messages import HTTPError, Request, Response
from .wire import raw_error

if TYPE_CHECKING:
    from wsproto.connection import Connection

    from ..account import Share
    from .connection import HttpProtocol
    from .server import HttpServer
    from .websocket import WebSocket
    from .wire import ReadGate, SendWatch

WsHandler = Callable[["WebSocket"], Awaitable[None]]


class Accepted(NamedTuple):
    response: bytes  # the 101
    conn: Connection  # wsproto's, open
    compressed: bool  # permessage-deflate agreed


class WebSocketHandshake:
    """An upgrade request, checked against RFC 6455 once, here (``problem``); ``accept``
    then writes the 101 and opens wsproto's frame-level connection (as hypercorn does),
    without wsproto's handshake checking the same headers again."""

    __slots__ = ("request", "problem")

    def __init__(self, request: Request) -> None:
        self.request = request
        self.problem = self._check(request)

    @staticmethod
    def _check(request: Request) -> tuple[int, str, str] | None:
        """Why the request is not a valid handshake (status, code, detail), or None."""
        headers = request.headers
        if request.method != "GET":
            return 400, "bad_request", "a WebSocket handshake must be a GET"
        if "host" not in headers:  # HTTP/1.1 requires it (h11 checks); an HTTP/1.0 request may lack it
            return 400, "bad_request", "a WebSocket handshake must have a Host header"
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

    def refusal(self) -> Response:
        """The answer to a request with a ``problem``; it closes the connection."""
        assert self.problem is not None
        status, code, detail = self.problem
        extra = [(b"sec-websocket-version", b"13")] if status == 426 else []
        return HTTPError(status, code, extra + [(b"connection", b"close")], detail=detail).response()

    def accept(self, compression: bool, max_frame: int) -> Accepted:
        """The 101 (extensions agreed with wsproto's negotiation) and the wsproto connection
        that speaks the frames from then on. Raises for an extension offer it cannot parse."""
        from wsproto import ConnectionType
        from wsproto.connection import Connection
        from wsproto.extensions import Extension
        from wsproto.handshake import server_extensions_handshake
        from wsproto.utilities import generate_accept_token, split_comma_header

        from .websocket import BoundedDeflate

        headers = self.request.headers
        extensions: list[Extension] = [BoundedDeflate(max_frame)] if compression else []
        offers = split_comma_header(headers.get("sec-websocket-extensions", "").encode("latin-1"))
        agreed = server_extensions_handshake(offers, extensions) if extensions and offers else None
        key = headers["sec-websocket-key"].encode("latin-1")
        head = [b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                b"sec-websocket-accept: %s\r\n" % generate_accept_token(key)]
        if agreed is not None:
            head.append(b"sec-websocket-extensions: %s\r\n" % agreed)
        head.append(b"x-correlation-id: %s\r\n\r\n" % self.request.correlation_id.encode())
        return Accepted(b"".join(head), Connection(ConnectionType.SERVER, extensions), agreed is not None)


def upgrade(conn: HttpProtocol, request: Request) -> None:
    """Answer an upgrade request on ``conn``: refused (the answer closes the connection),
    or accepted, the connection handed over to a ``WebSocketProtocol`` that writes the 101
    and runs the handler."""
    handshake = WebSocketHandshake(request)
    if handshake.problem is not None:
        conn.writer.write(request, handshake.refusal())
        conn.close()
        return
    outcome = conn.server.dispatcher.websocket(request)
    if isinstance(outcome, Response):
        outcome.headers.append((b"connection", b"close"))
        conn.writer.write(request, outcome)
        conn.close()
        return
    try:
        accepted = handshake.accept(conn.settings.ws_compression, conn.settings.ws_max_frame)
    except Exception as exc:  # an extension offer wsproto cannot parse
        if client_log.allow(address(conn.client)) is not None:
            log.info("websocket_handshake_refused", error=type(exc).__name__, client=address(conn.client))
        conn.transport.write(raw_error(400, "bad_request", detail="invalid WebSocket handshake"))
        conn.close()
        return
    protocol = WebSocketProtocol(conn.server, conn.transport, conn.gate, conn.watch, conn.share, conn.client)
    protocol.start(handshake, accepted, outcome, conn.hand_over(protocol))


class WebSocketProtocol(asyncio.Protocol):
    """The connection after the upgrade: installed with ``transport.set_protocol`` by the
    HTTP protocol, which hands over its transport, read gate, send watch and share."""

    __slots__ = ("server", "transport", "gate", "watch", "share", "client", "ws", "_task", "_lost")

    def __init__(self, server: HttpServer, transport: asyncio.Transport, gate: ReadGate, watch: SendWatch,
                 share: Share | None, client: tuple[str, int] | None) -> None:
        self.server = server
        self.transport = transport
        self.gate = gate
        self.watch = watch
        watch.drop = self.abort
        self.share = share
        self.client = client
        self.ws: WebSocket | None = None
        self._task: asyncio.Task[None] | None = None
        self._lost = False

    def start(self, handshake: WebSocketHandshake, accepted: Accepted, handler: WsHandler, trailing: bytes) -> None:
        """Write the 101 and run ``handler``; ``trailing``: what the client sent behind the
        handshake (its first frames)."""
        from .websocket import WebSocket

        settings = self.server.settings
        self.transport.set_write_buffer_limits(high=settings.write_buffer_high)  # the WS queue takes over
        self.transport.write(accepted.response)
        self.gate.unblock("pipeline")
        ws = self.ws = WebSocket(
            self.transport, accepted.conn, handshake.request,
            max_message=settings.ws_max_frame, queue_limit=settings.ws_queue,
            queue_bytes=settings.ws_queue_bytes,
            ping_interval=settings.ws_ping_interval, compressed=accepted.compressed,
            set_reading=self._ws_reading, share=self.share,
        )
        self.server.busy_changed()
        if self.server.overloaded:
            if self.server.overload is not None:
                self.server.overload.count("refuse_new_work")
            ws.close(CLOSE_TRY_AGAIN_LATER, "gateway overloaded")
            return
        if trailing:
            ws.feed(trailing)
        self._task = self.server.loop.create_task(self._run(handler, ws))

    async def _run(self, handler: WsHandler, ws: WebSocket) -> None:
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
            self.gate.unblock("ws-inbound")
        else:
            self.gate.block("ws-inbound")

    # --- asyncio.Protocol ------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        assert self.ws is not None
        self.ws.feed(data)

    def eof_received(self) -> bool:
        assert self.ws is not None
        self.ws.feed(None)
        return False

    def pause_writing(self) -> None:
        self.gate.block("write")
        if self.ws is not None:
            self.ws.pause_writing()
        self.watch.start()

    def resume_writing(self) -> None:
        self.watch.stop()
        self.gate.unblock("write")
        if self.share is not None:
            self.share.give(REPLIES, self.share.by_piece.get(REPLIES, 0))  # what the 101 left
        if self.ws is not None:
            self.ws.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.watch.stop()
        self.server.connections.discard(self)
        if self.share is not None:
            self.share.close()
        if self.ws is not None:
            self.ws.connection_lost()
            self.ws.request.hang_up()
        self.server.busy_changed()

    # --- what the server and the overload manager look at --------------------------

    @property
    def busy(self) -> bool:
        """Once shutdown began, a WebSocket is busy until its close handshake is over."""
        return self.server.stopping

    def held_bytes(self) -> int:
        held = self.share.held if self.share is not None else 0
        if not self._lost:
            held += self.transport.get_write_buffer_size()
        if self.ws is not None:
            held += self.ws.waiting_bytes()
        return held

    def overload_reading(self, on: bool) -> bool:
        if on:
            self.gate.unblock("overload")
            return True
        if self._lost:
            return False
        self.gate.block("overload")
        return True

    def begin_shutdown(self) -> None:
        if self.ws is not None:
            self.ws.close(CLOSE_GOING_AWAY, "server shutting down")

    def finish(self) -> None:
        self.abort()

    def abort(self) -> None:
        self.transport.abort()
        if self._task is not None and not self._task.done():
            self._task.cancel()

