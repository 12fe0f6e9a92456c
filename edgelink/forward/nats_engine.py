"""NATS JetStream engine (``nats://``, ``tls://``), on nats-py.

Each event is a core NATS publish to ``vx11.<edge_id>.events.<type>`` with header
``Nats-Msg-Id`` and a reply subject under one inbox per connection; the stream answers
there with its PubAck (or an error, or the server's 503 "no responders" when no stream
holds the subject). Publishing without awaiting each ack is what lets a window of
events be in flight; the reply subject's last token is the message's index in ``acks``.
The client's own reconnect is off: on any loss the forwarder drops this engine and
reconnects with its own backoff, resuming after the cursor.

A message the broker refuses for itself is refused in ``acks`` with its reason: larger
than the server's ``max_payload`` (checked here, headers included, before it is sent: the
server would close the connection), a stream's "message size exceeds maximum" answer
(``too_large``), or a publish permissions violation (``acl``; the server names the
subject, so the first unacked message to it is the one). Frames from the server are
bounded: the client's parse buffer past FRAME_BYTES drops the connection.

Each connection announces this process on ``vx11-presence.<edge_id>`` (core NATS, outside
the stream's ``vx11.>``) at connect and every PRESENCE_INTERVAL, and listens there: an
announcement from another process means another box forwards with the same edge_id.
"""

from __future__ import annotations

import asyncio
import re

import nats
import orjson
from nats.errors import AuthorizationError
from nats.errors import Error as NatsError
from nats.protocol.parser import AWAITING_CONTROL_LINE, AWAITING_MSG_PAYLOAD, Parser

from ..log import log
from . import Target
from .engine import FRAME_BYTES, INSTANCE, Acks, EngineError, Message, safe_type, tls_context, warn_duplicate_edge_id

SUBSCRIPTION_LIMIT = 1 << 20  # bytes of presence announcements queued (each is 32 bytes)
# nats-py's publish waits (without a bound) for its flusher once this many bytes are
# pending: a broker that stops reading would hold the forwarder there. The forwarder's
# window bounds what is pending instead, so the client's own bound is never reached.
PENDING_UNBOUNDED = 1 << 62
HEADER_BYTES = len(b"NATS/1.0\r\nNats-Msg-Id: \r\n\r\n")  # nats-py's header block, without the id
JS_TOO_LARGE = 10054  # JetStream's error code: message size exceeds maximum allowed
PERMISSIONS = "permissions violation"
PRESENCE = "vx11-presence."  # + edge_id: where boxes announce themselves
PRESENCE_INTERVAL = 30.0  # seconds between announcements on a connection
CLOSE_WAIT = 2.0  # seconds a close may take before the engine is dropped anyway
# a reply's control line, without headers or a reply subject: "MSG <subject> <sid> <bytes>";
# nats-server writes the empty reply field as a second space ("MSG <subject> <sid>  <bytes>")
_REPLY_LINE = re.compile(rb"MSG ([^ \r\n]+) (\d+) {1,2}(\d+)\r\n")


class FrameTooLarge(OSError):
    """The server sent more than FRAME_BYTES without completing a frame."""


