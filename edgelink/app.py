"""The endpoint table: every path the gateway serves, in one place (API.md), each declared
once with its handler, auth, summary, tags and OpenAPI operation (openapi.py builds the
document from this table). Aliases share their route's handler and documentation."""

from __future__ import annotations

from .api import chat, console, events, health, modules, ops, ws
from .api.console import ASSETS as CONSOLE_ASSETS
from .api.events import (
    MAX_SNAPSHOT_T,
    SNAPSHOT_FIELD_BYTES,
    TIMELINE_DEFAULT,
    TIMELINE_MAX,
    TIMELINE_MAX_BYTES,
    TIMELINE_SCAN,
)
from .api.health import DEFAULT_HISTORY, MAX_HISTORY
from .api.ws import MAX_CLIENT_ID
from .config import KNOB
from .gateway.auth import MAX_CORRELATION_ID
from .gateway.observe import MAX_AGE_SECONDS, MAX_NODES, WINDOW_SECONDS
from .http.router import Router
from .openapi import (
    HTML,
    INVALID_JSON,
    PROMETHEUS,
    SSE,
    STREAM_HEADERS,
    UPSTREAM_CASES,
    VALIDATION,
    WS_AUTH_CASES,
    Case,
    Operation,
    error,
    json_body,
    param,
    path_param,
    query_param,
    ref,
    reply,
)

# Pieces several entries share.
PROXY = Operation((reply(200, "The module's reply.", "ModuleReply"), *UPSTREAM_CASES), forwards=True)
SESSION_ID = path_param("session_id", "The session id returned by the chat.", "0b8e6a56-2f7e-4c8b-9a59-3d1f4f6f2c11")
NO_SESSION = (error(404, "session_not_found", "unknown or expired session."),
              error(404, "not_found", "the path matches no route (a `session_id` holding `/`)."))
STRING = {"type": "string"}
STATIC_CASES = (
    Case("304", "Not Modified: `If-None-Match` names the current ETag.", headers=(("ETag", "The file's tag."),)),
)
IF_NONE_MATCH = param("If-None-Match", "header", "ETags the client holds; the current one answers 304.", STRING)
PAGE = Operation(
    (Case("200", "The page (gzip when `Accept-Encoding` admits it), sent with `Cache-Control: no-cache`, an "
                 "`ETag` and a `Content-Security-Policy` of the gateway's own origin. The data it shows needs "
                 "the token, entered in the page.", schema=ref("Text"), media_type=HTML,
          headers=(("ETag", "The file's tag."), ("Content-Security-Policy", "Only the gateway's own origin."))),
     *STATIC_CASES),
    parameters=(IF_NONE_MATCH,),
)


