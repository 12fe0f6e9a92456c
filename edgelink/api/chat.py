"""Chat with fallback and the Context-7 session endpoints (API.md §4)."""

from __future__ import annotations

import codecs
import io
import time
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, AsyncGenerator

import orjson

from ..config import IntentTarget
from ..gateway.fields import field_problems
from ..gateway.sessions import DEFAULT_USER, Message, SessionsOverloaded, char_cost
from ..http.messages import (
    HTTPError,
    Request,
    Response,
    StreamingResponse,
    empty_response,
    json_response,
    validation_error,
)
from ..log import log
from ..modules import GATEWAY_OVERLOADED, ModuleError
from . import streams
from .modules import call
from .operation import (
    INVALID_JSON,
    SSE,
    STREAM_HEADERS,
    VALIDATION,
    Case,
    Operation,
    documented,
    error,
    json_body,
    path_param,
    returns,
)

if TYPE_CHECKING:
    from ..runtime import Runtime

MAX_MESSAGE = 32_768
MAX_ID = 256  # session_id and user_id (API.md §4): both are stored with the session
_CHAT_FIELDS = {"message": (str, True), "session_id": (str, False), "user_id": (str, False),
                "metadata": (dict, False), "stream": (bool, False)}
# A line of the module's event stream (or of its plain text) held while incomplete.
MAX_STREAM_LINE = 64 * 1024
_TEXT_KEYS = ("response", "message", "text", "content")
# A session view whose texts and metadata may take more than this is streamed, in pieces
# of VIEW_PIECE characters of text.
STREAMED_VIEW = 256 * 1024
VIEW_PIECE = 16 * 1024
# A streamed chat keeps at most this fraction of EDGELINK_UPSTREAM_MAX_REPLY (in bytes) of
# its reply for the session and the done event: three chats streaming at once each hold it
# about twice (as it grows, then as one str).
KEPT_REPLY_SHARE = 4

# what the session endpoints' documentation shares
SESSION_ID = path_param("session_id", "The session id returned by the chat.", "0b8e6a56-2f7e-4c8b-9a59-3d1f4f6f2c11")
NO_SESSION = (error(404, "session_not_found", "unknown or expired session."),
              error(404, "not_found", "the path matches no route (a `session_id` holding `/`)."))


def _reply_text(data: Any) -> str | None:
    """The module's answer text: ``response``, else ``message``, ``text``, ``content``."""
    if isinstance(data, dict):
        for key in _TEXT_KEYS:
            value = data.get(key)
            if isinstance(value, str) and value.strip():
                return value
    return None


async def _ask(req: Request[Runtime], target: IntentTarget,
               body: dict[str, Any]) -> tuple[str, str, dict[str, Any]] | str:
    """(text, model, the whole reply) from one intent target, or the error code if it failed in any
    way (logged)."""
    try:
        reply = await call(req, target, body)
    except ModuleError as exc:
        log.warning("chat_route_failed", module=target.module, error=exc.code, correlation_id=req.correlation_id)
        return exc.code
    text = _reply_text(reply.data) if 200 <= reply.status < 300 else None
    if text is None:
        log.warning("chat_route_failed", module=target.module, error="no_text", http_code=reply.status,
                    correlation_id=req.correlation_id)
        return "no_text"
    # model_used, else model, else the provider name: a value that is not a name (a number,
    # an object, blank) counts as absent, as for the text keys.
    names = (reply.data.get(key) for key in ("model_used", "model"))
    return text, next((m for m in names if isinstance(m, str) and m.strip()), target.module), reply.data


@documented("Chat with fallback", ("chat",), Operation(
    (returns(200, "The chat route answered, or its fallback did (`degraded`).", "ChatResponse"),
     Case("200", "`\"stream\": true`: the `stream` route's text as it comes; if it fails before its "
                 "first byte, the fallback's whole reply as one `delta` (`degraded`).",
          schema={"$ref": "#/components/schemas/ChatEvent"}, media_type=SSE, headers=STREAM_HEADERS),
     INVALID_JSON, VALIDATION,
     returns(503, "`chat_unavailable`: the chat route and its fallback both failed.", "ChatUnavailable"),
     error(503, "gateway_overloaded", "both routes failed only because the gateway is out of file "
                                      "descriptors or buffers; no module is at fault.")),
    description="Records the user message in the session (a new one when `session_id` is absent), "
                "calls the `chat` route with the message and a summary of the session, and on any "
                "failure its fallback. The reply is recorded in the session.",
    request_body=json_body("ChatRequest", {"message": "hello", "session_id": None})))