class NatsEngine:
    name = "nats"

    def __init__(self, target: Target):
        self.target = target
        self._nc: nats.NATS | None = None
        self._inbox = b""
        self._replies_sid = 0  # the reply inbox's subscription (0: none yet)
        self._prefix = ""
        self.acks: Acks | None = None
        self._last_error: Exception | None = None
        self._subjects: dict[int, str] = {}  # unacked message index -> subject (to place a permissions error)
        self._oversize = 0  # the frame bytes that dropped the connection
        self._edge_id = ""
        self._presence: asyncio.Task[None] | None = None

    async def connect(self, edge_id: str, timeout: float) -> None:
        t = self.target
        self._prefix = f"vx11.{edge_id}.events."
        self._edge_id = edge_id
        self.acks = Acks(asyncio.get_running_loop())
        options = {"user": t.user or None, "password": t.password or None, "token": t.token or None}
        try:
            self._nc = await asyncio.wait_for(nats.connect(
                f"{'tls' if t.tls else 'nats'}://{t.host}:{t.port}", name=f"edgelink-{edge_id}",
                # one server, tried at most twice at once (nats-py's "0" means forever)
                allow_reconnect=False, max_reconnect_attempts=1, reconnect_time_wait=0, connect_timeout=timeout,
                # every subject is built from checked tokens (edge id, safe_type, the inbox):
                # nats-py's two regex checks per publish find nothing
                skip_subject_validation=True, pending_size=PENDING_UNBOUNDED,
                tls=tls_context(t), error_cb=self._on_error, disconnected_cb=self._on_disconnected,
                closed_cb=self._on_disconnected, **{k: v for k, v in options.items() if v is not None}),
                timeout)
            self._bound_frames(self._nc)
            self._inbox = self._nc.new_inbox().encode()
            # no callback: _take_replies takes this subscription's messages from the parser
            replies = await self._nc.subscribe(self._inbox.decode() + ".*")
            self._take_replies(self._nc, replies._id)
            await self._nc.subscribe(PRESENCE + edge_id, cb=self._on_presence, pending_bytes_limit=SUBSCRIPTION_LIMIT)
            await asyncio.wait_for(self._nc.flush(), timeout)
        except asyncio.TimeoutError:
            await self.close()
            raise EngineError("timeout", f"no answer from {t.safe_url} within {timeout:g} s") from None
        except (OSError, NatsError) as exc:
            await self.close()
            cause = self._last_error or exc  # nats-py reports the real cause to error_cb only
            text = str(cause) or type(cause).__name__
            kind = "auth" if "authorization" in text.lower() or isinstance(cause, AuthorizationError) else "unreachable"
            raise EngineError(kind, f"{t.safe_url}: {text}") from None
        self._presence = asyncio.get_running_loop().create_task(self._announce(self._nc))

    async def _announce(self, nc: nats.NATS) -> None:
        try:
            while nc.is_connected:
                await nc.publish(PRESENCE + self._edge_id, INSTANCE.encode())
                await asyncio.sleep(PRESENCE_INTERVAL)
        except (OSError, NatsError):
            pass  # the connection is going: the forwarder sees it through the acks

    async def _on_presence(self, msg) -> None:
        if msg.data != INSTANCE.encode():
            warn_duplicate_edge_id(self._edge_id, "nats", f"another process ({msg.data[:32].decode(errors='replace')})"
                                                          f" announced itself on {msg.subject}")

    def _bound_frames(self, nc: nats.NATS) -> None:
        """Make the client's parser drop the connection once it holds more than
        FRAME_BYTES of an unfinished frame (an endless line, a huge MSG): nats-py's read
        loop treats the OSError as the connection failing."""
        parser = nc._ps
        parse = parser.parse

        async def bounded(data: bytes = b"") -> None:
            if data and self._replies_sid:
                data = self._take_replies_at_once(parser, data)
            await parse(data)
            if len(parser.buf) > FRAME_BYTES:
                self._oversize = len(parser.buf)
                parser.buf = bytearray()  # the bytes go now, not when the connection is collected
                log.warning("forward_frame_too_large", engine="nats", url=self.target.safe_url,
                            bytes=self._oversize, bound=FRAME_BYTES)
                raise FrameTooLarge(f"a frame from the server passed {FRAME_BYTES} bytes")

        parser.parse = bounded  # type: ignore[method-assign]  # nats-py's parser, wrapped on this instance

    async def send(self, messages: list[Message]) -> None:
        nc, acks = self._nc, self.acks
        if nc is None or acks is None or not nc.is_connected:  # (acks come with the connection)
            raise EngineError("disconnected", "not connected")
        prefix, inbox, subjects = self._prefix, self._inbox, self._subjects
        limit = nc.max_payload - HEADER_BYTES
        commands = []
        for msg in messages:
            index = acks.add()
            size = len(msg.body) + len(msg.msg_id)
            if size > limit:  # the server would drop the connection for it
                acks.refuse(index, EngineError("too_large", f"seq {msg.seq}: {size + HEADER_BYTES} bytes with "
                                                            f"headers, the server's max_payload is {nc.max_payload}"))
                break  # nothing after it counts; it is sent again after the dead letter
            subject = prefix + safe_type(msg.type)
            subjects[index] = subject
            # the HPUB nats-py's publish writes, with the message's index as the reply
            # subject's last token; the subject and the id are checked ASCII tokens
            header = b"NATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n" % msg.msg_id.encode()
            commands.append(b"HPUB %s %s.%d %d %d\r\n%s%s\r\n" % (
                subject.encode(), inbox, index, len(header), len(header) + len(msg.body), header, msg.body))
        if not commands:
            return
        try:
            # one command for the burst, in the client's buffer (its flusher writes it out):
            # nats-py's publish per message built a header dict, matched a regex and
            # queued a buffer per event, a third of the engine's CPU in a catch-up
            await nc._send_command(b"".join(commands))
            if nc._flush_queue is not None and nc._flush_queue.empty():
                await nc._flush_pending()
        except (OSError, NatsError) as exc:
            raise EngineError("disconnected", str(exc) or type(exc).__name__) from None

    def _take_replies(self, nc: nats.NATS, sid: int) -> None:
        """Handle the replies (PubAcks) as the parser hands them over, instead of nats-py
        making a message object, parsing its headers and queueing it for a task that calls
        ``_on_reply``: that cost about as much CPU as the whole publish (issue 23's
        catch-up against a plain client). Other subscriptions go nats-py's way."""
        process = nc._process_msg

        async def take(msg_sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
            if msg_sid != sid:
                # nats-py annotates headers as bytes, and passes None for a message without
                await process(msg_sid, subject, reply, data, headers)  # type: ignore[arg-type]
                return
            try:
                index = int(subject[len(self._inbox) + 1:])
            except ValueError:
                return
            # a status line "NATS/1.0 503": no responders, no stream holds the subject
            self._reply(index, bytes(data), headers is not None and bytes(headers[9:12]) == b"503")

        # nats-py's message handler, replaced on this instance (see the docstring)
        nc._process_msg = take  # type: ignore[method-assign,assignment]
        self._replies_sid = sid

    def _take_replies_at_once(self, parser: Parser, data: bytes) -> bytes:
        """Take the whole replies at the head of ``data`` from its bytes: nats-py's parser
        would copy each into its buffer, match six patterns and await a handler for it.
        A reply the parser holds the start of is finished first; what follows the first
        other or unfinished frame goes to the parser. Returns the bytes left to it."""
        sid, skip = self._replies_sid, len(self._inbox) + 1
        if parser.state == AWAITING_MSG_PAYLOAD:  # a frame whose line the parser took
            arg = parser.msg_arg
            missing = parser.needed + 2 - len(parser.buf)
            if parser.header_needed or arg["sid"] != sid or arg["reply"] or missing > len(data):
                return data
            frame = bytes(parser.buf) + data[:missing]
            if not frame.endswith(b"\r\n"):
                return data
            parser.buf.clear()
            parser.state = AWAITING_CONTROL_LINE
            self._reply_to(arg["subject"][skip:], frame[:-2])
            data = data[missing:]
        elif parser.buf:  # the start of a control line: read again with what follows
            data = bytes(parser.buf) + data
            parser.buf.clear()
        match, size, pos = _REPLY_LINE.match, len(data), 0
        while (line := match(data, pos)) is not None and int(line[2]) == sid:
            start = line.end()
            end = start + int(line[3])
            if end + 2 > size or data[end:end + 2] != b"\r\n":
                break
            self._reply_to(line[1][skip:], data[start:end])
            pos = end + 2
        return data[pos:] if pos else data

    def _reply_to(self, token: bytes, data: bytes) -> None:
        try:
            index = int(token)
        except ValueError:  # not one of ours: dropped, as the parser's way does
            return
        self._reply(index, data, False)

    def _reply(self, index: int, data: bytes, no_responders: bool) -> None:
        acks = self.acks
        assert acks is not None  # replies come only on a connection connect() made
        subject = self._subjects.pop(index, None)
        if no_responders:
            acks.refuse(index, EngineError("no_stream", f"no JetStream stream holds the subject {subject}"))
            return
        if data.startswith(b'{"stream":') and b'"error"' not in data:
            acks.ack(index)  # a PubAck: {"stream":"VX11","seq":123} (maybe "duplicate":true)
            return
        try:
            answer = orjson.loads(data)
        except orjson.JSONDecodeError:
            acks.refuse(index, EngineError("rejected", f"not a PubAck: {data[:100]!r}"))
            return
        error = answer.get("error") if isinstance(answer, dict) else None
        if error is not None or not isinstance(answer, dict) or "stream" not in answer:
            description = error.get("description") if isinstance(error, dict) else answer
            code = error.get("err_code") if isinstance(error, dict) else None
            acks.refuse(index, EngineError("too_large" if code == JS_TOO_LARGE else "rejected",
                                           f"stream answered: {description}"))
        else:
            acks.ack(index)

    async def _on_error(self, exc: Exception) -> None:
        text = str(exc) or type(exc).__name__
        if PERMISSIONS in text.lower() and self.acks is not None:
            # the connection stays; the server refused one publish to the subject it names
            # (in publish order): the first unacked message to that subject
            denied = text.rsplit('"', 2)[-2] if text.count('"') >= 2 else None
            if denied is not None and denied.startswith(PRESENCE):
                return  # announcing is optional: an ACL may leave it out
            index = min((i for i, subject in self._subjects.items() if subject == denied), default=None)
            if index is not None:
                del self._subjects[index]
                self.acks.refuse(index, EngineError("acl", text))
                return
        self._last_error = exc
        self._fail(EngineError("disconnected", text))

    async def _on_disconnected(self) -> None:
        if self._oversize:
            self._fail(EngineError("frame_too_large", f"the server sent a frame of more than {FRAME_BYTES} bytes"
                                                      f" ({self._oversize} held); connection dropped"))
        self._fail(EngineError("disconnected", "connection to the broker lost"))

    def _fail(self, error: EngineError) -> None:
        self._subjects.clear()
        if self.acks is not None:
            self.acks.fail(error)

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        self._fail(EngineError("disconnected", "engine closed"))
        if self._presence is not None:
            self._presence.cancel()
            self._presence = None
        if nc is not None:
            # bytes the broker never read would make nats-py's close wait for them: they
            # are unacked, so sent again after the cursor; the socket goes at once
            writer = getattr(nc._transport, "_io_writer", None)
            if writer is not None and (writer.transport.get_write_buffer_size() > 0 or nc._pending_data_size > 0):
                writer.transport.abort()
                nc._pending, nc._pending_data_size = [], 0  # nothing left to flush; the memory goes now
            # nats-py's close can swallow a cancellation (its flush wait catches it), so
            # wait_for could wait on it for ever: wait a bounded time and leave it be
            closing = asyncio.ensure_future(nc.close())
            closing.add_done_callback(_retrieve)
            await asyncio.wait({closing}, timeout=CLOSE_WAIT)
            if not closing.done():
                closing.cancel()


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()  # the connection is gone either way


def engine(target: Target) -> NatsEngine:
    return NatsEngine(target)
