"""A WebSocket connection after the HTTP upgrade, as handlers see it.

wsproto parses what the client sends; what we send is a complete text frame. Without
compression a server frame is unmasked, so a broadcast frame is built once
(``text_frame``) and the same bytes are written to every client.

Each connection has a send queue bounded in frames and in bytes: writes go to the
transport while it drains, queue up while it is paused, and a client whose queue
overflows is closed with 1013 so that it never slows the others (API.md §6). A sender
that can wait (a replay) awaits ``writable()`` instead, and never queues at all.

Writes are coalesced per loop turn (``frames.py``, which holds what needs no wsproto).
"""

from __future__ import annotations

import asyncio
import os
import zlib
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from wsproto.connection import Connection
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from ..account import INBOUND
from .frames import (
    CLOSE_INTERNAL_ERROR,
    CLOSE_NORMAL,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN_LATER,
    flusher_of,
    frame_payload,
    text_frame,
)

if TYPE_CHECKING:
    from ..account import Share
    from .messages import Request

# Messages buffered from a client before we stop reading its socket until the handler
# catches up: a fast sender cannot make us buffer without bound.
_INBOUND_HIGH = 32
_CLOSE_WAIT = 5.0  # seconds to wait for the client's close frame before dropping the socket
# The transport's own buffer before it pauses: what waits beyond it is in the send queue,
# counted against the client's byte bound, so this one is kept small.
_TRANSPORT_HIGH = 64 * 1024


