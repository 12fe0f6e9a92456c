"""HTTP/1.1 client for calls to modules: asyncio + h11, with a keep-alive pool per origin.

One ``UpstreamClient`` serves every module. Each call is bounded by a total timeout
(connect, send, the whole reply, and a retry if there is one) and, inside it, by the connect
timeout; a reply larger than ``upstream_max_reply`` is refused, decided from
``Content-Length`` when present and while reading otherwise. Anything that leaves no
usable reply raises ``UpstreamError`` with a ``kind``: ``connect``, ``timeout``,
``too_large``, ``closed`` (the module hung up), ``protocol`` (it spoke bad HTTP),
``local``: the gateway itself is out of file descriptors, buffers or memory (EMFILE,
ENFILE, ENOBUFS, ENOMEM creating or connecting the socket), which says nothing about
the module, or ``account``: the reply would take the caller's connection past its share of
the memory account, or the account past its total (API.md §1): a call given a ``Share``
takes from it (piece ``replies``) what the reply's buffer holds, before it holds it: the
declared ``Content-Length`` before a byte is read, or, for a chunked reply, what its
growing buffer has allocated; the caller's transport gives it back once the answer is
written, and a failed call gives it back at once.

Pool: up to ``upstream_pool_size`` idle keep-alive connections are kept per origin,
each closed after ``upstream_pool_idle`` idle seconds. Busy connections are not capped
here: a pool cap would make a quick call queue behind slow ones to the same module
(a 60 s analysis ahead of a 5 s chat fallback); the server's connection limit already
bounds how many calls can be in flight.

Stale keep-alive connections: a module may close an idle connection at any time.
A pooled connection whose peer has hung up (or sent unsolicited bytes) is found at
checkout and dropped before anything is sent. If a reused connection still ends before
the first reply byte (the module closed it while our request was on the wire), the call
is sent once more on a fresh connection; an idempotent method is also sent again if the
reused connection ends mid-reply. A fresh connection is never retried: its failure is
the module's.

Streams (``stream()``): the call returns once the status and headers are in, within the
timeout; the body is then read a chunk at a time with ``Stream.read(timeout)``. The reply
limit does not apply (the caller's idle bound and its going away end a stream). Reading
from the module is paused while a chunk waits to be taken, so a slow caller holds the
module back through TCP instead of filling our memory. The connection goes back to the
pool only after a body read to its end; a stream closed before that closes it.
"""

from __future__ import annotations

import asyncio
import errno
import select
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, cast
from urllib.parse import urlsplit

import h11

from . import compat
from .account import REPLIES
from .config import Settings

if TYPE_CHECKING:
    from .account import Share

