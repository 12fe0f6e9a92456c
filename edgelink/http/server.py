"""The HTTP/1.1 listener: the listening sockets, the set of live connections, the memory
account they draw from and the overload state; it knows nothing of routes.

A connection is an ``HttpProtocol`` (connection.py: the phases of one exchange after
another; the head's limits and refusals in head.py, the body in body.py, its answers
written by writer.py, its timer in timer.py) until an upgrade hands it over to a
``WebSocketProtocol`` (upgrade.py) with ``transport.set_protocol``; both are a ``Connection`` to the listener and
to the overload manager. Shutdown closes the listener (a connection it had accepted still
has its request answered); the server refuses connections itself with 503 (counted, logged
at most once a second) when the connection limit is reached.

The loop and the clock are parameters (the running loop and ``time.monotonic`` by default),
so that tests drive a connection with a loop whose timers they advance
(tests/memtransport.py).
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any, Callable, Coroutine, Protocol

from ..account import BODIES, Account
from ..log import address, log
from .connection import HttpProtocol
from .messages import Request, Response
from .upgrade import WsHandler


class Dispatcher(Protocol):
    """What the server needs from the application."""

    def respond(self, request: Request) -> Response | Coroutine[Any, Any, Response]:
        """The answer, or a coroutine to run in a task for it."""

    def websocket(self, request: Request) -> Response | WsHandler: ...

    def admit(self, request: Request) -> Response | None:
        """Before its body is read: a Response refuses the request, None lets it in; the
        body is held only if ``request.admitted`` is then set (a route that takes one)."""

    def refused(self, budget: str) -> None:
        """Count one refusal by a transport budget (``request_line``, ``connections``, ...)."""


class OverloadCounter(Protocol):
    """What the server needs from the overload manager (overload.py, above http/)."""

    def count(self, action: str, n: int = 1) -> None: ...


class Connection(Protocol):
    """A live connection as the listener and the overload manager see it, HTTP or WebSocket."""

    @property
    def busy(self) -> bool:
        """Whether shutdown waits for it (a request in flight, a WebSocket closing)."""

    def held_bytes(self) -> int:
        """Its share of the account and what waits in its buffers."""

    def overload_reading(self, on: bool) -> bool:
        """Stop (or resume) reading; whether it was stopped."""

    def begin_shutdown(self) -> None: ...

    def finish(self) -> None:
        """At the end of the shutdown grace: close if idle, else drop."""

    def abort(self) -> None: ...


class HttpServer:
    """Owns the listening sockets and the set of live connections; knows nothing of routes."""

    def __init__(self, dispatcher: Dispatcher, settings: Any, account: Account | None = None, *,
                 loop: asyncio.AbstractEventLoop | None = None, clock: Callable[[], float] = time.monotonic):
        self.dispatcher = dispatcher
        self._loop = loop  # None: the loop running when the first connection is made
        self.clock = clock
        self.settings = settings
        # The one account of bytes held for others (account.py); each connection opens its
        # share of it. A server on its own (the demo modules, benches) keeps its own.
        if account is None:
            account = Account(settings.memory_budget, settings.client_share)
            account.limit(BODIES, settings.max_bodies)
        self.account = account
        # Set by the overload manager (overload.py) while resident memory is over the soft
        # mark: no new body, stream or WebSocket is accepted. ``overload`` counts what it refuses.
        self.overloaded = False
        self.overload: OverloadCounter | None = None
        self.connections: set[Connection] = set()
        self.stopping = False
        self._servers: list[asyncio.Server] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self._refused_since_log = 0
        self._refusal_logged_at = -1.0

    def refuse_connection(self, client: tuple[str, int] | None) -> None:
        """Count a connection refused at the limit; log at most once a second, with the
        number refused since, so that a flood of connections is not a flood of lines."""
        self.dispatcher.refused("connections")
        self._refused_since_log += 1
        now = self.clock()
        if now - self._refusal_logged_at >= 1.0:
            log.warning("connection_refused", reason="too_many_connections", client=address(client),
                        refused=self._refused_since_log, limit=self.settings.max_connections)
            self._refused_since_log = 0
            self._refusal_logged_at = now

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def start(self, host: str | None = None, port: int = 0,
                    socks: list[socket.socket] | None = None) -> None:
        """Listen on ``host:port``, or on already-bound sockets (systemd socket activation)."""
        loop = self.loop
        if socks:
            for sock in socks:
                self._servers.append(await loop.create_server(self._make_protocol, sock=sock, backlog=1024))
        else:
            self._servers.append(await loop.create_server(self._make_protocol, host, port,
                                                          reuse_address=True, backlog=1024))

    @property
    def sockets(self) -> list[socket.socket]:
        return [sock for server in self._servers for sock in server.sockets]

    def _make_protocol(self) -> HttpProtocol:
        return HttpProtocol(self)

    def busy_changed(self) -> None:
        if self.stopping and not any(c.busy for c in self.connections):
            self._idle.set()

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, close WebSockets with 1001, let requests in flight finish within
        ``grace`` seconds, then drop whatever is left."""
        self.stopping = True
        for server in self._servers:
            server.close()
        # Connections the listener accepted before it closed get connection_made in a later
        # callback: let them in, so that their requests are waited for and answered too.
        await asyncio.sleep(0)
        for conn in list(self.connections):
            conn.begin_shutdown()
        if any(c.busy for c in self.connections):
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except asyncio.TimeoutError:
                log.warning("shutdown_grace_expired", connections=len(self.connections))
        for conn in list(self.connections):
            conn.finish()
        # Give closed transports one loop turn to run connection_lost.
        await asyncio.sleep(0)
