"""The WebSocket endpoint ``/ws`` (API.md §6): control frame, replay, echo, client events."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING

import orjson

from ..account import DECODED
from ..config import KNOB
from ..dispatch import JSON_COST
from ..gateway.events import (
    SCHEMAS,
    InvalidEnvelope,
    SchemaRejected,
    build_event,
    normalize_client_event,
)
from ..http.frames import CLOSE_INTERNAL_ERROR, CLOSE_TRY_AGAIN_LATER
from ..http.messages import validation_error
from ..ingest import accept, now_ms
from ..jsonbounds import CostlyJSON, DecodeRefused, InvalidJSON, decode
from ..ledger import LedgerFull, LedgerUnavailable
from ..log import log, traceback_text
from .operation import WS_AUTH_CASES, Case, Operation, documented, error, param, query_param

if TYPE_CHECKING:
    from ..http.websocket import WebSocket
    from ..runtime import Runtime

MAX_CLIENT_ID = 128
POLICY_VIOLATION = 1008
MAX_SEQ = 2**63 - 1  # SQLite's largest integer


def _control(kind: str, **fields: object) -> bytes:
    return orjson.dumps({"channel": "control", "type": kind, **fields})


def _since(raw: str | None) -> int | None:
    """``since_seq``: absent or empty is None; else ASCII digits up to 2^63-1, or ValueError."""
    if raw is None or raw == "":
        return None
    # int() alone would take "1_0", " 5" and non-ASCII digits
    if not (raw.isascii() and raw.isdigit()) or int(raw) > MAX_SEQ:
        raise ValueError(raw)
    return int(raw)


def _replay_over(task: "asyncio.Task[None]", ws: WebSocket, client_id: str) -> None:
    # a replay that failed (the ledger closing under it, say) would leave the client
    # connected but never live: close it so that it reconnects and resumes
    if not task.cancelled() and task.exception() is not None:
        log.error("websocket_replay_failed", error=repr(task.exception()), client_id=client_id,
                  correlation_id=ws.request.correlation_id)
        ws.close(CLOSE_INTERNAL_ERROR, "replay failed")


@documented("Event stream (WebSocket)", ("events",), Operation(
    (Case("101", "Switching Protocols: the connection is a WebSocket (RFC 6455). The first frame is "
                 "`WsConnected`; then replayed and live events as `WsEvent`. Each JSON text frame a client "
                 "sends is echoed back; a valid canonical event (`{\"type\", \"payload\", ...}`, or `type` "
                 "with the payload fields at top level) is also stored and broadcast to every client, the "
                 "sender included (after its echo). "
                 "Problems are reported as `WsError` frames (invalid JSON, binary frames, a rejected "
                 "event); an invalid `client_id` or `since_seq` gets one and close 1008. Frames over the "
                 f"frame limit ({KNOB['ws_max_frame'].quote()}) close with 1009, a client whose send "
                 "queue is full with 1013, shutdown with 1001.",
          headers=(("Upgrade", "`websocket`."), ("Connection", "`Upgrade`."),
                   ("Sec-WebSocket-Accept", "The RFC 6455 accept key."))),
     error(400, "bad_request", "not a valid RFC 6455 handshake (Connection without Upgrade, bad "
                               "Sec-WebSocket-Key).", correlated=False),
     error(426, "upgrade_required", "a plain GET without `Upgrade: websocket` (auth is not checked).",
           headers=(("Upgrade", "`websocket`."),)),
     error(426, "upgrade_required", "the Sec-WebSocket-Version header is not 13.", correlated=False,
           headers=(("Sec-WebSocket-Version", "`13`."),))),
    description="Authenticates with the X-VX11-Token header or the `token` query parameter "
                "(browsers cannot set headers on WebSockets).",
    parameters=(
        query_param("client_id", "Names the client in logs and in the `source` (`ws:<client_id>`) of "
                                 "the events it sends; absent: a random one.",
                    {"type": "string", "maxLength": MAX_CLIENT_ID}),
        query_param("channel", "The channel to follow; `event` is the only one.",
                    {"type": "string", "default": "event"}),
        query_param("since_seq", f"Replay broadcast events with a larger `seq` still in the ledger (at most "
                                 f"{KNOB['ws_replay_max'].quote()}) before the live ones, without gap or "
                                 f"duplicate. One above the ledger's `last_seq` is another ledger's: the "
                                 f"replay starts from the oldest event, `truncated` true.",
                    {"type": "integer", "minimum": 0}),
        param("token", "query", "The gateway token, for clients that cannot set X-VX11-Token.", {"type": "string"}),
    ),
    auth_cases=WS_AUTH_CASES,
    security=("VX11Token", "VX11TokenQuery")))
async def websocket(ws: WebSocket) -> None:
    rt: Runtime = ws.request.runtime
    query = ws.request.query
    client_id = query.get("client_id") or uuid.uuid4().hex[:12]
    if len(client_id) > MAX_CLIENT_ID:
        ws.send(_control("error", error="invalid_client_id", detail=f"at most {MAX_CLIENT_ID} characters"))
        ws.close(POLICY_VIOLATION, "invalid client_id")
        return
    try:
        since = _since(query.get("since_seq"))
    except ValueError:
        ws.send(_control("error", error="invalid_since_seq",
                         detail=f"since_seq must be ASCII digits, at most {MAX_SEQ}"))
        ws.close(POLICY_VIOLATION, "invalid since_seq")
        return

    # Live events are held until the connected frame (and any replay) is out: the first
    # frame a client sees is always the control frame.
    settings = rt.settings
    client = rt.hub.add(ws, client_id, settings.token if settings.enable_auth else None)
    replay: asyncio.Task[None] | None = None
    held = 0  # bytes of the account the last decoded message is counted for (while ``data`` holds it)
    try:
        ledger = rt.ledger
        after, count, truncated = None, 0, False
        if since is not None:
            epoch = query.get("epoch")
            # seq of another database file: from the oldest. A since_seq beyond ours can only
            # come from another ledger (a client of an older file that passes no epoch).
            stale = (bool(epoch) and epoch != ledger.epoch) or since > await ledger.last_seq()
            after, count, truncated = await ledger.replay_window(0 if stale else since, settings.ws_replay_max)
            truncated = truncated or stale
        # read after the window, so that last_seq covers every replayed event
        last_seq = await ledger.last_seq()
        if after is None:
            after = last_seq
        ws.send(_control("connected", client_id=client_id, epoch=ledger.epoch, last_seq=last_seq,
                         replayed=count, truncated=truncated))
        # paced by the client's socket, while its own messages are still read (and pongs seen)
        replay = asyncio.create_task(rt.hub.replay(client, after, ledger))
        replay.add_done_callback(lambda task: _replay_over(task, ws, client_id))
        source = f"ws:{client_id}"
        while (message := await ws.receive()) is not None:
            if held and ws.share is not None:  # (held only with a share: for the checker)
                ws.share.give(DECODED, held)
                held = 0
            if isinstance(message, bytes):
                ws.send(_control("error", error="binary_not_supported", detail="send JSON in text frames"))
                continue
            raw = message.encode()
            try:
                data, cost = decode(raw, ws.share)
                held = cost if ws.share is not None else 0
            except InvalidJSON:  # too deep included; the frame's shape is fixed by API.md §6
                ws.send(_control("error", error="invalid_json"))
                continue
            except CostlyJSON as exc:  # refused before it was decoded, as a body would be
                rt.metrics.budget_refusals.inc(JSON_COST)
                ws.send(_control("error", error="payload_too_large", detail=f"frame refused: {exc}"))
                continue
            except DecodeRefused:  # API.md §1: the account is exhausted
                ws.close(CLOSE_TRY_AGAIN_LATER, "gateway overloaded")
                break
            ws.send(raw)  # the echo
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
            except InvalidEnvelope as exc:  # metadata over its bound
                rt.metrics.events.inc("invalid", "rejected")
                ws.send(_control("error", error="validation_error",
                                 detail=validation_error(*exc.problems).extra["detail"]))
                continue
            try:
                # to every client, the sender included; a flat event's fields also at the top
                # level of the frame (both as Tentáculo Link broadcast it, API.md §12)
                await accept(rt, event, incoming.payload if incoming.flat else None)
            except LedgerFull:  # the same refusals as POST /events/ingest, as a frame: stay connected
                rt.metrics.budget_refusals.inc("ledger")
                ws.send(_control("error", error="ledger_full", event_type=event.type,
                                 detail="the ledger is at EDGELINK_LEDGER_MAX_BYTES; the event was not stored"))
            except LedgerUnavailable as exc:
                ws.send(_control("error", error="ledger_unavailable", event_type=event.type,
                                 detail=f"the event was not stored: {exc}"))
    except Exception as exc:
        log.error("websocket_failed", error=repr(exc), client_id=client_id,
                  correlation_id=ws.request.correlation_id, traceback=traceback_text(exc))
        raise
    finally:
        if held and ws.share is not None:
            ws.share.give(DECODED, held)
        rt.hub.remove(client)
        if replay is not None:
            replay.cancel()
            await asyncio.gather(replay, return_exceptions=True)
