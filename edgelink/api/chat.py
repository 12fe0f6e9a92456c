"""Chat with fallback and the Context-7 session endpoints (API.md §4)."""

from __future__ import annotations

import time
from typing import Any

from ..config import Intent
from ..modules import GATEWAY_OVERLOADED
from ..http.messages import HTTPError, Request, Response, check_fields, empty_response, json_response, \
    validation_error
from ..log import log
from ..modules import ModuleError
from .modules import call

MAX_MESSAGE = 32_768
MAX_ID = 256  # session_id and user_id (API.md §4): both are stored with the session
_CHAT_FIELDS = {"message": (str, True), "session_id": (str, False), "user_id": (str, False),
                "metadata": (dict, False)}
_TEXT_KEYS = ("response", "message", "text", "content")


def _reply_text(data: Any) -> str | None:
    """The module's answer text: ``response``, else ``message``, ``text``, ``content``."""
    if isinstance(data, dict):
        for key in _TEXT_KEYS:
            value = data.get(key)
            if isinstance(value, str) and value.strip():
                return value
    return None


async def _ask(req: Request, route: Intent, body: dict[str, Any]) -> tuple[str, str] | str:
    """(text, model) from one route, or the error code if it failed in any way (logged)."""
    rt = req.runtime
    try:
        reply = await call(req, route, body)
    except ModuleError as exc:
        log.warning("chat_route_failed", module=route.module, error=exc.code, correlation_id=req.correlation_id)
        return exc.code
    text = _reply_text(reply.data) if 200 <= reply.status < 300 else None
    if text is None:
        log.warning("chat_route_failed", module=route.module, error="no_text", http_code=reply.status,
                    correlation_id=req.correlation_id)
        return "no_text"
    # model_used, else model, else the provider name: a value that is not a name (a number,
    # an object, blank) counts as absent, as for the text keys.
    names = (reply.data.get(key) for key in ("model_used", "model"))
    return text, next((m for m in names if isinstance(m, str) and m.strip()), route.module)


async def chat(req: Request) -> Response:
    started = time.perf_counter()
    rt = req.runtime
    body = req.json_object()
    check_fields(body, _CHAT_FIELDS)
    message = body["message"]
    problems = [(["body", name], f"must be at most {MAX_ID} characters")
                for name in ("session_id", "user_id") if len(body.get(name) or "") > MAX_ID]
    if not 1 <= len(message) <= MAX_MESSAGE:
        problems.insert(0, (["body", "message"], f"must be 1 to {MAX_MESSAGE} characters"))
    if problems:
        raise validation_error(*problems)
    sessions = rt.sessions
    session_id = sessions.open(body.get("session_id"), body.get("user_id"))
    sessions.append(session_id, "user", message, metadata=body.get("metadata"))
    outgoing = {
        "message": message, "session_id": session_id, "user_id": body.get("user_id"),
        "context_summary": sessions.context_summary(session_id), "metadata": body.get("metadata"),
        "correlation_id": req.correlation_id,
    }
    route = rt.settings.route("chat")
    answer: tuple[str, str] | str = "no_route"
    answered_by, degraded = route, False
    failures = set()
    if route is not None:
        answer = await _ask(req, route, outgoing)
        if isinstance(answer, str) and route.fallback is not None:
            failures.add(answer)
            answered_by, degraded = route.fallback, True
            answer = await _ask(req, route.fallback, outgoing)
    if isinstance(answer, str):
        if failures | {answer} == {GATEWAY_OVERLOADED}:  # no module was at fault: say so
            raise HTTPError(503, GATEWAY_OVERLOADED, session_id=session_id,
                            detail="the gateway is out of connections to reach the chat modules")
        raise HTTPError(503, "chat_unavailable", session_id=session_id,
                        detail="neither the chat route nor its fallback answered")
    text, model = answer
    sessions.append(session_id, "assistant", text,
                    metadata={"provider": answered_by.module, "model": model})
    return json_response({
        "session_id": session_id, "response": text, "model_used": model, "provider": answered_by.module,
        "latency_ms": round((time.perf_counter() - started) * 1000, 3), "correlation_id": req.correlation_id,
        "status": "ok", "degraded": degraded,
    })


async def session(req: Request) -> Response:
    view = req.runtime.sessions.view(req.params["session_id"])
    if view is None:
        raise HTTPError(404, "session_not_found", session_id=req.params["session_id"])
    return json_response(view)


async def delete_session(req: Request) -> Response:
    if not req.runtime.sessions.delete(req.params["session_id"]):
        raise HTTPError(404, "session_not_found", session_id=req.params["session_id"])
    return empty_response(204)


async def sessions(req: Request) -> Response:
    return json_response(req.runtime.sessions.list_sessions())
