"""The gateway's live state, shared by every handler as ``request.app``.

It owns the pieces that outlive a request (settings, metrics, module clients, sessions,
the ledger, the WebSocket hub, the health recorder) and starts and stops them in order.
"""

from __future__ import annotations

import asyncio
import time

from . import forward
from .config import Settings
from .forward.forwarder import Forwarder
from .gateway.metrics import Gauge, Registry
from .gateway.modules import Modules, Probe
from .gateway.observe import CardinalityCounter, CorrelationGraph
from .gateway.sessions import SessionStore, Sweeper
from .http.router import Router
from .hub import Hub
from .ledger import Ledger
from .log import log
from .probe import gateway_url, record_round

BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


class Runtime:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Registry()
        self.stopping = False
        self.port = settings.port  # the port actually bound, set once listening
        self.ledger = Ledger.from_settings(settings)
        self.hub = Hub(self.metrics, settings.ws_queue)
        self.cardinality = CardinalityCounter(time.time)
        self.correlations = CorrelationGraph(time.time)
        self.sessions = SessionStore.from_settings(settings)
        self.modules = self._modules(settings)
        self.forwarder: Forwarder | None = None  # set by start() when EDGELINK_FORWARD_URL is
        self.router: Router | None = None  # set by serve(); /openapi.json describes it
        self.openapi_cache: bytes | None = None
        self._sweeper = Sweeper(self.sessions, settings.context7_cleanup_interval)
        self._recorder: asyncio.Task[None] | None = None
        self._retired: list[Modules] = []  # clients replaced by a reload, still finishing calls
        self._closing: set[asyncio.Task[None]] = set()  # retired clients being closed
        self.metrics.add(Gauge("edgelink_ws_clients", "Connected WebSocket clients",
                               read=lambda: {(): len(self.hub.clients)}))
        self.metrics.add(Gauge("edgelink_breaker_state", "Circuit breaker state (0 closed, 1 half-open, 2 open)",
                               ("module",), read=self._breaker_states))
        self.metrics.add(Gauge("edgelink_context7_sessions", "Live Context-7 sessions",
                               read=lambda: {(): len(self.sessions)}))

    def _modules(self, settings: Settings) -> Modules:
        latency = self.metrics.upstream_latency
        return Modules(settings, observe=lambda module, outcome, seconds: latency.observe(seconds, module, outcome))

    def _breaker_states(self) -> dict[tuple[str, ...], float]:
        return {(name, ): BREAKER_STATES[b.state] for name, b in self.modules.breakers.items()}

    async def start(self) -> None:
        """Open what the handlers need before the first request."""
        await self.ledger.start()
        self._sweeper.start()
        s = self.settings
        if s.forward_url:
            target = forward.target(s)
            self.forwarder = Forwarder(
                self.ledger, lambda: forward.open_engine(s), self.metrics, engine=forward.SCHEMES[target.scheme][0],
                url=target.safe_url, edge_id=forward.edge_id(s), window=s.forward_window,
                ack_timeout=s.forward_ack_timeout, types=s.forward_types)
            await self.forwarder.start()

    def listening(self, port: int) -> None:
        """The server listens on ``port``: start recording health (the gateway's own row
        names the port it really has)."""
        self.port = port
        self._schedule_recorder()

    def _schedule_recorder(self) -> None:
        """Run the health recorder exactly when the probe interval says so (0 = off)."""
        on = self.settings.probe_interval > 0
        if on and self._recorder is None:
            self._recorder = asyncio.create_task(self._record_health(), name="health-recorder")
        elif not on and self._recorder is not None:
            self._recorder.cancel()
            self._recorder = None

    async def stop(self) -> None:
        """Flush and close, after the server has stopped serving."""
        if self._recorder is not None:
            self._recorder.cancel()
            await asyncio.gather(self._recorder, return_exceptions=True)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        await self._sweeper.stop()
        if self.forwarder is not None:
            await self.forwarder.stop()
        for modules in [self.modules, *self._retired]:
            await modules.close()
        self._retired.clear()
        await self.ledger.close()

    def apply(self, settings: Settings) -> None:
        """Take reloaded settings. Tokens, CORS, limits and routes are read per request;
        module URLs need a new client (breakers start closed again); the probe interval
        starts or stops the recorder."""
        old = self.settings
        self.settings = settings
        self.hub.hold_limit = settings.ws_queue
        self._schedule_recorder()
        if settings.modules != old.modules or (settings.breaker_failures, settings.breaker_recovery,
                                                settings.token) != (old.breaker_failures, old.breaker_recovery,
                                                                    old.token):
            previous, self.modules = self.modules, self._modules(settings)
            # Calls and probe rounds in flight finish on the old client; close it after the
            # longest of them could have ended (or at shutdown, whichever comes first).
            self._retired.append(previous)
            longest = max([settings.health_timeout, old.health_timeout, settings.proxy_timeout,
                           *(r.timeout for r in old.routes), *(r.fallback.timeout for r in old.routes if r.fallback)])
            asyncio.get_running_loop().call_later(longest + 1, self._close_retired, previous)

    def _close_retired(self, modules: Modules) -> None:
        if modules in self._retired:
            self._retired.remove(modules)
            # keep a reference: the loop holds tasks only weakly
            task = asyncio.get_running_loop().create_task(modules.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _self_probe(self) -> Probe:
        """The gateway's own row: it is serving, since it is the one recording."""
        status = "error" if self.stopping else "ok"
        return Probe({"status": status, "http_code": 503 if self.stopping else 200, "latency_ms": 0.0,
                      "url": gateway_url(self.settings, self.port), "error": "stopping" if self.stopping else None},
                     '{"status":"%s","module":"tentaculo_link"}' % ("stopping" if self.stopping else "ok"))

    async def _record_health(self) -> None:
        """Every probe interval: one probe round, written to the ledger's health tables."""
        while True:
            try:
                await record_round(self.modules, self.ledger, self._self_probe())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failed round is logged; the next one still runs
                log.error("health_record_failed", error=repr(exc))
            await asyncio.sleep(self.settings.probe_interval)