async def chat(req: Request[Runtime]) -> Response:
    started = time.perf_counter()
    rt = req.runtime
    body = req.json_object()
    problems = field_problems(body, _CHAT_FIELDS)
    if problems:
        raise validation_error(*problems)
    message = body["message"]
    problems = [(["body", name], f"must be at most {MAX_ID} characters")
                for name in ("session_id", "user_id") if len(body.get(name) or "") > MAX_ID]
    if not 1 <= len(message) <= MAX_MESSAGE:
        problems.insert(0, (["body", "message"], f"must be 1 to {MAX_MESSAGE} characters"))
    if problems:
        raise validation_error(*problems)
    sessions = rt.sessions
    try:
        session_id = sessions.open(body.get("session_id"), body.get("user_id"))
        sessions.append(session_id, "user", message, metadata=body.get("metadata"))
    except SessionsOverloaded as exc:
        raise HTTPError(503, GATEWAY_OVERLOADED, [(b"retry-after", b"1")], detail=str(exc)) from None
    # as Tentáculo Link sent them: a module may read body["metadata"].get(...)
    user_id = body.get("user_id")
    metadata = body.get("metadata")
    outgoing = {
        "message": message, "session_id": session_id, "user_id": DEFAULT_USER if user_id is None else user_id,
        "context_summary": sessions.context_summary(session_id), "metadata": {} if metadata is None else metadata,
        "correlation_id": req.correlation_id,
    }
    target = rt.settings.intent_target("chat")
    if body.get("stream"):
        return await _chat_stream(req, target, session_id, outgoing, started)
    answer: tuple[str, str, dict[str, Any]] | str = "no_target"
    answered_by, degraded = target, False
    failures = set()
    if target is not None:
        answer = await _ask(req, target, outgoing)
        if isinstance(answer, str) and target.fallback is not None:
            failures.add(answer)
            answered_by, degraded = target.fallback, True
            answer = await _ask(req, target.fallback, outgoing)
    if isinstance(answer, str):
        if failures | {answer} == {GATEWAY_OVERLOADED}:  # no module was at fault: say so
            raise HTTPError(503, GATEWAY_OVERLOADED, session_id=session_id,
                            detail="the gateway is out of connections to reach the chat modules")
        raise HTTPError(503, "chat_unavailable", session_id=session_id,
                        detail="neither the chat route nor its fallback answered")
    text, model, reply = answer
    assert answered_by is not None  # an answer came from the target or its fallback
    _record_reply(req, session_id, text, {"provider": answered_by.module, "model": model})
    ours = {
        "session_id": session_id, "response": text, "model_used": model, "provider": answered_by.module,
        "latency_ms": round((time.perf_counter() - started) * 1000, 3), "correlation_id": req.correlation_id,
        "status": "ok", "degraded": degraded,
    }
    # the module's other fields (tokens, sources, ...) reach the caller, as Tentáculo Link
    # passed the reply through; ours win a clash
    return json_response({**reply, **ours})


async def _chat_stream(req: Request[Runtime], chat_target: IntentTarget | None, session_id: str,
                       outgoing: dict[str, Any], started: float) -> Response:
    """``"stream": true``: SSE meta, delta..., done | error from the ``stream`` route; the
    chat's fallback answers (as one delta) if the stream fails before its first text."""
    rt = req.runtime
    target = rt.settings.intent_target("stream")
    if target is not None:
        try:
            return await streams.respond(req, 200, streams.SSE_TYPE,
                                         _streamed_reply(req, target, session_id, outgoing, started), started)
        except ModuleError as exc:
            log.warning("chat_route_failed", module=target.module, error=exc.code, correlation_id=req.correlation_id)
    fallback = chat_target.fallback if chat_target is not None else None
    answer = await _ask(req, fallback, outgoing) if fallback is not None else "no_target"
    if isinstance(answer, str) or fallback is None:
        raise HTTPError(503, "chat_unavailable", session_id=session_id,
                        detail="neither the stream route nor the chat fallback answered")
    text, model, _ = answer
    _record_reply(req, session_id, text, {"provider": fallback.module, "model": model})
    meta = {"session_id": session_id, "correlation_id": req.correlation_id, "provider": fallback.module}
    done = {"response": text, "model_used": model, "provider": fallback.module,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3), "degraded": True}
    return Response(200, b"".join((streams.sse("meta", meta), streams.sse("delta", {"text": text}),
                                   streams.sse("done", done))), list(streams.NO_BUFFERING), streams.SSE_TYPE)


