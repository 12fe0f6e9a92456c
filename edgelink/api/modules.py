"""Health aggregation, breakers, the route table, intents and module proxies (API.md §2, §3)."""

from __future__ import annotations

import time
from contextlib import aclosing
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, AsyncGenerator

from ..config import KNOB, IntentTarget
from ..http.messages import HTTPError, Request, Response, json_response
from ..modules import ModuleError, ModuleReply, ModuleStream
from . import streams
from .operation import (
    INVALID_JSON,
    SSE,
    STREAM_HEADERS,
    UPSTREAM_CASES,
    VALIDATION,
    Case,
    Operation,
    documented,
    error,
    json_body,
    path_param,
    query_param,
    returns,
)

if TYPE_CHECKING:
    from ..runtime import Runtime

GATEWAY = {"module": "tentaculo_link", "version": "7.0"}
# the HTTP answer to a module call that got no usable reply (API.md §3)
MODULE_ERROR_STATUS = {"upstream_unavailable": 502, "circuit_open": 503, "module_disabled": 503,
                       "upstream_timeout": 504, "gateway_overloaded": 503, "invalid_json": 400}
# what a proxy endpoint answers: the module's reply, whatever it is
PROXY = Operation((returns(200, "The module's reply.", "ModuleReply"), *UPSTREAM_CASES), forwards=True)


def module_error(exc: ModuleError) -> HTTPError:
    # an open breaker also says "status": "circuit_open" in its body (API.md §2)
    body = {"status": "circuit_open"} if exc.code == "circuit_open" else None
    headers = [(b"retry-after", b"1")] if exc.code == "gateway_overloaded" else ()
    return HTTPError(MODULE_ERROR_STATUS[exc.code], exc.code, headers, body=body, module=exc.module,
                     detail=exc.detail)


async def call(req: Request[Runtime], target: IntentTarget, body: Any) -> ModuleReply:
    """Call an intent's target; ModuleError is left to the caller, which may fall back."""
    return await req.runtime.modules.call(target.module, target.method, target.endpoint, json=body,
                                          timeout=target.timeout, correlation_id=req.correlation_id,
                                          share=req.share)


def _counted(health: dict[str, dict[str, Any]]) -> tuple[int, int]:
    """(healthy, total) over enabled modules: disabled ones are listed, not counted."""
    enabled = [h for h in health.values() if h["status"] != "disabled"]
    return sum(1 for h in enabled if h["status"] == "ok"), len(enabled)


async def _health(rt: Runtime) -> dict[str, dict[str, Any]]:
    """Every module's ModuleHealth with its health prediction's trend and score (API.md §11)."""
    health = await rt.modules.check_all()
    prediction = rt.prediction
    prediction.tick(time.monotonic())
    for name, entry in health.items():
        entry["trend"] = prediction.trend(name)
        entry["anomaly_score"] = prediction.score(name)
    return health


@documented("Gateway and module health", ("modules",), Operation((
    returns(200, f"Every module probed concurrently (`GET <url>/health`, each bounded by "
               f"{KNOB['health_timeout'].quote()}); concurrent callers share one probe round.", "Status"),)))
async def status(req: Request[Runtime]) -> Response:
    rt = req.runtime
    health = await _health(rt)
    healthy, total = _counted(health)
    ports: dict[str, int] = {m.name: m.port for m in rt.settings.modules}
    ports.update(tentaculo_link=rt.port, gateway=rt.port)
    return json_response({
        "ok": True, "status": "ok", **GATEWAY,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "ports": ports,
        "modules": health,
        "summary": {"healthy_modules": healthy, "total_modules": total, "all_healthy": healthy == total},
    })


@documented("Module health overview", ("modules",), Operation((
    returns(200, "Every module probed, as `GET /vx11/status` does.", "Overview"),)))
async def overview(req: Request[Runtime]) -> Response:
    health = await _health(req.runtime)
    healthy, total = _counted(health)
    return json_response({
        "status": "ok", "gateway": "tentaculo_link", "version": "7.0", "modules_health": health,
        "summary": {"total_modules": total, "healthy": healthy, "unhealthy": total - healthy},
    })


@documented("Circuit breaker per module", ("modules",), Operation((
    returns(200, "One breaker per enabled module.", "BreakerStatus"),)))
async def breakers(req: Request[Runtime]) -> Response:
    return json_response(req.runtime.modules.breaker_status())


def _target_body(target: IntentTarget) -> dict[str, Any]:
    fallback = target.fallback
    return {
        "module": target.module, "endpoint": target.endpoint, "method": target.method, "timeout": target.timeout,
        "description": target.description, "auth_required": target.auth_required, "stream": target.stream,
        "fallback": None if fallback is None else {
            "module": fallback.module, "endpoint": fallback.endpoint, "method": fallback.method,
            "timeout": fallback.timeout},
    }


