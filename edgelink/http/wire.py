"""Wire helpers of the HTTP transport: the Date header, the answers the server gives itself
(``raw_error``), request-target and keep-alive rules, and the two pieces of flow control
both connection protocols share (``ReadGate``, ``SendWatch``)."""

from __future__ import annotations

import asyncio
import fcntl
import sys
import termios
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Callable

from ..log import address, client_log, log
from .messages import HTTPError

if TYPE_CHECKING:
    from .messages import Request
    from .server import Dispatcher

REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
RETRY_AFTER = b"retry-after: 1\r\n"

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(seconds: int) -> bytes:
    """RFC 9110 IMF-fixdate (``Sun, 06 Nov 1994 08:49:37 GMT``): English names whatever the
    locale, and without email.utils, whose import alone was ~4 ms of the start-up."""
    t = time.gmtime(seconds)
    return b"%s, %02d %s %04d %02d:%02d:%02d GMT" % (
        _DAYS[t.tm_wday].encode(), t.tm_mday, _MONTHS[t.tm_mon - 1].encode(), t.tm_year, t.tm_hour, t.tm_min,
        t.tm_sec)


class DateHeader:
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
        b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Error")),
        b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body), headers,
        b"connection: close\r\ndate: ", DateHeader.date(), b"\r\n\r\n", body,
    ))


def unread_bytes(transport: asyncio.BaseTransport) -> int:
    """Bytes the kernel holds for this socket that the loop has not read yet."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        return int.from_bytes(fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(4)), sys.byteorder)
    except OSError:
        return 0


def origin_form(target: str) -> str:
    """``http://host/path?q`` as ``/path?q`` (RFC 9112 §3.2.2: servers accept the absolute form)."""
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return target
    slash = rest.find("/")
    query = rest.find("?")
    if slash == -1 or (query != -1 and query < slash):
        return "/" + rest[query:] if query != -1 else "/"
    return rest[slash:]


def bad_request_detail(message: str) -> str:
    """A fixed description of what h11 refused, without the bytes it quotes."""
    for part, detail in (("request line", "malformed request line"), ("header", "malformed header line"),
                         ("Content-Length", "bad Content-Length"), ("chunk", "malformed chunked body"),
                         ("Transfer-Encoding", "unsupported Transfer-Encoding")):
        if part.lower() in message.lower():
            return detail
    return "malformed HTTP request"


def keep_alive(request: Request) -> bool:
    """HTTP/1.1 keeps the connection unless the client says close; HTTP/1.0 closes."""
    if request.http_version != "1.1":
        return False
    return "close" not in request.headers.get("connection", "").lower()


class ReadGate:
    """Whether the transport is read: reading stops while any reason holds it (``pipeline``,
    ``write``, ``overload``, ``ws-inbound``) and resumes once none does. Handed over with
    the connection at a WebSocket upgrade."""

    __slots__ = ("transport", "reading", "blockers")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.reading = True
        self.blockers: set[str] = set()

    def block(self, reason: str) -> None:
        self.blockers.add(reason)
        if self.reading and not self.transport.is_closing():
            self.reading = False
            self.transport.pause_reading()

    def unblock(self, reason: str) -> None:
        self.blockers.discard(reason)
        if not self.reading and not self.blockers and not self.transport.is_closing():
            self.reading = True
            self.transport.resume_reading()

    def open(self) -> None:
        """Read whatever holds it (a lingering close reads to the client's end)."""
        self.blockers.clear()
        if not self.reading:
            self.reading = True
            self.transport.resume_reading()


class SendWatch:
    """Drops a client that reads nothing of what waits for it for ``timeout`` seconds (the
    send timeout), started when the transport pauses writing and stopped when it resumes.
    A client that reads slowly is not stuck: while the buffer shrinks it gets more time."""

    __slots__ = ("loop", "timeout", "transport", "client", "dispatcher", "drop", "_timer", "_mark")

    def __init__(self, loop: Any, timeout: float, transport: asyncio.Transport, client: tuple[str, int] | None,
                 dispatcher: Dispatcher, drop: Callable[[], None]) -> None:
        self.loop = loop
        self.timeout = timeout
        self.transport = transport
        self.client = client
        self.dispatcher = dispatcher  # counts the refusal
        self.drop = drop  # the owner's abort; rebound when the connection is handed over
        self._timer: asyncio.TimerHandle | None = None
        self._mark = 0  # write buffer size when the timer was armed (progress check)

    def start(self) -> None:
        if self._timer is None:
            self._arm(self.transport.get_write_buffer_size())

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, buffered: int) -> None:
        self._mark = buffered
        self._timer = self.loop.call_later(self.timeout, self._expired)

    def _expired(self) -> None:
        self._timer = None
        buffered = self.transport.get_write_buffer_size()
        if 0 < buffered < self._mark:
            # The client is reading, only slowly (a large answer): a slow reader is not a
            # stuck one, whatever the framing. It gets another send timeout from here.
            self._arm(buffered)
            return
        self.dispatcher.refused("write_buffer")
        if client_log.allow(address(self.client)) is not None:
            log.info("connection_dropped", reason="client not reading", client=address(self.client),
                     buffered=buffered)
        self.drop()
