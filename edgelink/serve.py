"""Running the gateway: start the pieces, listen, wait for signals, shut down in order.

SIGTERM/SIGINT: stop accepting, let in-flight requests finish within the grace period,
close WebSockets with 1001, flush the ledger, exit 0. SIGHUP: build new settings from the
config file and environment file; if they are valid, apply what can change at run time
(modules, routes, tokens, limits) without dropping a connection, else keep the old ones.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import signal
from typing import Any, Awaitable, Callable, Coroutine

from . import __version__, forward, systemd
from .app import build_router
from .config import ConfigError, Settings
from .dispatch import Dispatcher
from .http.server import HttpServer
from .log import configure, log
from .runtime import Runtime

# Settings read once at start: changing them needs a restart.
RESTART_ONLY = ("host", "port", "db", "ledger_sync", "retention_events", "retention_days",
                "context7_ttl_seconds", "context7_cleanup_interval", "context7_max_sessions",
                "context7_max_messages", "context7_max_bytes", "edge_id", "forward_url", "forward_window",
                "forward_ack_timeout", "forward_types", "forward_user", "forward_password", "forward_token",
                "forward_ca", "forward_cert", "forward_key")


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """Run ``main`` on uvloop, or on the standard loop (saying so) when uvloop is missing."""
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop_unavailable", detail="running on the standard asyncio loop")
        return asyncio.run(main)
    return uvloop.run(main)


async def serve(settings: Settings, *, reload: Callable[[], Settings] | None = None,
                on_ready: Callable[[Runtime], Awaitable[None] | None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT. ``reload`` builds fresh settings on SIGHUP."""
    configure(settings.log_level)
    try:
        forward.check(settings)
    except ConfigError as exc:
        raise SystemExit(f"edgelink: {exc}") from None
    runtime = Runtime(settings)
    await runtime.start()
    runtime.router = build_router()
    server = HttpServer(Dispatcher(runtime.router, runtime), settings)
    socks = systemd.listen_fds()
    try:
        await server.start(settings.host, settings.port, socks=socks)
    except OSError as exc:
        await runtime.stop()
        raise SystemExit(f"edgelink: cannot listen on {settings.host}:{settings.port}: {exc.strerror}") from None
    runtime.listening(server.sockets[0].getsockname()[1])
    loop = asyncio.get_running_loop()
    log.info("started", version=__version__, host=settings.host, port=runtime.port,
             loop=type(loop).__module__.split(".")[0], auth=settings.enable_auth,
             socket_activated=bool(socks), db=settings.db, epoch=runtime.ledger.epoch)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, _reload, runtime, server, reload)
    # What start-up allocated lives as long as the process: keep it out of the collector's
    # full passes, which would otherwise walk it again and again under load.
    gc.freeze()
    systemd.ready()
    watchdog = systemd.start_watchdog()
    if on_ready is not None:
        result = on_ready(runtime)
        if result is not None:
            await result
    await stop.wait()

    systemd.stopping()
    log.info("stopping", grace_seconds=runtime.settings.shutdown_grace)
    runtime.stopping = True
    await server.shutdown(runtime.settings.shutdown_grace)
    await runtime.stop()
    if watchdog is not None:
        watchdog.cancel()
    log.info("stopped")


def _reload(runtime: Runtime, server: HttpServer, reload: Callable[[], Settings]) -> None:
    systemd.reloading()
    try:
        new = reload()
    except ConfigError as exc:
        log.error("reload_refused", error=str(exc), detail="keeping the running configuration")
        systemd.ready()
        return
    fixed = [name for name in RESTART_ONLY if getattr(new, name) != getattr(runtime.settings, name)]
    if fixed:
        log.warning("reload_needs_restart", settings=fixed, detail="these keep their running values")
        new = dataclasses.replace(new, **{name: getattr(runtime.settings, name) for name in fixed})
    configure(new.log_level)
    runtime.apply(new)
    server.settings = new  # connections accepted from now on get the new limits
    log.info("reloaded", config_file=new.config_file)
    systemd.ready()
