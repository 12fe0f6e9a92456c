"""The glue between the transport and the handlers: correlation id, CORS, routing, auth,
error rendering, metrics and the access log, the same for every request."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Coroutine

from .gateway import auth
from .http import cors
from .http.messages import HTTPError, Request, Response, empty_response, error_response
from .http.router import Router
from .http.server import WsHandler
from .log import address, client_log, log, traceback_text

if TYPE_CHECKING:
    from .runtime import Runtime


# Methods counted by name in metrics; anything a client invents is counted as "other" so
# that made-up methods cannot grow the metric series without bound.
_METHOD_LABELS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Refusals a client causes at will, logged at warning even without the access log (API.md §7).
JSON_COST = "json_cost"  # the refusals of JSON too costly to decode, in edgelink_budget_refusals_total
_LOGGED_REFUSALS = frozenset({"auth_required", "forbidden", "invalid_json"})

AUTH_STATUS = {"auth_required": 401, "forbidden": 403}


def _check_token(expected: str, provided: str | None) -> None:
    """The domain's refusal (gateway/auth.py) as the API.md §1 answer."""
    try:
        auth.check_token(expected, provided)
    except auth.AuthRefused as exc:
        raise HTTPError(AUTH_STATUS[exc.code], exc.code, detail=exc.detail) from None


