"""The gateway's live state, shared by every handler as ``request.runtime``.

It owns the pieces that outlive a request (settings, metrics, module clients, sessions,
the ledger, the WebSocket hub, the health recorder) and starts and stops them in order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Callable

from . import forward
from .account import PIECES, Account, Share
from .config import MODULES_PIECE, REBUILD, RESTART, Settings, changed
from .forward.forwarder import Forwarder
from .gateway.events import SCHEMAS
from .gateway.health import HealthCheck
from .gateway.metrics import Registry
from .gateway.observe import CardinalityCounter, CorrelationGraph
from .gateway.prediction import CALL, CHECK, DEGRADING, HealthPredictor
from .gateway.sessions import SessionStore
from .http.router import Router
from .http.server import HttpServer
from .hub import Hub
from .ledger import Ledger
from .log import configure, log
from .modules import Modules
from .periodic import Periodic
from .procfs import process_stats
from .runtime_truth import GATEWAY_SERVICE, gateway_url, record_round

BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
# the account's pieces (API.md §1 "one account"), each exported from the start, at 0
# upstream call outcomes that are refusals by a budget of the gateway's, by budget name
BUDGET_OUTCOMES = {"local": "file_descriptors", "too_large": "module_reply", "too_costly": "module_reply"}


def session_store(settings: Settings, share: Share | None = None,
                  now: Callable[[], float] = time.time) -> SessionStore:
    """The Context-7 store with the bounds the settings give (API.md §4)."""
    return SessionStore(ttl=settings.context7_ttl_seconds, max_sessions=settings.context7_max_sessions,
                        max_messages=settings.context7_max_messages, max_bytes=settings.context7_max_bytes,
                        now=now, share=share)


class Runtime:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Registry(process_stats)
        # The one account of bytes held for others: each connection opens its share of it,
        # every piece asks it before holding bytes; refusals are counted by piece.
        self.account = Account(settings.memory_budget, settings.client_share, self.metrics.budget_refusals.inc)
        self.account.limit("bodies", settings.max_bodies)
        for piece in PIECES:
            self.metrics.budget_refusals.inc(piece, amount=0)
        self.stopping = False
        self.port = settings.port  # the port actually bound, set once listening
        self.ledger = Ledger.from_settings(settings)
        self.hub = Hub(self.metrics, settings.ws_queue, settings.ws_queue_bytes)
        self.metrics.events.known(*((t, outcome) for t in SCHEMAS for outcome in ("accepted", "rejected")),
                                  ("non_canonical", "accepted"), ("invalid", "rejected"))
        self._module_up: dict[str, bool] = {}  # each module's last recorded check verdict, to log changes once
        self.cardinality = CardinalityCounter(time.time)
        self.correlations = CorrelationGraph(time.time)
        # stored session text draws from the account like every other piece (API.md §1)
        self.sessions = session_store(settings, share=self.account.open(limited=False))
        self.prediction = HealthPredictor(self._predicted(settings), settings.prediction_window,
                                          on_change=self._trend_changed)
        self.modules = self._modules(settings)
        self.forwarder: Forwarder | None = None  # set by start() when EDGELINK_FORWARD_URL is
        self.router: Router | None = None  # set by serve(); /openapi.json describes it
        self.server: HttpServer | None = None  # set by serve(); takes new limits on reload
        self.openapi_cache: bytes | None = None
        self.openapi_gzip = b""  # openapi_cache compressed, made with it
        self._sweeper = Periodic("context7-sweeper", settings.context7_cleanup_interval, self._sweep_sessions,
                                 failed_event="session_sweep_failed")
        self._recorder: asyncio.Task[None] | None = None
        self._retired: list[Modules] = []  # clients replaced by a reload, still finishing calls
        self._closing: set[asyncio.Task[None]] = set()  # retired clients being closed
        # what a reload rebuilds, by the piece name the settings table gives (Knob.piece)
        self.rebuilders: dict[str, Callable[[Settings, Settings], None]] = {MODULES_PIECE: self._rebuild_modules}
        self.metrics.gauge("edgelink_budget_bytes", read=self._account_held)
        self.metrics.gauge("edgelink_budget_limit_bytes", read=lambda: {(): self.account.total})
        self.metrics.gauge("edgelink_ws_clients", read=lambda: {(): len(self.hub.clients)})
        self.metrics.gauge("edgelink_ws_queued_bytes", read=lambda: {(): self.hub.queued_bytes()})
        self.metrics.gauge("edgelink_breaker_state", read=self._breaker_states)
        self.metrics.gauge("edgelink_context7_sessions", read=lambda: {(): len(self.sessions)})
        self.metrics.gauge("edgelink_ledger_pruned_events_total",
                           read=lambda: {(k,): v for k, v in self.ledger.pruned.items()})
        self.metrics.gauge("edgelink_ledger_write_failures_total", read=lambda: {(): self.ledger.write_failures})
        self.metrics.gauge("edgelink_module_anomaly_score", read=lambda: self._predicted_values(self.prediction.score))
        self.metrics.gauge("edgelink_module_degrading", read=lambda: self._predicted_values(self._degrading))
        self.ledger.on_commit = self._observe_commit

    def _modules(self, settings: Settings) -> Modules:
        modules = Modules(settings, observe=self._upstream_call, on_breaker=self._breaker_changed,
                          checked=self._checked)
        self.metrics.breaker_transitions.known(*((name, to) for name in modules.breakers for to in BREAKER_STATES))
        return modules

    def _breaker_changed(self, module: str, old: str, new: str) -> None:
        """Counted; logged when the module goes down (opens from closed) or comes back
        (closes), not at each failed trial of an open breaker."""
        self.metrics.breaker_transitions.inc(module, new)
        if new == "open" and old == "closed":
            log.warning("module_down", module=module, by="breaker", detail="circuit breaker opened")
        elif new == "closed":
            log.info("module_up", module=module, by="breaker", detail="circuit breaker closed")
        else:  # cooling to half-open, a failed trial opening it again: the module stays down
            log.debug("breaker_state_changed", module=module, before=old, after=new)

    def _log_up_down(self, checks: dict[str, HealthCheck]) -> None:
        """Log a module whose health check verdict changed since the last round, once per change
        (a first round logs only the modules that are down)."""
        for name, check in checks.items():
            up = check.status == "ok"
            before = self._module_up.get(name)
            self._module_up[name] = up
            if before is None and up or before == up:
                continue
            if up:
                log.info("module_up", module=name, by="probe", status=check.status)
            else:
                log.warning("module_down", module=name, by="probe", status=check.status,
                            detail=check.error or f"HTTP {check.http_code}")

    @staticmethod
    def _predicted(settings: Settings) -> list[str]:
        return [m.name for m in settings.modules if m.enabled]

    def _predicted_values(self, value: Callable[[str], float]) -> dict[tuple[str, ...], float]:
        self.prediction.tick(time.monotonic())
        return {(name,): value(name) for name in self.prediction.modules()}

    def _degrading(self, module: str) -> int:
        return int(self.prediction.trend(module) == DEGRADING)

    def _upstream_call(self, module: str, outcome: str, seconds: float) -> None:
        self.metrics.upstream_latency.observe(seconds, module, outcome)
        budget = BUDGET_OUTCOMES.get(outcome)
        if budget is not None:
            self.metrics.budget_refusals.inc(budget)
        if outcome != "local":  # the gateway's own limit says nothing about the module
            self.prediction.observe(module, CALL, time.monotonic(), seconds * 1000 if outcome == "ok" else None)

    def _checked(self, check: HealthCheck) -> None:
        self.prediction.observe(check.service, CHECK, time.monotonic(),
                                check.latency_ms if check.status == "ok" else None)

    @staticmethod
    def _trend_changed(module: str, before: str, after: str, score: float) -> None:
        if DEGRADING in (before, after):  # entering and leaving degrading, once each (API.md §11)
            log.log("warning" if after == DEGRADING else "info", "module_trend_changed", module=module,
                    before=before, after=after, anomaly_score=score)

    def _observe_commit(self, seconds: float, writes: int) -> None:
        # called on the ledger's writer thread: the histograms' one series already exists
        self.metrics.ledger_commit.observe(seconds)
        self.metrics.ledger_batch.observe(writes)

    def _account_held(self) -> dict[tuple[str, ...], float]:
        held: dict[tuple[str, ...], float] = {(piece,): 0.0 for piece in PIECES}
        held.update({(piece,): n for piece, n in self.account.held.items()})
        return held

    def _sweep_sessions(self) -> None:
        removed = self.sessions.sweep()
        if removed:
            log.debug("session_sweep", removed=removed)

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
                window_bytes=s.forward_window_bytes,
                ack_timeout=s.forward_ack_timeout, types=s.forward_types)
            await self.forwarder.start()

    def listening(self, port: int) -> None:
        """The server listens on ``port``: start recording health (the gateway's own row
        names the port it really has)."""
        self.port = port
        self._schedule_recorder()

    def _schedule_recorder(self) -> None:
        """Run the health recorder exactly when EDGELINK_PROBE_INTERVAL says so (0 = off)."""
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

    def apply(self, new: Settings) -> list[str]:
        """Take reloaded settings as the settings table (config.KNOBS) says: ``restart``
        knobs keep their running values (logged), ``rebuild`` knobs rebuild the piece holding
        a copy, ``live`` ones are read from ``self.settings`` when used or handed over here.
        Returns the names of the settings that changed and were applied (environment name,
        or the TOML table for modules and routes)."""
        old = self.settings
        knobs = list(changed(old, new))
        applied = [k.env[0] if k.env else k.toml for k in knobs if k.reload != RESTART]
        # the TOML tables by their names in the file: [routes.<intent>] is the intent table
        applied += [table for table, field in (("modules", "modules"), ("routes", "intents"))
                    if getattr(new, field) != getattr(old, field)]
        fixed = [k.name for k in knobs if k.reload == RESTART]
        if fixed:
            log.warning("reload_needs_restart", settings=fixed, detail="these keep their running values")
            new = dataclasses.replace(new, **{name: getattr(old, name) for name in fixed})
        pieces = {k.piece for k in knobs if k.reload == REBUILD}
        if new.modules != old.modules:
            pieces.add(MODULES_PIECE)
        self.settings = new
        configure(new.log_level)
        self.hub.hold_limit, self.hub.hold_bytes = new.ws_queue, new.ws_queue_bytes
        if new.enable_auth and (new.token, True) != (old.token, old.enable_auth):
            self.hub.close_other_tokens(new.token)  # API.md §6: old tokens are closed 1008
        self.ledger.max_bytes, self.ledger.full_policy = new.ledger_max_bytes, new.ledger_full
        self.account.resize(new.memory_budget, new.client_share)
        self.account.limit("bodies", new.max_bodies)
        if self.server is not None:
            self.server.settings = new  # connections accepted from now on get the new limits
        self._schedule_recorder()
        for piece in sorted(pieces):
            self.rebuilders[piece](old, new)
        return applied

    def _rebuild_modules(self, old: Settings, new: Settings) -> None:
        """New module clients and breakers (closed again) for new URLs, tokens, limits."""
        previous, self.modules = self.modules, self._modules(new)
        self.prediction.retain(self._predicted(new))
        # Calls and health check rounds in flight finish on the old client; close it after the
        # longest of them could have ended (or at shutdown, whichever comes first).
        self._retired.append(previous)
        longest = max([new.health_timeout, old.health_timeout, new.proxy_timeout, old.proxy_timeout,
                       *(r.timeout for r in old.intents), *(r.fallback.timeout for r in old.intents if r.fallback)])
        asyncio.get_running_loop().call_later(longest + 1, self._close_retired, previous)

    def _close_retired(self, modules: Modules) -> None:
        if modules in self._retired:
            self._retired.remove(modules)
            # keep a reference: the loop holds tasks only weakly
            task = asyncio.get_running_loop().create_task(modules.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _self_check(self) -> HealthCheck:
        """The gateway's own row: it is serving, since it is the one recording."""
        stopping = self.stopping
        return HealthCheck(GATEWAY_SERVICE, "error" if stopping else "ok", 503 if stopping else 200, 0.0,
                           gateway_url(self.settings, self.port), "stopping" if stopping else None,
                           '{"status":"%s","module":"tentaculo_link"}' % ("stopping" if stopping else "ok"),
                           self.port)

    async def _record_health(self) -> None:
        """Every EDGELINK_PROBE_INTERVAL: one round of health checks, written to the health tables."""
        while True:
            try:
                checks = await record_round(self.modules, self.ledger, self._self_check())
                # replaced whole each round, so a module disabled by a reload leaves no stale series
                enabled = {(n,): c for n, c in checks.items() if n != GATEWAY_SERVICE and c.status != "disabled"}
                self.metrics.module_up.values = {k: int(c.status == "ok") for k, c in enabled.items()}
                self.metrics.module_check_duration.values = {k: c.latency_ms / 1000 for k, c in enabled.items()
                                                             if c.latency_ms is not None}
                self._log_up_down({k[0]: c for k, c in enabled.items()})
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failed round is logged; the next one still runs
                log.error("health_record_failed", error=repr(exc))
            await asyncio.sleep(self.settings.probe_interval)
