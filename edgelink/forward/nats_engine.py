"""NATS JetStream engine (``nats://``, ``tls://``), on nats-py.

Each event is a core NATS publish to ``vx11.<edge_id>.events.<type>`` with header
``Nats-Msg-Id`` and a reply subject under one inbox per connection; the stream answers
there with its PubAck (or an error, or the server's 503 "no responders" when no stream
holds the subject). Publishing without awaiting each ack is what lets a window of
events be in flight; the reply subject's last token is the message's index in ``acks``.
The client's own reconnect is off: on any loss the forwarder drops this engine and
reconnects with its own backoff, resuming after the cursor.
"""

from __future__ import annotations

import asyncio

import nats
import orjson
from nats.errors import AuthorizationError, Error as NatsError

from . import Target
from .engine import Acks, EngineError, Message, safe_type, tls_context

SUBSCRIPTION_LIMIT = 1 << 20  # bytes of acks the inbox may hold; acks are ~50 bytes each


class NatsEngine:
    name = "nats"

    def __init__(self, target: Target):
        self.target = target
        self._nc: nats.NATS | None = None
        self._inbox = ""
        self._prefix = ""
        self.acks: Acks | None = None
        self._last_error: Exception | None = None

    async def connect(self, edge_id: str, timeout: float) -> None:
        t = self.target
        self._prefix = f"vx11.{edge_id}.events."
        self.acks = Acks(asyncio.get_running_loop())
        options = {"user": t.user or None, "password": t.password or None, "token": t.token or None}
        try:
            self._nc = await asyncio.wait_for(nats.connect(
                f"{'tls' if t.tls else 'nats'}://{t.host}:{t.port}", name=f"edgelink-{edge_id}",
                # one server, tried at most twice at once (nats-py's "0" means forever)
                allow_reconnect=False, max_reconnect_attempts=1, reconnect_time_wait=0, connect_timeout=timeout,
                # every subject is built from checked tokens (edge id, safe_type, the inbox):
                # nats-py's two regex checks per publish find nothing
                skip_subject_validation=True,
                tls=tls_context(t), error_cb=self._on_error, disconnected_cb=self._on_disconnected,
                closed_cb=self._on_disconnected, **{k: v for k, v in options.items() if v is not None}),
                timeout)
            self._inbox = self._nc.new_inbox()
            await self._nc.subscribe(self._inbox + ".*", cb=self._on_reply, pending_msgs_limit=-1,
                                     pending_bytes_limit=SUBSCRIPTION_LIMIT)
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

    async def send(self, messages: list[Message]) -> None:
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise EngineError("disconnected", "not connected")
        acks, prefix, inbox = self.acks, self._prefix, self._inbox
        try:
            for msg in messages:
                # appends to the client's buffer (its flusher writes it out); waits only
                # when that buffer is full. The reply subject carries the message's index.
                await nc.publish(prefix + safe_type(msg.type), msg.body, reply=f"{inbox}.{acks.add()}",
                                 headers={"Nats-Msg-Id": msg.msg_id})
        except (OSError, NatsError) as exc:
            raise EngineError("disconnected", str(exc) or type(exc).__name__) from None

    async def _on_reply(self, reply) -> None:
        try:
            index = int(reply.subject[len(self._inbox) + 1:])
        except ValueError:
            return
        acks = self.acks
        status = (reply.headers or {}).get("Status")
        if status == "503":
            acks.refuse(index, EngineError("no_stream", "no JetStream stream holds the subject"))
            return
        try:
            answer = orjson.loads(reply.data)
        except orjson.JSONDecodeError:
            acks.refuse(index, EngineError("rejected", f"not a PubAck: {reply.data[:100]!r}"))
            return
        error = answer.get("error") if isinstance(answer, dict) else None
        if error is not None or not isinstance(answer, dict) or "stream" not in answer:
            description = error.get("description") if isinstance(error, dict) else answer
            acks.refuse(index, EngineError("rejected", f"stream answered: {description}"))
        else:
            acks.ack(index)

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = exc
        self._fail(EngineError("disconnected", str(exc) or type(exc).__name__))

    async def _on_disconnected(self) -> None:
        self._fail(EngineError("disconnected", "connection to the broker lost"))

    def _fail(self, error: EngineError) -> None:
        if self.acks is not None:
            self.acks.fail(error)

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        self._fail(EngineError("disconnected", "engine closed"))
        if nc is not None:
            try:
                await asyncio.wait_for(nc.close(), 2)
            except (asyncio.TimeoutError, NatsError, OSError):
                pass  # the connection is gone either way


def engine(target: Target) -> NatsEngine:
    return NatsEngine(target)
