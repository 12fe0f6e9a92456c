"""The WebSocket hub: who is connected, and fan-out of broadcast events to them.

A broadcast encodes the frame once and hands the same bytes to every client; each
client's own bounded queue (in ``WebSocket``) decides whether it keeps up or is closed
with 1013, so one slow client never slows the others.

Replay without gap or duplicate: a client asking for ``since_seq`` is registered first
and its live events are held back while the ledger is read; then the replayed events
are sent, then the held-back ones whose seq the replay did not already cover. A live
event at or below the newest replayed seq is not sent either: its commit can reach the
loop only after the replay read saw it and the client went live.
"""

from __future__ import annotations

from typing import Iterable

import orjson

from .gateway.events import Event
from .gateway.metrics import Registry
from .http.websocket import CLOSE_TRY_AGAIN_LATER, WebSocket, text_frame


class Client:
    __slots__ = ("ws", "client_id", "held", "floor")

    def __init__(self, ws: WebSocket, client_id: str):
        self.ws = ws
        self.client_id = client_id
        # live events that arrive before go_live (while the replay is read): (seq, payload, frame)
        self.held: list[tuple[int, bytes, bytes]] | None = []
        # the newest seq the replay sent: an event committed before the replay read but
        # broadcast only after go_live (its commit reached the loop late) is not sent twice
        self.floor = 0


class Hub:
    def __init__(self, metrics: Registry, hold_limit: int):
        self.clients: dict[WebSocket, Client] = {}
        self.metrics = metrics
        self.hold_limit = hold_limit  # the same bound as a client's send queue

    def add(self, ws: WebSocket, client_id: str) -> Client:
        """Register a client; its live events are held until ``go_live``."""
        client = Client(ws, client_id)
        self.clients[ws] = client
        return client

    def remove(self, client: Client) -> None:
        self.clients.pop(client.ws, None)

    def broadcast(self, event: Event, exclude: WebSocket | None = None) -> None:
        """Send ``event`` to every client but ``exclude``."""
        payload = orjson.dumps(event.frame())
        frame = text_frame(payload)
        seq = event.seq or 0
        for ws, client in list(self.clients.items()):
            if ws is exclude or seq <= client.floor:
                continue
            if client.held is not None:
                if len(client.held) >= self.hold_limit:
                    ws.close(CLOSE_TRY_AGAIN_LATER, "slow consumer")
                    self._dropped(client)
                else:
                    client.held.append((seq, payload, frame))
            elif not ws.send(payload, frame):
                self._dropped(client)

    def go_live(self, client: Client, replayed: Iterable[Event]) -> None:
        """Send the replayed events, then the held-back live ones they do not cover."""
        last = 0
        for event in replayed:
            client.ws.send(orjson.dumps(event.frame()))
            last = max(last, event.seq or 0)
        client.floor = last
        held, client.held = client.held or [], None
        for seq, payload, frame in held:
            if seq > last:
                client.ws.send(payload, frame)

    def queued_bytes(self) -> int:
        """Bytes waiting for all clients: their send queues and held-back live events."""
        return sum(c.ws.queued_bytes() + sum(len(frame) for _, _, frame in c.held or ())
                   for c in self.clients.values())

    def _dropped(self, client: Client) -> None:
        if client.ws.close_code == CLOSE_TRY_AGAIN_LATER:
            self.metrics.ws_drops.inc()
        self.remove(client)
