"""The one timer an HTTP connection runs at a time: the deadline of its phase (the header,
the body, the keep-alive idle time), or once it closes, the lingering close's.

The loop is the connection's (injectable: tests advance a steerable one)."""

from __future__ import annotations

import asyncio
from typing import Any, Callable


class Timer:
    """``arm(delay)`` calls ``expired`` after ``delay`` seconds unless re-armed or
    cancelled first; ``linger`` turns it into the lingering close's timer."""

    __slots__ = ("loop", "expired", "handle")

    def __init__(self, loop: Any, expired: Callable[[], None]) -> None:
        self.loop = loop
        self.expired = expired
        self.handle: asyncio.TimerHandle | None = None

    def arm(self, delay: float) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.handle = self.loop.call_later(delay, self._fire)

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def _fire(self) -> None:
        self.handle = None
        self.expired()

    def linger(self, transport: asyncio.WriteTransport, timeout: float) -> None:
        """With FIN written after what is buffered and what the client still sends read
        and discarded: close the transport once ``timeout`` passes (the client closing too
        ends it sooner), not while the answer is still going out (the send timer, running
        while anything waits, drops a client that stops reading; one that reads slowly gets
        all of it)."""

        def expired() -> None:
            if transport.get_write_buffer_size():
                self.handle = self.loop.call_later(timeout, expired)
            else:
                transport.close()

        self.cancel()
        self.handle = self.loop.call_later(timeout, expired)