def run_unsuspended(coro: Coroutine[Any, Any, Any]) -> Any:
    """The result of a coroutine that never suspends (a handler whose ``Route.suspends``
    is False), from its one step: no task, no turn of the loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("a coroutine expected never to suspend suspended")


class Dispatcher:
    def __init__(self, router: Router, runtime: "Runtime"):
        self.router = router
        self.runtime = runtime
        self.refusals = client_log  # per address and in total: a flood of bad tokens is a few lines

    def _admit(self, req: Request) -> None:
        """What every request gets first: the gateway state and its correlation id (kept
        when ``admit`` has already given it one)."""
        req.runtime = self.runtime
        if not req.correlation_id:
            req.correlation_id = auth.correlation_id(req.headers.get("x-correlation-id"))

    def _count(self, req: Request, status: int) -> str:
        route_label = req.route_template or "unmatched"
        method = req.method if req.method in _METHOD_LABELS else "other"
        self.runtime.metrics.requests.inc(route_label, method, str(status))
        return route_label

    def _refusal(self, req: Request, exc: HTTPError) -> Response:
        exc.extra.setdefault("correlation_id", req.correlation_id)
        if exc.status == 413:  # from a handler: a body too costly to decode (jsonbounds)
            self.runtime.metrics.budget_refusals.inc(JSON_COST)
        if exc.code in _LOGGED_REFUSALS:
            client = address(req.client)
            suppressed = self.refusals.allow(client)
            if suppressed is not None:
                log.warning("request_refused", status=exc.status, error=exc.code, client=client,
                            method=req.method, path=req.path, correlation_id=req.correlation_id,
                            detail=str(exc.extra.get("detail", "")), suppressed=suppressed)
        return exc.response()

    async def handle(self, req: Request) -> Response:
        outcome = self.respond(req)
        return outcome if isinstance(outcome, Response) else await outcome

    def respond(self, req: Request) -> Response | Coroutine[Any, Any, Response]:
        """The answer, or a coroutine to await for it when the handler may suspend: most of
        a request (routing, auth, refusals, handlers that never await) needs no task."""
        started = time.perf_counter()
        settings = self.runtime.settings
        self._admit(req)
        origin = req.headers.get("origin")
        preflight = req.method == "OPTIONS" and bool(settings.cors_origins) and origin is not None
        try:
            if preflight and origin is not None:  # (preflight implies an origin: for the checker)
                response = self._preflight(req, origin)
            else:
                route = req.admitted
                if route is None:  # not seen by admit (no body): matched and checked here
                    route, req.params = self.router.match(req.method, req.path)
                    req.route_template = route.template
                    if not route.public and settings.enable_auth:
                        _check_token(settings.token, req.headers.get("x-vx11-token"))
                if route.suspends:
                    return self._complete(req, route.handler, started, origin)
                response = run_unsuspended(route.handler(req))
        except (Exception, asyncio.CancelledError) as exc:
            response = self._failed(req, exc)
        return self._finish(req, response, started, origin, preflight)

    async def _complete(self, req: Request, handler: Callable[[Request], Awaitable[Response]], started: float,
                        origin: str | None) -> Response:
        # The handler is called here, not by respond: a coroutine the transport drops
        # unstarted (its caller gone) then never ran, nor left a handler coroutine behind.
        try:
            response = await handler(req)
        except (Exception, asyncio.CancelledError) as exc:
            response = self._failed(req, exc)
        return self._finish(req, response, started, origin, False)

    def _failed(self, req: Request, exc: BaseException) -> Response:
        """The answer to what a handler raised; a cancellation of the request itself goes on."""
        if isinstance(exc, HTTPError):
            return self._refusal(req, exc)
        if isinstance(exc, asyncio.CancelledError):
            current = asyncio.current_task()
            # Python 3.10 cannot tell the two apart (Task.cancelling is 3.11's): the
            # cancellation goes on, as asyncio's own code let it before 3.11.
            if current is not None and (sys.version_info < (3, 11) or current.cancelling()):
                raise exc  # this request is being cancelled (shutdown): nobody waits for an answer
            # Something the handler awaited was cancelled under it: still answer the client.
            log.error("handler_cancelled", path=req.path, method=req.method, correlation_id=req.correlation_id)
        else:  # a bug of ours: log it with the id, never show a traceback
            log.error("handler_failed", error=repr(exc), path=req.path, method=req.method,
                      correlation_id=req.correlation_id, traceback=traceback_text(exc))
        return error_response(500, "internal_error", correlation_id=req.correlation_id)

    def _finish(self, req: Request, response: Response, started: float, origin: str | None,
                preflight: bool) -> Response:
        req.release()  # the handler is done with the decoded body
        settings = self.runtime.settings
        response.headers.append((b"x-correlation-id", req.correlation_id.encode()))
        if settings.cors_origins and not preflight:  # a preflight answer carries its own
            response.headers.extend(cors.response_headers(settings.cors_origins, origin))
        elapsed = time.perf_counter() - started
        route_label = self._count(req, response.status)
        self.runtime.metrics.latency.observe(elapsed, route_label)
        if settings.access_log:
            log.info("access", method=req.method, path=req.path, status=response.status,
                     duration_ms=round(elapsed * 1000, 3), client=address(req.client),
                     correlation_id=req.correlation_id)
        return response

    def _preflight(self, req: Request, origin: str) -> Response:
        settings = self.runtime.settings
        found = self.router.lookup(req.path)
        if found is None:
            raise HTTPError(404, "not_found", detail=f"no route for {req.path}")
        req.route_template, allow = found
        if not cors.origin_allowed(settings.cors_origins, origin):
            raise HTTPError(403, "forbidden", detail="origin not allowed")
        return empty_response(204, cors.preflight_headers(settings.cors_origins, origin, allow,
                                                          req.headers.get("access-control-request-headers")))

    def admit(self, req: Request) -> Response | None:
        """Before a body is read or ``100 Continue`` is sent: refuse an unknown route, a
        wrong method or a missing token, so an unauthenticated client never makes us
        buffer its body. The accepted route is kept on the request (``admitted``), so
        ``respond`` does not match and check it again once the body is in."""
        settings = self.runtime.settings
        if req.method == "OPTIONS" and settings.cors_origins:
            return None  # a preflight is answered by handle
        started = time.perf_counter()
        self._admit(req)
        try:
            route, req.params = self.router.match(req.method, req.path)
            req.route_template = route.template
            if not route.public and settings.enable_auth:
                _check_token(settings.token, req.headers.get("x-vx11-token"))
        except HTTPError as exc:
            # counted, timed and access-logged like any answer
            return self._finish(req, self._refusal(req, exc), started, req.headers.get("origin"), False)
        req.admitted = route
        return None

    def refused(self, budget: str) -> None:
        self.runtime.metrics.budget_refusals.inc(budget)

    def websocket(self, req: Request) -> Response | WsHandler:
        """Decide on an upgrade before the handshake is answered: a Response refuses it."""
        settings = self.runtime.settings
        self._admit(req)
        try:
            route, req.params = self.router.match(req.method, req.path, websocket=True)
            req.route_template = route.template
            if self.runtime.stopping:
                raise HTTPError(503, "stopping", detail="the gateway is shutting down")
            if not cors.origin_allowed(settings.cors_origins, req.headers.get("origin")):
                raise HTTPError(403, "forbidden", detail="origin not allowed")
            if not route.public and settings.enable_auth:
                _check_token(settings.token, req.headers.get("x-vx11-token") or req.query.get("token"))
        except HTTPError as exc:
            self._count(req, exc.status)
            if exc.code not in _LOGGED_REFUSALS and client_log.allow(address(req.client)) is not None:
                log.info("websocket_refused", status=exc.status, error=exc.code, path=req.path,
                         correlation_id=req.correlation_id)
            response = self._refusal(req, exc)
            response.headers.append((b"x-correlation-id", req.correlation_id.encode()))
            return response
        self._count(req, 101)
        return route.handler