def build_router() -> Router:
    r = Router()
    r.add("GET", "/health", health.health, public=True, summary="Gateway liveness", tags=("health",),
          aliases=("/v1/health",), doc=Operation((
              reply(200, "The gateway is up; answered from memory, never from a module.", "Health"),
              reply(503, "The gateway is shutting down.", "Health"))))
    r.add("GET", "/vx11/status", modules.status, public=True, summary="Gateway and module health",
          tags=("modules",), aliases=("/v1/status",), doc=Operation((
              reply(200, f"Every module probed concurrently (`GET <url>/health`, each bounded by "
                         f"{KNOB['health_timeout'].quote()}); concurrent callers share one probe round.", "Status"),)))
    r.add("GET", "/vx11/overview", modules.overview, summary="Module health overview", tags=("modules",),
          doc=Operation((reply(200, "Every module probed, as `GET /vx11/status` does.", "Overview"),)))
    r.add("GET", "/vx11/circuit-breaker/status", modules.breakers, summary="Circuit breaker per module",
          tags=("modules",), doc=Operation((reply(200, "One breaker per enabled module.", "BreakerStatus"),)))
    r.add("GET", "/vx11/routes", modules.routes, summary="The intent route table", tags=("modules",),
          doc=Operation((reply(200, "The route table, intent -> module.", "Routes"),)))
    r.add("GET", "/vx11/forward/status", ops.forward_status, summary="Forwarding to the fleet broker",
          tags=("operations",), doc=Operation((reply(200, "The forwarder's connection, cursor and backlog.",
                                                     "ForwardStatus"),)))
    r.add("GET", "/vx11/forward/dead-letters", ops.forward_dead_letters, summary="Events the broker refused",
          tags=("operations",), doc=Operation(
              (reply(200, "This epoch's dead letters, newest first: events the broker refused for themselves (too "
                          "large, refused by an ACL after retries), which the cursor moved past. `stored` says "
                          "whether the event is still in the ledger (retention treats it as forwarded).",
                     "ForwardDeadLetters"), VALIDATION),
              parameters=(query_param("limit", f"How many to list ({ops.DEAD_LETTERS_LISTED} by default).",
                                      {"type": "integer", "minimum": 1, "maximum": ops.DEAD_LETTERS_MAX}),)))
    r.add("POST", "/vx11/forward/rewind", ops.forward_rewind, summary="Forward again from a seq",
          tags=("operations",), doc=Operation(
              (reply(200, "The cursor is set back: forwarding resends from `from_seq` (the oldest stored event when "
                          "absent or older), for a broker that lost messages it had acknowledged. Resends are "
                          "counted in `edgelink_forward_resent_total`; the consumer's dedup by (edge_id, epoch, seq) "
                          "keeps them exactly-once.", "ForwardRewound"),
               INVALID_JSON, VALIDATION,
               error(409, "forwarding_disabled", "EDGELINK_FORWARD_URL is not set.")),
              request_body=json_body("ForwardRewind", {"from_seq": 1}, required=False)))
    r.add("POST", "/vx11/intent/{intent}", modules.intent, summary="Forward an intent to its module",
          tags=("modules",), doc=Operation(
              (reply(200, "The module's reply.", "ModuleReply"),
               Case("200", "A route with `stream = true`: the module's reply relayed as it arrives, with its status "
                           "and content type (chunked to HTTP/1.1, close-delimited to HTTP/1.0).",
                    schema={"$ref": "#/components/schemas/StreamedEvent"}, media_type=SSE, headers=STREAM_HEADERS),
               error(404, "unknown_intent", "no route for this intent; `known` lists the intents."),
               error(404, "not_found", "the path matches no route (an `intent` holding `/`)."),
               INVALID_JSON, VALIDATION, *UPSTREAM_CASES),
              description="Forwards the JSON body (an empty body is sent as `{}`) to the intent's route, and to "
                          "its fallback when the route fails; answers with the module's status and JSON body.",
              parameters=(path_param("intent", "A key of the route table (`GET /vx11/routes`).", "chat"),),
              request_body=json_body("IntentRequest", {"prompt": "summarise the logs"}, required=False),
              forwards=True))
    r.add("GET", "/shub/dashboard", modules.shub_dashboard, summary="Proxy: shubniggurath dashboard",
          tags=("modules",), doc=Operation(PROXY.cases, description="Calls shubniggurath `POST /shub/dashboard` "
                                           "with the body `{}`, as Tentáculo Link did.", forwards=True))
    r.add("GET", "/resources", modules.resources, summary="Proxy: hermes resources", tags=("modules",), doc=PROXY)
    r.add("GET", "/hormiguero/queen/status", modules.queen_status, summary="Proxy: hormiguero queen status",
          tags=("modules",), doc=PROXY)
    r.add("GET", "/hormiguero/report", modules.hormiguero_report, summary="Proxy: hormiguero report",
          tags=("modules",), doc=Operation(
              (reply(200, "The module's reply.", "ModuleReply"), VALIDATION, *UPSTREAM_CASES),
              parameters=(query_param("limit", "How many report entries to ask the module for.",
                                      {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50}),),
              forwards=True))

    r.add("POST", "/operator/chat", chat.chat, summary="Chat with fallback", tags=("chat",),
          aliases=("/operator/api/chat",), doc=Operation(
              (reply(200, "The chat route answered, or its fallback did (`degraded`).", "ChatResponse"),
               Case("200", "`\"stream\": true`: the `stream` route's text as it comes; if it fails before its "
                           "first byte, the fallback's whole reply as one `delta` (`degraded`).",
                    schema={"$ref": "#/components/schemas/ChatEvent"}, media_type=SSE, headers=STREAM_HEADERS),
               INVALID_JSON, VALIDATION,
               reply(503, "`chat_unavailable`: the chat route and its fallback both failed.", "ChatUnavailable"),
               error(503, "gateway_overloaded", "both routes failed only because the gateway is out of file "
                                                "descriptors or buffers; no module is at fault.")),
              description="Records the user message in the session (a new one when `session_id` is absent), "
                          "calls the `chat` route with the message and a summary of the session, and on any "
                          "failure its fallback. The reply is recorded in the session.",
              request_body=json_body("ChatRequest", {"message": "hello", "session_id": None})))
    r.add("GET", "/operator/session/{session_id}", chat.session, summary="One Context-7 session", tags=("chat",),
          doc=Operation((reply(200, "The session and its messages, oldest first. Reading is not activity.",
                                     "Session"), *NO_SESSION), parameters=(SESSION_ID,)))
    r.add("DELETE", "/operator/session/{session_id}", chat.delete_session, summary="Delete a session",
          tags=("chat",), doc=Operation((Case("204", "Deleted."), *NO_SESSION), parameters=(SESSION_ID,)))
    r.add("GET", "/vx11/context-7/sessions", chat.sessions, summary="Live Context-7 sessions", tags=("chat",),
          doc=Operation((reply(200, "Live sessions.", "SessionList"),)))
    r.add("POST", "/vx11/context-7/cleanup", chat.cleanup, summary="Sweep expired sessions now", tags=("chat",),
          doc=Operation((reply(200, "Expired sessions removed; `total` counts the live ones left.",
                               "SessionCleanup"),),
                        description="What the sweep every CONTEXT7_CLEANUP_INTERVAL seconds does, at once "
                                    "(Tentáculo Link's troubleshooting guide names this call). Takes no body."))

    r.add("POST", "/events/ingest", events.ingest, summary="Validate and store an event", tags=("events",),
          doc=Operation(
              (reply(201, "Accepted and committed to the ledger.", "IngestAccepted"),
               INVALID_JSON, VALIDATION,
               reply(422, "`schema_validation_failed`: a canonical event broke its schema; nothing is stored.",
                     "IngestRejected"),
               error(503, "ledger_unavailable", "the disk refused the write (full, read-only, I/O error); nothing "
                                                "is stored. Retried by itself: the next write tries again."),
               error(507, "ledger_full", "the ledger is at EDGELINK_LEDGER_MAX_BYTES and EDGELINK_LEDGER_FULL is "
                                         "`reject`; nothing is stored.")),
              request_body=json_body("IngestRequest", {
                  "source": "madre", "type": "system.alert", "broadcast": True,
                  "payload": {"alert_id": "a-1", "severity": "high", "message": "disk full",
                              "timestamp": 1700000000000}})))
    r.add("GET", "/debug/events/cardinality", events.cardinality, summary="Events per type, last 60 s",
          tags=("events",), doc=Operation((
              reply(200, f"Accepted events per type over a sliding {WINDOW_SECONDS} s window.", "Cardinality"),)))
    r.add("GET", "/debug/events/correlations", events.correlations, summary="Correlation graph of recent events",
          tags=("events",), doc=Operation((
              reply(200, f"Recent canonical events (at most {MAX_NODES}, none older than {MAX_AGE_SECONDS} s) "
                         f"and their links.", "Correlations"),)))
    r.add("GET", "/debug/events/timeline", events.timeline, summary="Stored events in a time range",
          tags=("events",), doc=Operation(
              (reply(200, f"The newest `limit` stored events received between `since` and `until`, oldest first; "
                          f"payloads and metadata over {SNAPSHOT_FIELD_BYTES // 1024} KiB summarised, the answer at "
                          f"most {TIMELINE_MAX_BYTES // 1024} KiB (the oldest events dropped past it, `truncated`). "
                          f"With `correlation_id`, only the events whose payload or metadata carries it, among "
                          f"the newest {TIMELINE_SCAN} of the range.", "Timeline"), VALIDATION),
              description="What the console's timeline reads (API.md §10).",
              parameters=(
                  query_param("since", "Events received at or after this moment, Unix epoch ms.",
                              {"type": "integer", "minimum": 0, "maximum": MAX_SNAPSHOT_T, "default": 0}),
                  query_param("until", "Events received at or before this moment, Unix epoch ms; absent or 0: now.",
                              {"type": "integer", "minimum": 0, "maximum": MAX_SNAPSHOT_T, "default": 0}),
                  query_param("correlation_id", "Only events whose payload or metadata `correlation_id` is this.",
                              {"type": "string", "maxLength": MAX_CORRELATION_ID}),
                  query_param("limit", "At most this many events (the newest).",
                              {"type": "integer", "minimum": 1, "maximum": TIMELINE_MAX,
                               "default": TIMELINE_DEFAULT}))))
    r.add("GET", "/operator/snapshot", events.snapshot, summary="Module health and events at time t",
          tags=("events",), doc=Operation(
              (reply(200, "Built from the ledger and the recorded health probes.", "Snapshot"), VALIDATION),
              parameters=(query_param("t", "The moment, Unix epoch ms; absent or 0: now.",
                                      {"type": "integer", "minimum": 0, "maximum": MAX_SNAPSHOT_T, "default": 0}),)))
    r.add("GET", "/metrics", ops.metrics, public=True, summary="Prometheus metrics", tags=("operations",),
          doc=Operation((reply(200, "Requests by route and status, request latency, events by type and outcome, "
                                    "WebSocket clients and drops, breaker states, upstream latency.",
                               "PrometheusText", media_type=PROMETHEUS),)))
    r.add("GET", "/openapi.json", ops.openapi_json, public=True, summary="This document", tags=("operations",),
          doc=Operation((reply(200, "This document.", "OpenAPIDocument"),)))
    r.add("GET", "/vx11/health/history", health.history, summary="Recorded probes of one module",
          tags=("operations",), doc=Operation(
              (reply(200, "The module's recorded probe rounds (EDGELINK_PROBE_INTERVAL), oldest first: the newest "
                          "`limit` at or after `since`.", "HealthHistory"),
               error(404, "not_found", "not a configured module (nor `tentaculo_link`, the gateway's own row)."),
               VALIDATION),
              parameters=(param("module", "query", "A module name, or `tentaculo_link` for the gateway.",
                                {"type": "string", "minLength": 1}, required=True, example="madre"),
                          query_param("since", "Only probes at or after this moment, Unix epoch ms.",
                                      {"type": "integer", "minimum": 0, "maximum": MAX_SNAPSHOT_T, "default": 0}),
                          query_param("limit", "At most this many points (the newest).",
                                      {"type": "integer", "minimum": 1, "maximum": MAX_HISTORY,
                                       "default": DEFAULT_HISTORY}))))
    r.add("GET", "/console", console.console, public=True, summary="Operator console (HTML page)",
          tags=("console",), doc=PAGE)
    r.add("GET", "/console/{asset}", console.asset, public=True, summary="Operator console files",
          tags=("console",), doc=Operation(
              (Case("200", "The file, sent as the pages are: a stylesheet as `text/css`,", schema=ref("Text"),
                    media_type="text/css", headers=(("ETag", "The file's tag."),)),
               Case("200", "a script as `text/javascript`.", schema=ref("Text"), media_type="text/javascript"),
               *STATIC_CASES,
               error(404, "not_found", "not one of the console's files.")),
              parameters=({**param("asset", "path", "The file.", {"enum": list(CONSOLE_ASSETS)}, required=True),
                           "example": "console.js"}, IF_NONE_MATCH)))
    r.add("GET", "/docs", console.docs, public=True, summary="Interactive API reference (HTML page)",
          tags=("console",), doc=PAGE)
    r.add("GET", "/redoc", console.redoc, public=True, summary="Redirect to /docs", tags=("console",),
          doc=Operation((Case("308", "Permanent Redirect to `/docs`, the API reference.",
                              headers=(("Location", "`/docs`."),)),)))
    r.add("WS", "/ws", ws.websocket, summary="Event stream (WebSocket)", tags=("events",), doc=Operation(
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
            param("token", "query", "The gateway token, for clients that cannot set X-VX11-Token.", STRING),
        ),
        auth_cases=WS_AUTH_CASES,
        security=("VX11Token", "VX11TokenQuery")))
    return r
