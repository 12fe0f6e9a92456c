"""The WebSocket hub: who is connected, fan-out of broadcast events, and paced replays.

Bytes are shared, never copied per client. A broadcast frame is encoded once and the same
bytes object goes to every client; a replayed event's frame is spliced from the JSON the
ledger stored (no decode, no re-encode) and kept in a small byte-bounded cache by seq, so
clients replaying the same events share one frame too. The events broadcast in one turn of
the loop (one ledger commit wakes several ingests) are given to the clients together, at
the end of the turn or before anything else is written to a WebSocket, whichever comes
first: a live client that gets them all is handed them joined in one bytes object, shared
by all such clients and written with one system call; the others (replaying, or at their
floor) get them one by one, as if each had been sent alone. Each client's bounded
queue (in ``WebSocket``, frames and bytes) decides whether it keeps up or is closed with
1013, so one slow client never slows the others.

Replay without gap or duplicate, paced by the client (API.md §6). A client is registered
first and its live events are *held* (bounded like its send queue) while ``replay`` pages
through the ledger after ``after``, sending a frame only when the client's socket takes
it. Once a page read reaches the end of the ledger, the held events it did not cover are
sent, and the client goes live with nothing awaited between the last check and the switch.
Every event broadcast before a read began is committed, hence in that read; every event
broadcast after it began is held. If the held events overflow their bound they are
dropped and the replay simply reads on from the ledger, where they are stored: a slow
replaying client costs one page and its socket buffer, never a whole replay. A live event
at or below the newest replayed seq is not sent (``floor``): its commit can reach the loop
only after the replay read saw it.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any, Mapping

import orjson

from .gateway.events import Event
from .gateway.metrics import Registry
from .http.frames import CLOSE_TRY_AGAIN_LATER, call_before_writes, text_frame
from .log import log

if TYPE_CHECKING:
    from .http.websocket import WebSocket
    from .ledger import Ledger

POLICY_VIOLATION = 1008
# rows per ledger read: a replay paused mid-page holds the rest, ~58 KiB of max-size events
REPLAY_PAGE = 8
FRAME_CACHE_BYTES = 2 * 1024 * 1024  # recent frames by seq, shared by replaying clients


class Client:
    __slots__ = ("ws", "client_id", "token", "held", "held_bytes", "overflows", "floor")

    def __init__(self, ws: WebSocket, client_id: str, token: str | None):
        self.ws = ws
        self.client_id = client_id
        self.token = token  # what it authenticated with (None: auth was off)
        # live events that arrive while the replay runs, as (seq, frame); None once live
        self.held: deque[tuple[int, bytes]] | None = deque()
        self.held_bytes = 0
        self.overflows = 0  # how many times the held events overflowed and were dropped
        # the newest seq the replay sent: an event committed before the replay read but
        # broadcast only after going live (its commit reached the loop late) is not sent twice
        self.floor = 0


class Hub:
    def __init__(self, metrics: Registry, hold_limit: int, hold_bytes: int):
        self.clients: dict[WebSocket, Client] = {}
        self.metrics = metrics
        # the same bounds as a client's send queue
        self.hold_limit = hold_limit
        self.hold_bytes = hold_bytes
        self._frames: OrderedDict[int, bytes] = OrderedDict()
        self._frame_bytes = 0
        # broadcast in this turn, not yet given to the clients: (seq, frame)
        self._turn: list[tuple[int, bytes]] = []

    def add(self, ws: WebSocket, client_id: str, token: str | None) -> Client:
        """Register a client; its live events are held until ``replay`` is done."""
        self._fan_out()  # what was broadcast before it came is not for it
        client = Client(ws, client_id, token)
        self.clients[ws] = client
        return client

    def remove(self, client: Client) -> None:
        self._fan_out()  # what was broadcast while it was here is
        self.clients.pop(client.ws, None)

    def queued_bytes(self) -> int:
        """Bytes waiting for all clients: their send queues and held-back live events."""
        return sum(c.ws.waiting_bytes() + c.held_bytes for c in self.clients.values())

    def close_other_tokens(self, token: str) -> None:
        """Close (1008) every client that authenticated with something else than ``token``."""
        stale = [c for c in self.clients.values() if c.token != token]
        for client in stale:
            client.ws.close(POLICY_VIOLATION, "token changed")
            self.remove(client)

    def broadcast(self, event: Event, top_level: Mapping[str, Any] | None = None) -> None:
        """Send ``event`` to every client. ``top_level``: fields also put at the top level
        of its frame (a flat client event's, as Tentáculo Link broadcast it); the frame's
        own fields win a clash. Such a frame is not kept for replays, which send the
        stored event as it is.

        The frames of one turn go to the clients together (``_fan_out``), before anything
        else is written to a WebSocket: each connection's order is that of the calls."""
        seq = event.seq or 0
        if top_level:
            frame = text_frame(orjson.dumps({**top_level, **event.frame()}))
        else:
            frame = text_frame(orjson.dumps(event.frame()))
            self._remember(seq, frame)
        if not self._turn:
            call_before_writes(self._fan_out)
        self._turn.append((seq, frame))

    def _fan_out(self) -> None:
        """Give the frames broadcast since the last fan-out to the clients (at once when
        called early: the deferred call then finds nothing)."""
        turn, self._turn = self._turn, []
        if not turn or not self.clients:
            return
        frames = [frame for _, frame in turn]
        joined = b"".join(frames) if len(frames) > 1 else frames[0]
        lowest = min(seq for seq, _ in turn)
        for ws, client in list(self.clients.items()):
            if client.held is None and client.floor < lowest:
                sent = ws.send_frames(frames, joined)  # the usual case: every frame, at once
            else:
                sent = self._send_each(client, turn)
            if not sent:
                self._dropped(client)

    def _send_each(self, client: Client, turn: list[tuple[int, bytes]]) -> bool:
        """The frames of ``turn`` that go to ``client``, one by one; False if it is gone."""
        ws = client.ws
        for seq, frame in turn:
            if seq <= client.floor:
                continue
            held = client.held
            if held is not None:
                if len(held) >= self.hold_limit or client.held_bytes + len(frame) > self.hold_bytes:
                    # the replay reads on from the ledger, which has them all
                    held.clear()
                    client.held_bytes = 0
                    client.overflows += 1
                held.append((seq, frame))
                client.held_bytes += len(frame)
            elif not ws.send_frame(frame):
                return False
        return True

    async def replay(self, client: Client, after: int, ledger: "Ledger") -> None:
        """Send the broadcast events after seq ``after``, paced by the client, then go live."""
        cursor = after  # where the next ledger read starts
        sent = 0  # the newest seq sent by the replay
        while True:
            mark = client.overflows
            rows = await ledger.replay_page(cursor, REPLAY_PAGE)
            for row in rows:
                if not await self._paced(client, self._frame_of(row)):
                    return
                cursor = sent = row[0]
            if len(rows) == REPLAY_PAGE or client.overflows != mark:
                continue  # more stored, or held events were dropped: read on
            held = client.held
            assert held is not None
            while held and client.overflows == mark:
                seq, frame = held.popleft()
                client.held_bytes -= len(frame)
                if seq > sent:
                    if not await self._paced(client, frame):
                        return
                    cursor, sent = max(cursor, seq), seq
            if client.overflows == mark:  # nothing awaited since the check: no event can slip by
                client.floor = sent
                client.held = None
                client.held_bytes = 0
                return

    async def _paced(self, client: Client, frame: bytes) -> bool:
        """Send ``frame`` once the client's socket takes it; False if the client is gone."""
        ws = client.ws
        if await ws.writable() and ws.send_frame(frame):
            return True
        self._dropped(client)
        return False

    def _frame_of(self, row: tuple) -> bytes:
        """The broadcast frame of a stored row, byte for byte what ``broadcast`` sends."""
        seq, event_id, type_, source, timestamp, payload, metadata = row
        frame = self._frames.get(seq)
        if frame is None:
            head = orjson.dumps({"channel": "event", "event_id": event_id, "seq": seq, "type": type_,
                                 "source": source, "timestamp": timestamp})
            frame = text_frame(b"%s,\"payload\":%s,\"metadata\":%s}"
                               % (head[:-1], payload, b"null" if metadata is None else metadata))
            self._remember(seq, frame)
        return frame

    def _remember(self, seq: int, frame: bytes) -> None:
        frames = self._frames
        if seq in frames:
            return
        frames[seq] = frame
        self._frame_bytes += len(frame)
        while self._frame_bytes > FRAME_CACHE_BYTES:
            self._frame_bytes -= len(frames.popitem(last=False)[1])

    def _dropped(self, client: Client) -> None:
        if client.ws.close_code == CLOSE_TRY_AGAIN_LATER and client.ws in self.clients:
            self.metrics.ws_drops.inc()
            self.metrics.budget_refusals.inc("ws_queue")
            log.warning("ws_slow_consumer_closed", client_id=client.client_id)  # once: it is gone
        self.remove(client)
