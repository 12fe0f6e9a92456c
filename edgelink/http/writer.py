"""The response writer of one HTTP connection: the answer of a handler that waits first
(``answer``, run as a task), then the head, a whole body, or a stream paced by the socket.

Streamed bodies (``StreamingResponse``): the head goes out at once, then each chunk as the
handler's generator yields it, the next one asked for only once nothing waits in our buffer
(the connection stops reading while it does), so a slow client slows the producer instead
of growing our buffer. A client that goes away cancels the stream; at the end of the
shutdown grace a stream still running is ended with its last chunk and closed.

What waits in our buffer is the account's (``replies`` for answers, ``streams`` for a
stream's slices) until it is written out."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Coroutine

from ..account import REPLIES, STREAMS
from ..log import address, client_log, log, traceback_text
from .messages import Request, Response, StreamingResponse
from .wire import REASONS, DateHeader, keep_alive, raw_error

if TYPE_CHECKING:
    from .connection import HttpProtocol

_SHARE_BODY_OVER = 16 * 1024  # below this, one joined write is cheaper than two buffers
STREAM_SLICE = 64 * 1024  # the most of a stream that waits to be written (API.md §3)


class StreamRefused(Exception):
    """A stream's next slice did not fit in the account: the stream ends there."""


class ResponseWriter:
    """Writes the answers of one ``HttpProtocol``, which decides what happens next
    (``end_response``: the next request, or close)."""

    __slots__ = ("conn", "streaming", "_drain")

    def __init__(self, conn: HttpProtocol) -> None:
        self.conn = conn
        self.streaming = False  # a stream's body is being written
        self._drain: asyncio.Future[None] | None = None

    def write(self, request: Request, response: Response) -> None:
        conn = self.conn
        if conn.closed:
            return
        head = self.head(request, response, b"content-length: %d\r\n" % len(response.body))
        if head is None:
            return
        parts, keep = head
        body = response.body if request.method != "HEAD" and response.status not in (204, 304) else b""
        transport = conn.transport
        if len(body) > _SHARE_BODY_OVER:
            # Written as it is: a body shared by many answers (a cached document) is then
            # held once, not copied into each slow client's buffer.
            transport.writelines((b"".join(parts), body))
        else:
            parts.append(body)
            transport.write(b"".join(parts))
        self._hold_reply()
        conn.end_response(keep)

    async def answer(self, request: Request, pending: Coroutine[Any, Any, Response]) -> None:
        """Write the answer of a handler that waits first (``pending``), once it has it."""
        if self.conn.closed:
            # The caller left before the handler ran (a burst of requests whose callers hung
            # up at once): none of its work is done for nobody.
            pending.close()
            return
        try:
            response = await pending
        except Exception as exc:
            self.failed(request, exc)
            return
        if isinstance(response, StreamingResponse):
            await self.stream(request, response)
        else:
            self.write(request, response)

    def failed(self, request: Request, exc: Exception) -> None:
        """The dispatcher raised: it answers handler errors, so this is a bug of its own
        (logged; 500 and close)."""
        log.error("dispatch_failed", error=repr(exc), path=request.path, traceback=traceback_text(exc))
        conn = self.conn
        if not conn.closed:
            conn.transport.write(raw_error(500, "internal_error"))
            conn.close()

    def _hold_reply(self) -> None:
        """What the client has not taken yet waits in our buffer: it is the account's
        (``replies``) until written out (``written_out`` gives it back). The reply's bytes
        may already be reserved (a module's reply, read under the same piece): only what
        waits beyond that is taken now. Past this share or the account, the connection is
        dropped, counted: we do not hold it."""
        conn = self.conn
        share = conn.share
        if share is None:
            return
        buffered = conn.transport.get_write_buffer_size()
        held = share.by_piece.get(REPLIES, 0)
        if not buffered:
            if held:
                share.give(REPLIES, held)
        elif buffered > held and not share.take(REPLIES, buffered - held):
            if client_log.allow(address(conn.client)) is not None:
                log.info("connection_dropped", reason="reply over the memory account", client=address(conn.client),
                         buffered=buffered)
            conn.abort()

    def written_out(self) -> None:
        """Our buffer is empty again (the transport resumed writing): what it held is given
        back and a stream waiting for it carries on."""
        share = self.conn.share
        if share is not None:
            share.give(REPLIES, share.by_piece.get(REPLIES, 0))
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def head(self, request: Request, response: Response,
             framing: bytes) -> tuple[list[bytes | bytearray], bool] | None:
        """The status line and headers (``framing`` says how the body is delimited), and
        whether the connection stays open; None if the handler's headers were invalid (a
        500 has been sent and the connection closed)."""
        conn = self.conn
        status = response.status
        keep = keep_alive(request) and not conn.server.stopping and not conn.must_close
        parts: list[bytes | bytearray] = [b"HTTP/1.1 %d %s\r\ndate: %s\r\nserver: edgelink\r\n"
                                          % (status, REASONS.get(status, b""), DateHeader.date())]
        if response.content_type is not None:
            parts.append(b"content-type: %s\r\n" % response.content_type)
        if status not in (204, 304):
            parts.append(framing)
        for name, value in response.headers:
            if b"\n" in value or b"\r" in value or b"\n" in name or b":" in name:
                log.error("response_invalid", header=name.decode("latin-1"), path=request.path,
                          correlation_id=request.correlation_id)
                conn.transport.write(raw_error(500, "internal_error"))
                conn.close()
                return None
            if name == b"connection" and b"close" in value.lower():
                keep = False
                continue
            parts.append(b"%s: %s\r\n" % (name, value))
        parts.append(b"\r\n" if keep else b"connection: close\r\n\r\n")
        return parts, keep

    async def stream(self, request: Request, response: StreamingResponse) -> None:
        """Write a streamed body: chunked to HTTP/1.1, close-delimited to HTTP/1.0."""
        conn = self.conn
        transport = conn.transport
        chunks = response.chunks
        assert chunks is not None
        chunked = request.http_version == "1.1"
        try:
            head = None if conn.closed else \
                self.head(request, response, b"transfer-encoding: chunked\r\n" if chunked else b"")
            if head is None:
                return
            parts, keep = head
            if request.method == "HEAD" or response.status in (204, 304):
                transport.write(b"".join(parts))
                conn.end_response(keep)
                return
            transport.write(b"".join(parts))
            self.streaming = True
            # The handler has sent the body on: the stream may last long, its body need not.
            request.drop_body()
            conn.body.release()
            try:
                first, response.body = response.body, b""
                await self._send_chunk(first, chunked)
                del first
                async for chunk in chunks:
                    await self._send_chunk(chunk, chunked)
            except asyncio.CancelledError:
                # shutdown grace over (not the caller gone, nor dropped): end it, not cut it
                if not conn.closed and not transport.is_closing():
                    if chunked:
                        transport.write(b"0\r\n\r\n")
                    conn.close()
                raise
            except Exception as exc:  # the producer failed: a truncated body tells the caller
                log.warning("stream_failed", error=repr(exc), path=request.path,
                            correlation_id=request.correlation_id)
                conn.close()
                return
            finally:
                self.streaming = False
                self._drain = None
            if conn.closed:
                return
            if chunked:
                transport.write(b"0\r\n\r\n")
            conn.end_response(keep)
        finally:
            await chunks.aclose()

    async def _send_chunk(self, chunk: bytes | bytearray, chunked: bool) -> None:
        """Write a stream's chunk STREAM_SLICE bytes at a time, each taken from the account
        (piece ``streams``) while it waits and given back once written out: what waits for
        a slow caller is one slice. Past its share or the account, the stream is ended
        (truncated: the caller sees it failed) rather than held."""
        share = self.conn.share
        transport = self.conn.transport
        view = memoryview(chunk)
        for start in range(0, len(chunk), STREAM_SLICE):
            piece = view[start:start + STREAM_SLICE]
            if share is None or not share.take(STREAMS, len(piece)):
                raise StreamRefused("the stream's waiting bytes would exceed the memory account or its share")
            try:
                if chunked:
                    transport.writelines((b"%x\r\n" % len(piece), piece, b"\r\n"))
                else:
                    transport.write(piece)
                await self._drained()
            finally:
                share.give(STREAMS, len(piece))

    async def _drained(self) -> None:
        """Return once nothing waits in our buffer (writing is not paused): the next chunk
        is not asked for before."""
        if "write" in self.conn.gate.blockers:
            self._drain = self.conn.loop.create_future()
            await self._drain