READ_SIZE = 64 * 1024  # about the most one read of a reply brings in
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})
# connect failures that are the gateway's own shortage, not the module's fault
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class UpstreamError(Exception):
    """A call that produced no usable reply; ``kind`` says why (see the module docstring)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytearray  # filled in place while read: no list of parts joined into a second copy


class Stream:
    """A reply whose body is read as it arrives: ``status``, ``headers``, then
    ``await read(timeout)`` until it returns None; ``close()`` on every path."""

    def __init__(self, client: "UpstreamClient", origin: "_Origin", conn: _Connection, response: h11.Response):
        self.status = response.status_code
        self.headers = list(response.headers)
        self._client = client
        self._origin = origin
        self._conn = conn
        self._done = False

    async def read(self, timeout: float) -> bytes | None:
        """The next body chunk, None at the end of the body. UpstreamError ``timeout`` when
        nothing comes within ``timeout`` seconds, ``closed`` or ``protocol`` otherwise."""
        if self._done:
            return None
        try:
            async with compat.timeout(timeout):
                while True:
                    event = await self._conn.next_event()
                    kind = type(event)
                    if isinstance(event, h11.Data):
                        if event.data:
                            return bytes(event.data)
                    elif kind is h11.EndOfMessage:
                        self._done = True
                        return None
                    else:
                        raise UpstreamError("protocol", f"unexpected {kind.__name__} from module")
        except TimeoutError:
            self.close()
            raise UpstreamError("timeout", f"nothing from the module for {timeout:g} s") from None
        except h11.RemoteProtocolError as exc:
            self.close()
            if self._conn.ended:
                raise UpstreamError("closed", f"module closed the connection mid-stream ({exc})") from None
            raise UpstreamError("protocol", f"bad HTTP from module: {exc}") from None
        except UpstreamError:
            self.close()
            raise

    def close(self) -> None:
        """Give the connection back if the body was read to its end, else close it."""
        conn = self._conn
        if not conn.busy:
            return
        conn.busy = False
        self._client._settle(self._origin, conn, clean=self._done)


@dataclass(frozen=True, slots=True)
class _Origin:
    host: str
    port: int
    authority: bytes  # the Host header


class _Connection(asyncio.Protocol):
    """One TCP connection to a module: its h11 state, and a waiter woken by incoming bytes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.h11 = h11.Connection(h11.CLIENT)
        self.busy = False
        self.ended = False  # the peer hung up, or we closed the connection
        self.reply_bytes = 0  # bytes received during the current exchange
        self.reaper: asyncio.TimerHandle | None = None
        self._fd = -1
        self._waiter: asyncio.Future[None] | None = None

    @property
    def wire(self) -> asyncio.Transport:
        """The transport (create_connection gives the connection only once it is made)."""
        assert self.transport is not None
        return self.transport

    # --- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's stubs say BaseTransport; a stream connection's is a Transport (uvloop's has
        # its methods without subclassing it)
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno()
        # A reply is read a little at a time: one read brings at most what the kernel's
        # receive buffer holds, so what waits unparsed per call (and per relayed stream
        # while its caller is slow) stays near READ_SIZE (API.md §3: 64 KiB), not the
        # event loop's 256 KiB read buffer times the calls in flight.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, READ_SIZE // 2)  # the kernel doubles it

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # bytes nobody asked for: the connection cannot be trusted again
            self.close()
            return
        self.reply_bytes += len(data)
        self.h11.receive_data(data)
        # One read at a time until the reply reader has taken it: the event loop may read a
        # fast module many times per turn, and h11 would buffer a whole 8 MiB reply again.
        self.wire.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._end()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()

    # --- use -------------------------------------------------------------------------

    def alive(self) -> bool:
        """Still fit for reuse. Polls the socket because the peer's FIN may be waiting in
        the kernel while the event loop has not told us yet."""
        if self.ended:
            return False
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        return not poller.poll(0)  # an idle connection that is readable got EOF, RST or junk

    async def next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return cast("h11.Event | type[h11.PAUSED]", event)  # h11's own type still names NEED_DATA
            if not self.ended:
                self.wire.resume_reading()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def close(self) -> None:
        if self.reaper is not None:
            self.reaper.cancel()
            self.reaper = None
        self.ended = True
        if self.transport is not None:
            # abort, not close: close would wait to flush to a module that may not be reading
            self.transport.abort()

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self.h11.receive_data(b"")
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class UpstreamClient:
    """``await request(base_url, method, path, ...) -> Reply``; ``await close()`` on shutdown."""

    def __init__(self, settings: Settings):
        self._connect_timeout = settings.upstream_connect_timeout
        self._max_reply = settings.upstream_max_reply
        self._pool_size = settings.upstream_pool_size
        self._pool_idle = settings.upstream_pool_idle
        self._origins: dict[str, _Origin] = {}
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._closed = False

    async def request(self, base_url: str, method: str, path: str, *,
                      headers: Iterable[tuple[bytes, bytes]] = (), body: bytes = b"",
                      timeout: float, share: Share | None = None) -> Reply:
        """Send one request (``Host`` and ``Content-Length`` are added) and read the whole
        reply, its bytes taken from ``share`` if given."""
        reply = await self._call(base_url, method, path, headers, body, timeout, stream=False, share=share)
        assert isinstance(reply, Reply)
        return reply

    async def stream(self, base_url: str, method: str, path: str, *,
                     headers: Iterable[tuple[bytes, bytes]] = (), body: bytes = b"",
                     timeout: float) -> Stream:
        """Send one request like ``request()``; return once the reply's head is in."""
        reply = await self._call(base_url, method, path, headers, body, timeout, stream=True)
        assert isinstance(reply, Stream)
        return reply

    async def _call(self, base_url: str, method: str, path: str, headers: Iterable[tuple[bytes, bytes]],
                    body: bytes, timeout: float, stream: bool, share: Share | None = None) -> Reply | Stream:
        origin = self._origin(base_url)
        head = [(b"host", origin.authority), *headers]
        if body or method not in IDEMPOTENT:
            head.append((b"content-length", str(len(body)).encode()))
        request = h11.Request(method=method, target=path, headers=head)
        try:
            async with compat.timeout(timeout):
                return await self._send(origin, request, body, method in IDEMPOTENT, stream, share)
        except TimeoutError:
            raise UpstreamError("timeout", f"no reply within {timeout:g} s") from None

    async def close(self) -> None:
        """Close idle connections; busy ones are closed when their call ends."""
        self._closed = True
        for pool in self._idle.values():
            for conn in pool:
                conn.close()
        self._idle.clear()

    async def _send(self, origin: _Origin, request: h11.Request, body: bytes, idempotent: bool,
                    stream: bool, share: Share | None) -> Reply | Stream:
        conn = self._checkout(origin)
        if conn is None:
            return await self._exchange(origin, await self._connect(origin), request, body, stream, share)
        try:
            return await self._exchange(origin, conn, request, body, stream, share)
        except UpstreamError as exc:
            if exc.kind != "closed" or (conn.reply_bytes and not idempotent):
                raise
        return await self._exchange(origin, await self._connect(origin), request, body, stream, share)

    def _origin(self, base_url: str) -> _Origin:
        origin = self._origins.get(base_url)
        if origin is None:
            parts = urlsplit(base_url)
            port = parts.port or 80
            origin = _Origin(parts.hostname or "", port, parts.netloc.encode())
            self._origins[base_url] = origin
        return origin

    def _checkout(self, origin: _Origin) -> _Connection | None:
        pool = self._idle.get(origin)
        while pool:
            conn = pool.pop()  # the most recently used first; the oldest ones age out
            if conn.reaper is not None:
                conn.reaper.cancel()
                conn.reaper = None
            if conn.alive():
                return conn
            conn.close()
        return None

    def _checkin(self, origin: _Origin, conn: _Connection) -> None:
        pool = self._idle.setdefault(origin, [])
        if self._closed or len(pool) >= self._pool_size:
            conn.close()
            return
        conn.h11.start_next_cycle()
        conn.wire.resume_reading()  # an idle connection must see the module hang up
        conn.reaper = asyncio.get_running_loop().call_later(self._pool_idle, self._reap, pool, conn)
        pool.append(conn)

    @staticmethod
    def _reap(pool: list[_Connection], conn: _Connection) -> None:
        conn.reaper = None
        pool.remove(conn)
        conn.close()

    async def _connect(self, origin: _Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with compat.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(_Connection, origin.host, origin.port)
        except TimeoutError:
            raise UpstreamError(
                "connect", f"connect to {origin.host}:{origin.port} timed out after {self._connect_timeout:g} s"
            ) from None
        except OSError as exc:
            if exc.errno in LOCAL_ERRNOS:
                raise UpstreamError("local", f"gateway cannot open a connection to {origin.host}:{origin.port}: "
                                             f"{exc.strerror or exc}") from None
            raise UpstreamError("connect", f"cannot connect to {origin.host}:{origin.port}: "
                                           f"{exc.strerror or exc}") from None
        return conn

    async def _exchange(self, origin: _Origin, conn: _Connection, request: h11.Request, body: bytes,
                        stream: bool, share: Share | None = None) -> Reply | Stream:
        h = conn.h11
        conn.busy = True
        conn.reply_bytes = 0
        done = False
        try:
            if conn.ended:
                raise UpstreamError("closed", "connection closed before the request was sent")
            out = [h.send(request) or b""]
            if body:
                # The body passed through as it is: h11's own send, and joining the parts,
                # would each copy it (two more copies of up to a whole request body, held
                # while the module answers, and counted nowhere).
                out += h.send_with_data_passthrough(h11.Data(data=body)) or ()
            out.append(h.send(h11.EndOfMessage()) or b"")
            # No drain: the request is already in memory, and the total timeout bounds a
            # module that does not read it.
            conn.wire.writelines(out)
            if stream:
                response = await self._read_head(conn, limit=False)
                done = True
                return Stream(self, origin, conn, response)  # the Stream owns the connection now
            reply = await self._read_reply(conn, share)
            done = True
        except h11.RemoteProtocolError as exc:
            if conn.ended:
                raise UpstreamError("closed", f"module closed the connection mid-exchange ({exc})") from None
            raise UpstreamError("protocol", f"bad HTTP from module: {exc}") from None
        finally:
            if not (done and stream):
                conn.busy = False
            if not done:
                conn.close()
        self._settle(origin, conn, clean=True)
        return reply

    def _settle(self, origin: _Origin, conn: _Connection, clean: bool) -> None:
        """After an exchange: back to the pool if it ended cleanly, else closed."""
        h = conn.h11
        # bytes after the reply would be read as the next call's reply: such a module gets no reuse
        if clean and h.our_state is h11.DONE and h.their_state is h11.DONE and not h.trailing_data[0] \
                and not conn.ended:
            self._checkin(origin, conn)
        else:
            conn.close()

    async def _read_head(self, conn: _Connection, limit: bool = True) -> h11.Response:
        """The reply's status and headers (1xx skipped); with ``limit``, a declared length
        over the reply limit is refused."""
        while True:
            event = await conn.next_event()
            kind = type(event)
            if isinstance(event, h11.Response):
                for name, value in event.headers:
                    if limit and name == b"content-length" and int(value) > self._max_reply:
                        raise UpstreamError("too_large", f"reply of {int(value)} bytes exceeds "
                                                         f"{self._max_reply} bytes")
                return event
            if kind is not h11.InformationalResponse:  # 1xx (100 Continue...) carry nothing for us
                raise UpstreamError("protocol", f"unexpected {kind.__name__} from module")

    async def _read_reply(self, conn: _Connection, share: Share | None) -> Reply:
        response = await self._read_head(conn)
        declared = next((int(v) for k, v in response.headers if k == b"content-length"), None)
        held = 0  # what the share holds for this reply: the buffer's whole allocation
        try:
            if declared is not None:
                # One buffer of the declared size, taken from the account before a byte is
                # read and filled in place: a buffer grown as bytes arrive is reallocated
                # (moved) again and again, over-allocated by an eighth, and the blocks it
                # leaves behind in the heap stay resident; none of that was counted.
                held = self._hold(share, declared + 1, 0)
                body = bytearray(declared)
                filled = 0
                while True:
                    event = await conn.next_event()
                    kind = type(event)
                    if isinstance(event, h11.Data):
                        end = filled + len(event.data)  # h11 keeps a body within its Content-Length
                        body[filled:end] = event.data
                        filled = end
                    elif kind is h11.EndOfMessage:
                        if filled < declared:  # a reply that has no body whatever it declares (HEAD, 204, 304)
                            del body[filled:]
                            held = self._hold(share, filled + 1, held)
                        return Reply(response.status_code, list(response.headers), body)
                    else:
                        raise UpstreamError("protocol", f"unexpected {kind.__name__} from module")
            body = bytearray()
            while True:
                event = await conn.next_event()
                kind = type(event)
                if isinstance(event, h11.Data):
                    if len(body) + len(event.data) > self._max_reply:
                        raise UpstreamError("too_large", f"reply exceeds {self._max_reply} bytes")
                    # A chunked reply grows as it comes: the share holds what the buffer has
                    # allocated (over-allocation included), taken before it grows.
                    size = len(body) + len(event.data)
                    if size >= body.__alloc__():  # it grows, by up to an eighth more than it needs
                        held = self._hold(share, size + (size >> 3) + 8, held)
                    body += event.data
                    held = self._hold(share, body.__alloc__(), held)
                elif kind is h11.EndOfMessage:
                    return Reply(response.status_code, list(response.headers), body)
                else:
                    raise UpstreamError("protocol", f"unexpected {kind.__name__} from module")
        except BaseException:
            if share is not None:
                share.give(REPLIES, held)  # nobody will hold this reply
            raise

    @staticmethod
    def _hold(share: Share | None, size: int, held: int) -> int:
        """Make the share hold ``size`` bytes for a reply that holds ``held`` now (taking
        more, or giving back what the buffer no longer has); UpstreamError ``account`` if
        the account or the share cannot lend them."""
        if share is None:
            return size
        if size > held and not share.take(REPLIES, size - held):
            raise UpstreamError("account", "the reply would exceed the memory account "
                                           "(EDGELINK_MEMORY_BUDGET) or this caller's share of it")
        if size < held:
            share.give(REPLIES, held - size)
        return size