@documented("The intent route table", ("modules",), Operation((
    returns(200, "The route table, intent -> module.", "Routes"),)))
async def intent_table(req: Request[Runtime]) -> Response:
    return json_response({"routes": {t.intent: _target_body(t) for t in req.runtime.settings.intents}})


@documented("Forward an intent to its module", ("modules",), Operation(
    (returns(200, "The module's reply.", "ModuleReply"),
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
async def intent(req: Request[Runtime]) -> Response:
    started = time.perf_counter()
    rt = req.runtime
    target = rt.settings.intent_target(req.params["intent"])
    if target is None:
        raise HTTPError(404, "unknown_intent", detail=f"no route for intent {req.params['intent']!r}",
                        known=[t.intent for t in rt.settings.intents])
    body = req.json_object() if req.body.strip() else {}
    try:
        try:
            if target.stream:
                return await _relay(req, target, body, started)
            reply = await call(req, target, body)
            failed = reply.status >= 500
        except ModuleError:
            if target.fallback is None:
                raise
            failed = True
        if failed and target.fallback is not None:
            # the fallback answers for a primary that is down or failing (5xx), as chat does
            reply = await call(req, target.fallback, body)
    except ModuleError as exc:
        raise module_error(exc) from None
    return _forwarded(reply)


def _forwarded(reply: ModuleReply) -> Response:
    # the module's own bytes, already checked to be JSON: encoding the parsed value again
    # would cost another copy of a reply of up to 8 MiB
    return Response(reply.status, reply.raw)


async def _relay(req: Request[Runtime], target: IntentTarget, body: Any, started: float) -> Response:
    """A streaming route: the module's reply passed on as it arrives (API.md §3)."""
    rt = req.runtime
    stream = await rt.modules.stream(target.module, target.method, target.endpoint, json=body, timeout=target.timeout,
                                     idle=rt.settings.stream_idle, correlation_id=req.correlation_id,
                                     share=req.share)
    try:
        if stream.status >= 500 and target.fallback is not None:
            raise ModuleError("upstream_unavailable", target.module, f"{target.module} answered HTTP {stream.status}")
        content_type = stream.content_type or b"application/octet-stream"
        return await streams.respond(req, stream.status, content_type,
                                     _passthrough(stream, content_type.startswith(streams.SSE_TYPE)), started)
    except BaseException:
        stream.close()
        raise


async def _passthrough(stream: ModuleStream, sse: bool) -> AsyncGenerator[bytes, None]:
    """The module's chunks. A failure after the first one ends an SSE stream with an
    ``error`` event, and any other body truncated (the server sends no last chunk)."""
    sent = False
    try:
        async with aclosing(stream.body()) as body:
            async for chunk in body:
                sent = True
                yield chunk
    except ModuleError as exc:
        if not sse or not sent:
            raise
        # a blank line first ends whatever event the module had half sent
        yield b"\n\n" + streams.sse("error", {"error": exc.code, "module": exc.module, "detail": exc.detail})


async def _proxy(req: Request[Runtime], module: str, path: str, method: str = "GET", body: Any = None) -> Response:
    rt = req.runtime
    try:
        reply = await rt.modules.call(module, method, path, json=body, timeout=rt.settings.proxy_timeout,
                                      correlation_id=req.correlation_id, share=req.share)
    except ModuleError as exc:
        raise module_error(exc) from None
    return _forwarded(reply)


@documented("Proxy: shubniggurath dashboard", ("modules",), Operation(
    PROXY.cases, description="Calls shubniggurath `POST /shub/dashboard` with the body `{}`, as Tentáculo "
                             "Link did.", forwards=True))
async def shub_dashboard(req: Request[Runtime]) -> Response:
    # as Tentáculo Link called it: POST with an empty object
    return await _proxy(req, "shubniggurath", "/shub/dashboard", "POST", {})


@documented("Proxy: hermes resources", ("modules",), PROXY)
async def resources(req: Request[Runtime]) -> Response:
    return await _proxy(req, "hermes", "/hermes/resources")


@documented("Proxy: hormiguero queen status", ("modules",), PROXY)
async def queen_status(req: Request[Runtime]) -> Response:
    return await _proxy(req, "hormiguero", "/queen/status")


@documented("Proxy: hormiguero report", ("modules",), Operation(
    (returns(200, "The module's reply.", "ModuleReply"), VALIDATION, *UPSTREAM_CASES),
    parameters=(query_param("limit", "How many report entries to ask the module for.",
                            {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50}),),
    forwards=True))
async def hormiguero_report(req: Request[Runtime]) -> Response:
    limit = req.int_query("limit", 50, 1, 1000)
    return await _proxy(req, "hormiguero", f"/report?limit={limit}")
