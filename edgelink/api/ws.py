"""The WebSocket endpoint ``/ws`` (API.md §6): control frame, replay, echo, client events."""

from __future__ import annotations

import uuid

import orjson

from ..gateway.events import SCHEMAS, SchemaRejected, build_event, normalize_client_event
from ..http.websocket import WebSocket
from ..log import log, traceback_text
from .events import accept, now_ms

MAX_CLIENT_ID = 128
POLICY_VIOLATION = 1008


def _control(kind: str, **fields: object) -> bytes:
    return orjson.dumps({"channel": "control", "type": kind, **fields})


async def websocket(ws: WebSocket) -> None:
    rt = ws.request.runtime
    query = ws.request.query
    client_id = query.get("client_id") or uuid.uuid4().hex[:12]
    since_raw = query.get("since_seq")
    if len(client_id) > MAX_CLIENT_ID:
        ws.send(_control("error", error="invalid_client_id", detail=f"at most {MAX_CLIENT_ID} characters"))
        ws.close(POLICY_VIOLATION, "invalid client_id")
        return
    since: int | None = None
    if since_raw not in (None, ""):
        try:
            since = int(since_raw)
            if since < 0:
                raise ValueError
        except ValueError:
            ws.send(_control("error", error="invalid_since_seq", detail="since_seq must be an integer >= 0"))
            ws.close(POLICY_VIOLATION, "invalid since_seq")
            return

    # Live events are held until the connected frame (and any replay) is out: the first
    # frame a client sees is always the control frame.
    client = rt.hub.add(ws, client_id)
    try:
        replayed, truncated = ([], False)
        if since is not None:
            replayed, truncated = await rt.ledger.replay(since, rt.settings.ws_replay_max)
        last_seq = await rt.ledger.last_seq()
        ws.send(_control("connected", client_id=client_id, epoch=rt.ledger.epoch, last_seq=last_seq,
                         replayed=len(replayed), truncated=truncated))
        rt.hub.go_live(client, replayed)
        source = f"ws:{client_id}"
        while (message := await ws.receive()) is not None:
            if isinstance(message, bytes):
                ws.send(_control("error", error="binary_not_supported", detail="send JSON in text frames"))
                continue
            try:
                data = orjson.loads(message)
            except orjson.JSONDecodeError:
                ws.send(_control("error", error="invalid_json"))
                continue
            ws.send(message.encode())  # the echo
            incoming = normalize_client_event(data, source)
            if incoming is None or incoming.type not in SCHEMAS:
                continue  # only canonical events are stored and broadcast
            try:
                event = build_event(incoming.type, incoming.source, incoming.payload, incoming.metadata,
                                    broadcast=True, now_ms=now_ms())
            except SchemaRejected as exc:
                rt.metrics.events.inc(exc.type, "rejected")
                # "event_type", not "type": that key is the control frame's own ("error")
                ws.send(_control("error", error="schema_validation_failed", event_type=exc.type,
                                 detail=exc.detail))
                continue
            await accept(rt, event, exclude=ws)
    except Exception as exc:
        log.error("websocket_failed", error=repr(exc), client_id=client_id,
                  correlation_id=ws.request.correlation_id, traceback=traceback_text(exc))
        raise
    finally:
        rt.hub.remove(client)
