"""The small interface both broker engines implement, and what they publish.

An engine is one connection: ``connect`` (bounded by a timeout), then ``await publish``
for each event, which hands it to the socket and returns a future that settles when the
broker has stored the message (NATS PubAck, MQTT PUBACK) or fails with ``EngineError``.
Losing the connection fails every pending future. The forwarder never reuses an engine
after an error: it closes it and builds a new one, so no library keeps a queue of its own
across connections.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import orjson

if TYPE_CHECKING:
    from . import Target

_SUBJECT_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class EngineError(Exception):
    """The broker refused, or the connection failed; ``kind`` is a short stable word
    (unreachable, auth, no_stream, timeout, disconnected, rejected, tls) for status and logs."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Message:
    seq: int
    type: str
    msg_id: str  # "<edge_id>:<epoch>:<seq>"
    body: bytes


def safe_type(event_type: str) -> str:
    """The event type as a subject/topic token: characters outside [A-Za-z0-9_.-] become '_'."""
    return _SUBJECT_UNSAFE.sub("_", event_type)


def message(edge_id: str, epoch: str, row: tuple) -> Message:
    """Build the message body (API.md §9) from a ledger row, reusing its stored JSON."""
    seq, event_id, type_, source, timestamp, payload, metadata, canonical = row
    body = orjson.dumps({
        "edge_id": edge_id, "epoch": epoch, "seq": seq, "event_id": event_id, "type": type_,
        "source": source, "timestamp": timestamp, "payload": orjson.Fragment(payload),
        "metadata": None if metadata is None else orjson.Fragment(metadata), "canonical": bool(canonical),
    })
    return Message(seq, type_, f"{edge_id}:{epoch}:{seq}", body)


def tls_context(target: "Target") -> ssl.SSLContext | None:
    """The client TLS context for tls:// and mqtts:// (CA, client certificate)."""
    if not target.tls:
        return None
    context = ssl.create_default_context(cafile=target.ca or None)
    if target.cert:
        context.load_cert_chain(target.cert, target.key or None)
    return context


class Engine(Protocol):
    name: str

    async def connect(self, edge_id: str, timeout: float) -> None:
        """Open the connection; raises EngineError within ``timeout`` seconds."""

    async def publish(self, msg: Message) -> asyncio.Future[None]:
        """Send ``msg``; the returned future settles on the broker's ack. Raises
        EngineError when the connection is gone."""

    async def close(self) -> None:
        """Drop the connection; pending futures fail."""
