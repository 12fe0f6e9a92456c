"""Running the gateway: start the pieces, listen, wait for signals, shut down in order.

SIGTERM/SIGINT: stop accepting, let in-flight requests finish within the grace period,
close WebSockets with 1001, flush the ledger, exit 0. SIGHUP: build new settings from the
config file and environment file; if they are valid, apply what can change at run time
(modules, routes, tokens, limits) without dropping a connection, else keep the old ones.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import os
import signal
from typing import Any, Awaitable, Callable, Coroutine

from . import __version__, forward, systemd
from .app import build_router
from .config import ConfigError, Settings
from .dispatch import Dispatcher
from .gateway.metrics import Gauge
from .http.server import HttpServer
from .ledger import LedgerUnusable
from .log import configure, log
from .runtime import Runtime

MMAP_THRESHOLD = 256 * 1024  # buffers this big get their own mapping, unmapped when freed
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter

def run(main: Coroutine[Any, Any, Any]) -> Any:
    """Run ``main`` on uvloop, or on the standard loop (saying so) when uvloop is missing."""
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop_unavailable", detail="running on the standard asyncio loop")
        return asyncio.run(main)
    return uvloop.run(main)


def pin_mmap_threshold() -> None:
    """Keep big buffers (request bodies, event rows) out of the malloc heaps.

    glibc raises its mmap threshold each time a mapped buffer is freed, up to 32 MiB; from
    then on 1 MiB bodies are carved from the heap of whichever thread touched them and
    fragmentation keeps the memory. Measured: 4 clients posting 1 MiB events peaked at
    105 MiB RSS, 51 MiB with the threshold pinned. An explicit MALLOC_MMAP_THRESHOLD_ wins.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not a C library with mallopt: nothing to pin
        return
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


async def serve(settings: Settings, *, reload: Callable[[], Settings] | None = None,
                on_ready: Callable[[Runtime], Awaitable[None] | None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT. ``reload`` builds fresh settings on SIGHUP."""
    configure(settings.log_level)
    try:
        forward.check(settings)
    except ConfigError as exc:
        raise SystemExit(f"edgelink: {exc}") from None
    pin_mmap_threshold()
    runtime = Runtime(settings)
    try:
        await runtime.start()
    except LedgerUnusable as exc:
        raise SystemExit(f"edgelink: {exc}") from None
    runtime.router = build_router()
    server = runtime.server = HttpServer(Dispatcher(runtime.router, runtime), settings)
    runtime.metrics.add(Gauge("edgelink_http_connections", "Open client connections (HTTP and WebSocket)",
                              read=lambda: {(): len(server.connections)}))
    runtime.metrics.add(Gauge("edgelink_http_connections_limit", "The connection limit (EDGELINK_MAX_CONNECTIONS)",
                              read=lambda: {(): server.settings.max_connections}))
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
        loop.add_signal_handler(signal.SIGHUP, _reload, runtime, reload)
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


def _reload(runtime: Runtime, reload: Callable[[], Settings]) -> None:
    systemd.reloading()
    try:
        new = reload()
    except ConfigError as exc:
        log.error("reload_refused", error=str(exc), detail="keeping the running configuration")
        systemd.ready()
        return
    runtime.apply(new)
    log.info("reloaded", config_file=new.config_file)
    systemd.ready()