async def _streamed_reply(req: Request[Runtime], target: IntentTarget, session_id: str, outgoing: dict[str, Any],
                          started: float) -> AsyncGenerator[bytes, None]:
    """The SSE answer relayed from ``target``. Until its first text, a failure is raised
    (for the fallback); after it, the stream ends with an ``error`` event."""
    rt = req.runtime
    # The reply kept for the session and the done event, in bytes as one str will occupy
    # them (chars x char_cost), at most KEPT_REPLY_SHARE of the reply limit and what a
    # session takes: a StringIO, not a list of deltas (a one-character delta is a 50-byte
    # object). The rest is relayed, not kept.
    kept = io.StringIO()
    chars, per_char, cut = 0, 1, False
    room = min(rt.settings.upstream_max_reply // KEPT_REPLY_SHARE, rt.sessions.max_text)
    stream = await rt.modules.stream(target.module, target.method, target.endpoint, json=outgoing,
                                     timeout=target.timeout, idle=rt.settings.stream_idle,
                                     correlation_id=req.correlation_id, share=req.share)
    try:
        deltas = _TextDeltas(stream.content_type or b"", target.module)
        if not 200 <= stream.status < 300:
            raise ModuleError("upstream_unavailable", target.module, f"{target.module} answered HTTP {stream.status}")
        async with aclosing(stream.body()) as body:
            async for chunk in body:
                texts = deltas.feed(chunk)
                if not texts:
                    continue
                out = []
                if not (chars or cut):
                    out.append(streams.sse("meta", {"session_id": session_id, "correlation_id": req.correlation_id,
                                                    "provider": target.module}))
                for text in texts:
                    if not cut:
                        per_char = max(per_char, char_cost(text))
                        part = text[:max(0, room // per_char - chars)]
                        kept.write(part)
                        chars += len(part)
                        cut = len(part) < len(text)
                    out.append(streams.sse("delta", {"text": text}))
                yield b"".join(out)
        if not (chars or cut):
            raise ModuleError("upstream_unavailable", target.module, f"{target.module} streamed no text")
    except ModuleError as exc:
        if not (chars or cut):
            raise
        log.warning("chat_stream_failed", module=target.module, error=exc.code, correlation_id=req.correlation_id)
        _record_reply(req, session_id, kept.getvalue(),
                      {"provider": target.module, "model": deltas.model or target.module, "incomplete": True})
        yield streams.sse("error", {"error": "chat_unavailable"})
        return
    finally:
        stream.close()
    text, model = kept.getvalue(), deltas.model or target.module
    kept.close()
    recorded: dict[str, Any] = {"provider": target.module, "model": model}
    done = {"model_used": model, "provider": target.module,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3), "degraded": False}
    if cut:  # the text kept is the start of what was relayed
        recorded["truncated"] = done["truncated"] = True
    _record_reply(req, session_id, text, recorded)
    # the response a piece at a time: one event of megabytes is not copied whole, thrice
    yield b'event: done\ndata: {"response":"'
    for start in range(0, len(text), VIEW_PIECE):
        yield orjson.dumps(text[start:start + VIEW_PIECE])[1:-1]
    yield b'",' + orjson.dumps(done)[1:] + b"\n\n"


def _record_reply(req: Request[Runtime], session_id: str, text: str, metadata: dict[str, Any]) -> None:
    """Record the assistant's reply; one the memory account has no room for is answered
    anyway, and logged."""
    try:
        req.runtime.sessions.append(session_id, "assistant", text, metadata=metadata)
    except SessionsOverloaded as exc:
        log.warning("session_reply_not_recorded", session_id=session_id, error=str(exc),
                    correlation_id=req.correlation_id)


class _TextDeltas:
    """The text in a module's stream: SSE ``data:`` lines holding JSON with ``text`` or
    ``delta`` (or plain text), or any other body as plain text. ``model`` is the last
    ``model_used``/``model`` named."""

    def __init__(self, content_type: bytes, module: str):
        self.sse = content_type.startswith(streams.SSE_TYPE)
        self.module = module
        self.model: str | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = b""

    def feed(self, chunk: bytes) -> list[str]:
        if not self.sse:
            text = self._decoder.decode(chunk)
            return [text] if text else []
        lines = (self._pending + chunk).split(b"\n")
        self._pending = lines.pop()
        if len(self._pending) > MAX_STREAM_LINE:
            raise ModuleError("upstream_unavailable", self.module, f"a stream line over {MAX_STREAM_LINE} bytes")
        return [text for text in map(self._line, lines) if text]

    def _line(self, line: bytes) -> str | None:
        if not line.startswith(b"data:"):
            return None  # event:, id:, retry:, comments and the blank line between events
        payload = line[5:].rstrip(b"\r")
        payload = payload[1:] if payload.startswith(b" ") else payload
        if payload == b"[DONE]":
            return None
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return payload.decode("utf-8", "replace")
        if isinstance(data, str):
            return data
        if not isinstance(data, dict):
            return payload.decode("utf-8", "replace")
        for key in ("model_used", "model"):
            if isinstance(data.get(key), str) and data[key].strip():
                self.model = data[key]
                break
        text = data.get("text", data.get("delta"))
        return text if isinstance(text, str) else None


@documented("One Context-7 session", ("chat",), Operation(
    (returns(200, "The session and its messages, oldest first. Reading is not activity.", "Session"), *NO_SESSION),
    parameters=(SESSION_ID,)))
async def session(req: Request[Runtime]) -> Response:
    sessions = req.runtime.sessions
    view = sessions.view(req.params["session_id"])
    if view is None:
        raise HTTPError(404, "session_not_found", session_id=req.params["session_id"])
    size = sessions.size_of(view["session_id"])
    if size <= STREAMED_VIEW:
        return json_response(view)
    # A large session is written a piece at a time as the caller reads it: building the
    # answer whole would hold another copy of the session for every reader (three readers
    # of a 16 MB session: +48 MB). The messages are the store's, counted once in the
    # account's "sessions" piece; the pieces waiting to be written are counted as a stream's
    # by the transport (at most 64 KiB each). Charging the reader the whole session as well
    # would count it twice and make a session larger than one connection's share unreadable.
    del view["messages"]
    head = orjson.dumps(view)[:-1] + b',"messages":['
    return StreamingResponse(200, head, [], chunks=_message_pieces(sessions.messages(view["session_id"])))


async def _message_pieces(messages: list[Message]) -> AsyncGenerator[bytes, None]:
    for i, m in enumerate(messages):
        yield b'%s{"role":%s,"timestamp":%d,"metadata":' % (b"," if i else b"", orjson.dumps(m.role), m.timestamp)
        metadata = memoryview(m.metadata or b"null")
        for start in range(0, len(metadata), VIEW_PIECE):
            yield bytes(metadata[start:start + VIEW_PIECE])
        yield b',"content":"'
        content = m.content
        for start in range(0, len(content), VIEW_PIECE):
            yield orjson.dumps(content[start:start + VIEW_PIECE])[1:-1]  # an escape never spans a cut
        yield b'"}'
    yield b"]}"


@documented("Delete a session", ("chat",), Operation(
    (Case("204", "Deleted."), *NO_SESSION), parameters=(SESSION_ID,)))
async def delete_session(req: Request[Runtime]) -> Response:
    if not req.runtime.sessions.delete(req.params["session_id"]):
        raise HTTPError(404, "session_not_found", session_id=req.params["session_id"])
    return empty_response(204)


@documented("Live Context-7 sessions", ("chat",), Operation((
    returns(200, "Live sessions.", "SessionList"),)))
async def sessions(req: Request[Runtime]) -> Response:
    return json_response(req.runtime.sessions.list_sessions())


@documented("Sweep expired sessions now", ("chat",), Operation(
    (returns(200, "Expired sessions removed; `total` counts the live ones left.", "SessionCleanup"),),
    description="What the sweep every CONTEXT7_CLEANUP_INTERVAL seconds does, at once "
                "(Tentáculo Link's troubleshooting guide names this call). Takes no body."))
async def cleanup(req: Request[Runtime]) -> Response:
    """Sweep expired sessions now (Tentáculo Link's troubleshooting guide names this call)."""
    sessions = req.runtime.sessions
    removed = sessions.sweep()
    return json_response({"status": "ok", "removed": removed, "total": len(sessions)})
