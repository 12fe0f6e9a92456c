"""WebSocket frames and the per-loop write coalescing, without wsproto.

What the hub and the handlers need at import time lives here, so that wsproto (about
15 ms and a few hundred KiB of the start-up) is imported with ``websocket.py`` at the first
upgrade rather than by every gateway that never sees a WebSocket client.

Writes are coalesced: what a connection is sent in one turn of the loop goes to the
transport in one ``writelines`` (one system call) at the end of the turn, from one
callback per loop for every connection written to (``_Flusher``). Such pending frames
count as written to the transport: they are not in the send queue (whose bounds start
when the transport pauses), they go out before any later frame, ping, pong or close
frame, and past the transport's high-water mark they are flushed at once, so that
back-pressure (``pause_writing``) starts where it did without the coalescing. A sender
may also defer its work to the end of the turn (``call_before_writes``, the hub's
fan-out): it runs before anything more is written to, or compressed for, any connection,
so that each connection's order is that of the calls.
"""

from __future__ import annotations

import asyncio
import struct
import weakref
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .websocket import WebSocket

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN_LATER = 1013


def text_frame(payload: bytes) -> bytes:
    """One final, unmasked text frame holding ``payload`` (UTF-8 JSON)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 65536:
        header = struct.pack("!BBH", 0x81, 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 127, n)
    return header + payload


def frame_payload(frame: bytes) -> memoryview:
    """The payload of a ``text_frame``, without copying it."""
    n = frame[1] & 0x7F
    return memoryview(frame)[2 if n < 126 else 4 if n == 126 else 10:]


class _Flusher:
    """The connections of one loop written to in this turn, flushed by one callback, and
    the work deferred until the next write (``call_before_writes``)."""

    __slots__ = ("_dirty", "_scheduled", "deferred")

    def __init__(self) -> None:
        self._dirty: list[WebSocket] = []
        self.deferred: list[Callable[[], None]] = []
        self._scheduled = False

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            # the running loop: it is the key of this flusher, which must not hold it
            asyncio.get_running_loop().call_soon(self._flush)

    def add(self, ws: WebSocket) -> None:
        self._dirty.append(ws)
        self._schedule()

    def defer(self, fn: Callable[[], None]) -> None:
        self.deferred.append(fn)
        self._schedule()

    def run_deferred(self) -> None:
        while self.deferred:
            deferred, self.deferred = self.deferred, []
            for fn in deferred:
                fn()

    def _flush(self) -> None:
        try:
            self.run_deferred()
        finally:  # a failing sender must not leave every connection unflushed
            self._scheduled = False
            dirty, self._dirty = self._dirty, []
            for ws in dirty:
                ws._flush()


_flushers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Flusher] = weakref.WeakKeyDictionary()


def flusher_of(loop: asyncio.AbstractEventLoop) -> _Flusher:
    flusher = _flushers.get(loop)
    if flusher is None:
        flusher = _flushers[loop] = _Flusher()
    return flusher


def call_before_writes(fn: Callable[[], None]) -> None:
    """Call ``fn`` once, before anything more is written to a WebSocket of the running
    loop, and at the end of this turn at the latest: a sender can gather what it sends in
    one turn and still keep its place in each connection's order."""
    flusher_of(asyncio.get_running_loop()).defer(fn)
