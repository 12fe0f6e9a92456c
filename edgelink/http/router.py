"""Method + path -> handler. Paths may hold ``{param}`` segments that match one segment.

Static paths are a dict lookup; templated ones are tried in the order they were added.
A path that exists with other methods answers 405 with ``Allow``; HEAD follows GET.
A route may carry its documentation (``doc``, which openapi.py reads) and aliases: other
paths served by the same handler with the same documentation.
"""

from __future__ import annotations

import dis
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable

from .messages import HTTPError

Handler = Callable[..., Awaitable[Any]]

# The opcodes with which a coroutine can give control back to the loop (await, async
# with, async for); a handler whose code has none of them finishes in its first step.
_SUSPENDING = frozenset(dis.opmap[name] for name in (
    "GET_AWAITABLE", "SEND", "YIELD_VALUE", "BEFORE_ASYNC_WITH", "GET_AITER", "GET_ANEXT") if name in dis.opmap)


def may_suspend(handler: Handler) -> bool:
    """False only for an ``async def`` that never awaits: the dispatcher then runs it
    without a task. Anything else (a callable object, a partial) is assumed to suspend.

    The opcodes are read straight from the wordcode (every even byte is one): what
    ``dis.get_instructions`` would say, at a fiftieth of its cost (7 ms of the start-up)."""
    code = getattr(handler, "__code__", None)
    if code is None:
        return True
    return not _SUSPENDING.isdisjoint(code.co_code[::2])


@dataclass(frozen=True)
class Route:
    method: str  # "GET", "POST", ... or "WS" for a WebSocket endpoint (a GET with Upgrade)
    template: str
    handler: Handler
    public: bool = False
    summary: str = ""
    tags: tuple[str, ...] = ()
    doc: Any = field(default=None, compare=False)  # the OpenAPI operation (api/operation.py Operation)
    alias_of: str = ""  # the template this route repeats under another path
    segments: tuple[str, ...] = field(default=(), compare=False)
    suspends: bool = field(default=True, compare=False)  # see may_suspend

    @property
    def param_names(self) -> list[str]:
        return [s[1:-1] for s in self.segments if s.startswith("{")]


def _split(path: str) -> tuple[str, ...]:
    return tuple(path.strip("/").split("/")) if path.strip("/") else ()


class Router:
    def __init__(self) -> None:
        self.routes: list[Route] = []
        self._static: dict[str, dict[str, Route]] = {}
        self._dynamic: list[tuple[tuple[str, ...], dict[str, Route]]] = []

    def add(self, method: str, template: str, handler: Handler, *, public: bool = False, summary: str = "",
            tags: tuple[str, ...] = (), doc: Any = None, aliases: tuple[str, ...] = ()) -> None:
        route = self._add(Route(method.upper(), template, handler, public, summary, tags, doc))
        for alias in aliases:
            self._add(Route(route.method, alias, handler, public, summary, tags, doc, alias_of=template))

    def _add(self, route: Route) -> Route:
        template = route.template
        segments = _split(template)
        route = replace(route, segments=segments, suspends=may_suspend(route.handler))
        if any(s.startswith("{") for s in segments):
            for segs, methods in self._dynamic:
                if segs == segments:
                    break
            else:
                methods = {}
                self._dynamic.append((segments, methods))
        else:
            methods = self._static.setdefault("/" + "/".join(segments), {})
        if route.method in methods:
            raise ValueError(f"duplicate route {route.method} {template}")
        methods[route.method] = route
        self.routes.append(route)
        return route

    def _methods_for(self, path: str) -> tuple[dict[str, Route], dict[str, str]] | None:
        norm = "/" + path.strip("/") if path != "/" else "/"
        found = self._static.get(norm)
        if found is not None:
            return found, {}
        parts = _split(path)
        for segments, methods in self._dynamic:
            if len(segments) != len(parts):
                continue
            params: dict[str, str] = {}
            for seg, part in zip(segments, parts):
                if seg.startswith("{"):
                    if not part:
                        break
                    params[seg[1:-1]] = part
                elif seg != part:
                    break
            else:
                return methods, params
        return None

    def match(self, method: str, path: str, websocket: bool = False) -> tuple[Route, dict[str, str]]:
        """The route and path params, or HTTPError 404 / 405 (with Allow)."""
        found = self._methods_for(path)
        if found is None:
            raise HTTPError(404, "not_found", detail=f"no route for {path}")
        methods, params = found
        wanted = "WS" if websocket else ("GET" if method == "HEAD" else method)
        route = methods.get(wanted)
        if route is None and not websocket and method in ("GET", "HEAD") and "WS" in methods:
            raise HTTPError(426, "upgrade_required", headers=[(b"upgrade", b"websocket")],
                            detail="this endpoint is a WebSocket: send an Upgrade request")
        if route is None:
            raise HTTPError(405, "method_not_allowed", headers=[(b"allow", self.allow(methods).encode())],
                            detail=f"{method} is not allowed on {path}")
        return route, params

    def lookup(self, path: str) -> tuple[str, str] | None:
        """(template, Allow value) for a path, or None if no route has it (CORS preflight)."""
        found = self._methods_for(path)
        if found is None:
            return None
        methods = found[0]
        return next(iter(methods.values())).template, self.allow(methods)

    @staticmethod
    def allow(methods: dict[str, Route]) -> str:
        names = {"GET" if m == "WS" else m for m in methods}
        if "GET" in names:
            names.add("HEAD")
        return ", ".join(sorted(names))
