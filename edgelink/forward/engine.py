"""The small interface both broker engines implement, and what they publish.

An engine is one connection: ``connect`` (bounded by a timeout), then ``send`` for each
burst of events, which hands them to the socket (one await per burst). The engine counts
the broker's acks (NATS PubAck, MQTT PUBACK) in publish order in its ``acks`` (an
``Acks``): no future per message, the forwarder asks for one future per burst of acks it
waits for. A refused message or a lost connection is an error the forwarder raises once
every ack before it is counted. The forwarder never reuses an engine after an error: it
closes it and builds a new one, so no library keeps a queue of its own across connections.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import re
import ssl
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import orjson

from ..log import log

if TYPE_CHECKING:
    from . import Target

_SUBJECT_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
TYPE_TOKEN_MAX = 128  # characters of a subject/topic's type part; longer types end in a hash
FRAME_BYTES = 1 << 20  # bound on one frame from the broker (acks and control lines are small)
# refusals of one message for itself: it becomes a dead letter (at once for too_large, after
# DEAD_LETTER_AFTER refusals of the same message for the others)
DEAD_LETTER_KINDS = ("too_large", "acl", "invalid")


INSTANCE = uuid.uuid4().hex  # this process, as announced to other boxes (duplicate edge_id check)
DUPLICATE_LOG_INTERVAL = 60.0  # seconds between warnings about another box with our edge_id
_duplicate_logged_at = [-DUPLICATE_LOG_INTERVAL]


def warn_duplicate_edge_id(edge_id: str, engine: str, evidence: str) -> None:
    """Log (at most once a DUPLICATE_LOG_INTERVAL) that another box forwards as ``edge_id``."""
    now = time.monotonic()
    if now - _duplicate_logged_at[0] >= DUPLICATE_LOG_INTERVAL:
        _duplicate_logged_at[0] = now
        log.warning("forward_duplicate_edge_id", edge_id=edge_id, engine=engine, evidence=evidence,
                    detail="another box forwards with the same EDGELINK_EDGE_ID: each box needs its own, or "
                           "their events interleave (NATS) or they take each other's connection (MQTT)")


class EngineError(Exception):
    """The broker refused, or the connection failed; ``kind`` is a short stable word
    (unreachable, auth, no_stream, timeout, ack_timeout, disconnected, rejected, tls,
    frame_too_large; and for a refusal of one message for itself, too_large, acl, invalid)
    for status and logs."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass(slots=True)
class Message:
    seq: int
    type: str
    msg_id: str  # "<edge_id>:<epoch>:<seq>"
    body: bytes


@functools.lru_cache(maxsize=1024)  # a ledger holds few types: one regex per type, not per event
def safe_type(event_type: str) -> str:
    """The event type as a valid subject/topic tail (API.md §9): characters outside
    [A-Za-z0-9_.-] (wildcards, '/', spaces) become '_', an empty dot-separated token (``a..b``,
    a leading or trailing dot, an empty type) becomes '_', and a type longer than
    TYPE_TOKEN_MAX keeps its start and ends in a hash of the whole, so two long types stay apart."""
    token = ".".join(part or "_" for part in _SUBJECT_UNSAFE.sub("_", event_type).split("."))
    if len(token) > TYPE_TOKEN_MAX:
        digest = hashlib.blake2b(event_type.encode(), digest_size=8).hexdigest()
        token = token[:TYPE_TOKEN_MAX - 17].rstrip(".") + "-" + digest
    return token


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


class Acks:
    """The acks of one connection, counted in publish order: message ``i`` is the i-th
    ``add`` (from 0); ``acked`` is how many messages from the first have their ack, so an
    ack that comes before an earlier one's waits in a set. ``error`` is the first failure:
    a refused message (due once every message before it is acked) or a lost connection
    (due at once). ``wait`` gives one future for the next burst of acks."""

    __slots__ = ("_early", "_error", "_refused", "_waiter", "_want", "acked", "loop", "sent")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.sent = 0
        self.acked = 0
        self._early: set[int] = set()
        self._refused: int | None = None  # the first refused message: acked stops there
        self._error: EngineError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._want = 0

    def add(self) -> int:
        """The index of the message being published."""
        index = self.sent
        self.sent += 1
        return index

    def ack(self, index: int) -> None:
        if index != self.acked:
            if index > self.acked:
                self._early.add(index)
            return
        acked = index + 1
        early = self._early
        while early and acked in early:
            early.discard(acked)
            acked += 1
        if self._refused is not None and acked > self._refused:
            acked = self._refused  # nothing past a refused message counts
        self.acked = acked
        if self._waiter is not None and (acked >= self._want or self.error is not None):
            self._wake()

    def refuse(self, index: int, error: EngineError) -> None:
        if self._refused is None or index < self._refused:
            self._refused, self._error = index, error
            self.acked = min(self.acked, index)
        if self._waiter is not None and self.error is not None:
            self._wake()

    def fail(self, error: EngineError) -> None:
        """The connection is gone: every message not acked yet fails now."""
        if self._refused is None or self._refused > self.acked:
            self._refused, self._error = self.acked, error
        if self._waiter is not None:
            self._wake()

    @property
    def error(self) -> EngineError | None:
        """The failure to raise now: every message before it is acked."""
        if self._refused is not None and self.acked >= self._refused:
            return self._error
        return None

    def wait(self, count: int) -> asyncio.Future[None]:
        """A future that settles (always with None) once ``acked >= count`` or an error is
        due; one at a time, a later call replaces the earlier one."""
        future = self._waiter = self.loop.create_future()
        self._want = count
        if self.acked >= count or self.error is not None:
            self._wake()
        return future

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Engine(Protocol):
    name: str
    acks: Acks  # set by connect

    async def connect(self, edge_id: str, timeout: float) -> None:
        """Open the connection; raises EngineError within ``timeout`` seconds."""

    async def send(self, messages: list[Message]) -> None:
        """Hand ``messages`` to the socket in order, each as the next message of ``acks``
        (whose ack is counted there). Never waits for the socket to take them (a broker
        that stops reading would hold the forwarder past its ack timeout): they are
        buffered, and the forwarder's window bounds that buffer. Raises EngineError when
        the connection is gone."""

    async def close(self) -> None:
        """Drop the connection; what is not acked yet fails."""