class WebSocket:
    """One accepted WebSocket. Created by ``WebSocketProtocol`` (upgrade.py), used by one handler task."""

    def __init__(self, transport: asyncio.Transport, conn: Connection, request: "Request",
                 *, max_message: int, queue_limit: int, queue_bytes: int, ping_interval: float,
                 compressed: bool, set_reading: Callable[[bool], None], share: Share | None = None):
        self.request = request
        self.close_code: int | None = None
        # The connection's part of the memory account (API.md §1): what it sends us is
        # taken from it as it arrives (inflated) and given back once the handler has it.
        self.share = share
        self._inbound_held = 0
        self._transport = transport
        # also the most this turn's frames may hold before they are handed over
        self._high = min(transport.get_write_buffer_limits()[1], _TRANSPORT_HIGH)
        transport.set_write_buffer_limits(high=self._high)
        self._conn = conn
        self._max_message = max_message
        self._queue_limit = queue_limit
        self._queue_bytes = queue_bytes
        self._ping_interval = ping_interval
        self._compressed = compressed
        self._set_reading = set_reading
        self._loop = asyncio.get_running_loop()
        self._flusher = flusher_of(self._loop)
        # written this turn, not yet handed to the transport; empty while paused or queuing
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._out: deque[bytes] = deque()
        self.queued_bytes = 0  # bytes in _out
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None  # a writable() waiter
        self._in: deque[tuple[str | bytes, int]] = deque()  # a message and its bytes
        self._waiter: asyncio.Future[None] | None = None
        self._parts: list[Any] = []
        self._size = 0
        self._closing = False  # we sent a close frame
        self._done = False  # the socket is gone
        self._pong_due = False
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(ping_interval, self._tick)

    # --- what handlers use -----------------------------------------------------------

    def send(self, payload: bytes) -> bool:
        """Queue one text message (``payload`` is UTF-8). Returns False if the client is
        closed or has just been closed for not keeping up."""
        self._catch_up()
        if self._compressed:
            return self._queue(self._conn.send(Message(data=payload.decode())))
        return self._queue(text_frame(payload))

    def send_frame(self, frame: bytes) -> bool:
        """``send`` for a prebuilt ``text_frame``, shared among clients (not copied)."""
        self._catch_up()
        if self._compressed:
            return self._queue(self._conn.send(Message(data=str(frame_payload(frame), "utf-8"))))
        return self._queue(frame)

    def send_frames(self, frames: list[bytes], joined: bytes) -> bool:
        """``send_frame`` for each of ``frames`` in turn; ``joined`` is them end to end
        (shared among clients), written as one piece when they all go to the transport."""
        if (self._compressed or self._write_paused or self._out or self._closing or self._done
                or self._flusher.deferred or self._pending_bytes + len(joined) > self._high):
            return all(self.send_frame(frame) for frame in frames)
        self._add_pending(joined)
        return True

    async def writable(self) -> bool:
        """Wait until a send would go straight to the socket; False once the client is closed."""
        while self._write_paused or self._out:
            if self._closing or self._done:
                return False
            self._drained = self._loop.create_future()
            try:
                await self._drained
            finally:
                self._drained = None
        return not (self._closing or self._done)

    def _queue(self, data: bytes) -> bool:
        if self._closing or self._done:
            return False
        if not self._write_paused and not self._out:
            self._add_pending(data)
            if self._pending_bytes > self._high:
                self._flush()  # the transport decides now whether to pause
            return True
        if len(self._out) >= self._queue_limit or self.queued_bytes + len(data) > self._queue_bytes:
            self._clear_out()
            self.close(CLOSE_TRY_AGAIN_LATER, "slow consumer")
            return False
        self._out.append(data)
        self.queued_bytes += len(data)
        return True

    def waiting_bytes(self) -> int:
        """Bytes waiting to reach this client: our send queue, this turn's frames and the
        transport's buffer."""
        buffered = self._transport.get_write_buffer_size() if not self._done else 0
        return buffered + self._pending_bytes + self.queued_bytes

    async def receive(self) -> str | bytes | None:
        """The next message from the client (str for text, bytes for binary), or None
        once the connection is closed."""
        while not self._in:
            if self._done or self._closing:
                return None
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        message, size = self._in.popleft()
        self._give_inbound(size)
        if len(self._in) == _INBOUND_HIGH // 2:
            self._set_reading(True)
        return message

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Start the close handshake; the socket is dropped when the client answers or
        after a short wait."""
        self._catch_up()
        if self._closing or self._done:
            return
        self._closing = True
        self.close_code = code
        try:
            data = self._conn.send(CloseConnection(code=code, reason=reason))
        except LocalProtocolError:  # the client closed first; its close is being answered
            data = b""
        # A close frame must not wait behind a queue we are abandoning (this turn's frames
        # are not queued: they count as written already and go first).
        self._clear_out()
        self._write(data)
        self._cancel_timer()
        self._timer = self._loop.call_later(_CLOSE_WAIT, self._transport.abort)
        self._wake()

    # --- what WebSocketProtocol calls -------------------------------------------------

    def feed(self, data: bytes | None) -> None:
        """Bytes from the socket (None at EOF)."""
        try:
            self._conn.receive_data(data)
            for event in self._conn.events():
                self._on_event(event)
        except (RemoteProtocolError, LocalProtocolError):
            self._drop()

    def resume_writing(self) -> None:
        self._write_paused = False
        while self._out and not self._write_paused:
            # what the transport takes before it pauses again, in one writelines
            room = self._high - self._transport.get_write_buffer_size()
            batch = [self._out.popleft()]
            size = len(batch[0])
            while self._out and size < room:
                batch.append(self._out.popleft())
                size += len(batch[-1])
            self.queued_bytes -= size
            self._transport.writelines(batch)
        if not self._out and not self._write_paused:
            self._wake_drained()

    def pause_writing(self) -> None:
        self._write_paused = True

    def connection_lost(self) -> None:
        if self._done:
            return
        self._done = True
        if self.close_code is None:
            self.close_code = 1006  # abnormal closure: no close frame seen
        self._clear_out()
        self._pending.clear()
        self._pending_bytes = 0
        self._in.clear()
        self._parts.clear()
        self._give_inbound(self._inbound_held)
        self._cancel_timer()
        self._wake()

    # --- internals --------------------------------------------------------------------

    def _take_inbound(self, n: int) -> bool:
        if self.share is not None:
            if not self.share.take(INBOUND, n):
                return False
            self._inbound_held += n
        return True

    def _give_inbound(self, n: int) -> None:
        if self.share is not None and n > 0:
            self.share.give(INBOUND, n)
            self._inbound_held -= n

    def _on_event(self, event: Any) -> None:
        if isinstance(event, (TextMessage, BytesMessage)):
            data = event.data
            # bytes, not characters: 64 Ki emoji are 256 KiB
            size = len(data) if isinstance(data, (bytes, bytearray)) or data.isascii() else len(data.encode())
            self._size += size
            if self._size > self._max_message or not self._take_inbound(size):
                self._give_inbound(self._size - size)  # the parts dropped
                too_big = self._size > self._max_message
                self._parts.clear()
                self._size = 0
                self.close(*((CLOSE_TOO_BIG, "message too big") if too_big else
                             (CLOSE_TRY_AGAIN_LATER, "gateway overloaded")))
                return
            self._parts.append(event.data)
            if event.message_finished:
                message: str | bytes = ("" if isinstance(event, TextMessage) else b"").join(self._parts)
                self._parts.clear()
                size, self._size = self._size, 0
                if self._closing:
                    self._give_inbound(size)
                else:
                    self._in.append((message, size))
                    if len(self._in) >= _INBOUND_HIGH:
                        self._set_reading(False)
                    self._wake()
        elif isinstance(event, Ping):
            self._catch_up()
            self._write(self._conn.send(event.response()))
        elif isinstance(event, Pong):
            self._pong_due = False
        elif isinstance(event, CloseConnection):
            self._catch_up()
            if not self._closing:
                self.close_code = event.code
                self._closing = True
                try:
                    self._write(self._conn.send(event.response()))
                except LocalProtocolError:
                    pass
            self._transport.close()

    def _tick(self) -> None:
        self._catch_up()
        if self._closing or self._done:
            return
        if self._pong_due:
            self.close(CLOSE_INTERNAL_ERROR, "keepalive ping timeout")
            return
        self._pong_due = True
        self._write(self._conn.send(Ping(os.urandom(4))))
        self._timer = self._loop.call_later(self._ping_interval, self._tick)

    def _catch_up(self) -> None:
        """Run the deferred sends (``call_before_writes``) before this connection sends or
        compresses anything: their frames come first, as they were sent first."""
        if self._flusher.deferred:
            self._flusher.run_deferred()

    def _add_pending(self, data: bytes) -> None:
        if not self._pending:
            self._flusher.add(self)
        self._pending.append(data)
        self._pending_bytes += len(data)

    def _write(self, data: bytes) -> None:
        """Write ``data`` now, after this turn's frames (a control frame: ping, pong, close)."""
        self._pending.append(data)
        self._flush()

    def _flush(self) -> None:
        """Hand this turn's frames to the transport, in one call."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        self._pending_bytes = 0
        if self._done:
            return
        if len(pending) == 1:
            self._transport.write(pending[0])
        else:
            self._transport.writelines(pending)

    def _drop(self) -> None:
        self._transport.abort()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self._wake_drained()

    def _wake_drained(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _clear_out(self) -> None:
        self._out.clear()
        self.queued_bytes = 0

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class BoundedDeflate(PerMessageDeflate):
    """permessage-deflate whose inflation stops at ``limit`` bytes per message, while it
    inflates (API.md §6): wsproto's own inflates each read whole, so 200 KB of zeros
    became 200 MiB before anyone could look at its size. Past the limit the connection is
    closed with 1009 and the rest of the input is never inflated."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self._limit = limit
        self._inflated = 0  # bytes of the current message so far

    def _inflate(self, data: bytes) -> bytes | CloseReason:
        assert self._decompressor is not None
        room = self._limit - self._inflated
        try:
            out = self._decompressor.decompress(data, room + 1)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._inflated += len(out)
        if self._inflated > self._limit or self._decompressor.unconsumed_tail:
            self._decompressor = None  # its window and state go now, not with the connection
            return CloseReason.MESSAGE_TOO_BIG
        return out

    def frame_inbound_payload_data(self, proto: Any, data: bytes) -> bytes | CloseReason:
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        return self._inflate(bytes(data))

    def frame_inbound_complete(self, proto: Any, fin: bool) -> bytes | CloseReason | None:
        if not (fin and self._inbound_is_compressible and self._inbound_compressed):
            return super().frame_inbound_complete(proto, fin)  # nothing inflated here
        tail = self._inflate(b"\x00\x00\xff\xff")  # the end of the message's deflate block
        if isinstance(tail, CloseReason):
            return tail
        self._inflated = 0
        if self.client_no_context_takeover:
            self._decompressor = None
        self._inbound_compressed = None
        return tail
