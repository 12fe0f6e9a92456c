"""Running the gateway: start the pieces, listen, wait for signals, shut down in order.

SIGTERM/SIGINT: stop accepting, let in-flight requests finish within the grace period,
close WebSockets with 1001, flush the ledger, exit 0. SIGHUP: build new settings from the
config file and environment file; if they are valid, apply what can change at run time
(modules, routes, tokens, limits) without dropping a connection, else keep the old ones.
"""

from __future__ import annotations

import asyncio
import gc
import resource
import signal
from typing import Any, Awaitable, Callable, Coroutine

from . import __version__, forward, memory, systemd
from .app import build_router
from .config import ConfigError, Settings
from .dispatch import Dispatcher
from .http.server import HttpServer
from .ledger import LedgerUnusable
from .log import configure, log
from .overload import OverloadManager
from .runtime import Runtime

# Descriptors beyond connections: listening sockets, the ledger (db, WAL, shm), stdio and
# the log, the loop's own (epoll, signal pipe), health checks, systemd's notify socket.
FD_HEADROOM = 64


def fd_need(settings: Settings) -> int:
    """Descriptors the limits can use at once: each client connection may hold one
    upstream call, plus each module's idle pool, plus the headroom."""
    return 2 * settings.max_connections + settings.upstream_pool_size * len(settings.modules) + FD_HEADROOM


def check_fd_limit(settings: Settings) -> None:
    """Raise the soft RLIMIT_NOFILE to what the limits need if the hard one allows, else
    raise it to the hard one and warn naming both figures (as nginx does)."""
    need = fd_need(settings)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    target = need if hard == resource.RLIM_INFINITY or hard >= need else hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("fd_limit_unchanged", error=str(exc), soft=soft)
        target = soft
    if target >= need:
        log.info("fd_limit_raised", soft=soft, to=target, needed=need)
    else:
        log.warning("fd_limit_low", needed=need, limit=target, max_connections=settings.max_connections,
                    detail=f"{need} file descriptors needed but the limit is {target}: raise LimitNOFILE "
                           "or lower EDGELINK_MAX_CONNECTIONS")


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
    memory.return_big_buffers()
    check_fd_limit(settings)
    # The stop signals are ours before anything listens: a SIGTERM as soon as the port
    # answers (or during start-up) is a clean stop, not the default handler's kill. A SIGHUP
    # before start-up is done is not a reload (systemd is told READY=1 only once started).
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload_while_starting)
    runtime = Runtime(settings)
    try:
        await runtime.start()
    except LedgerUnusable as exc:
        raise SystemExit(f"edgelink: {exc}") from None
    runtime.router = build_router()
    server = runtime.server = HttpServer(Dispatcher(runtime.router, runtime), settings, runtime.account)
    runtime.metrics.gauge("edgelink_http_connections", read=lambda: {(): len(server.connections)})
    runtime.metrics.gauge("edgelink_http_connections_limit", read=lambda: {(): server.settings.max_connections})
    socks = systemd.listen_fds()
    try:
        await server.start(settings.host, settings.port, socks=socks)
    except OSError as exc:
        await runtime.stop()
        raise SystemExit(f"edgelink: cannot listen on {settings.host}:{settings.port}: {exc.strerror}") from None
    runtime.listening(server.sockets[0].getsockname()[1])
    overload = server.overload = OverloadManager(server, lambda: runtime.settings, runtime.metrics)
    overload.start()
    log.info("started", version=__version__, host=settings.host, port=runtime.port,
             loop=type(loop).__module__.split(".")[0], auth=settings.enable_auth,
             socket_activated=bool(socks), db=settings.db, epoch=runtime.ledger.epoch)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, _reload, runtime, reload)
    else:
        loop.remove_signal_handler(signal.SIGHUP)
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
    overload.stop()
    await runtime.stop()
    if watchdog is not None:
        watchdog.cancel()
    log.info("stopped")


def _reload_while_starting() -> None:
    log.warning("reload_ignored", detail="edgelink is still starting: send SIGHUP again once it has started")


def _reload(runtime: Runtime, reload: Callable[[], Settings]) -> None:
    systemd.reloading()
    try:
        new = reload()
    except ConfigError as exc:
        log.error("reload_refused", error=str(exc), detail="keeping the running configuration")
        systemd.ready()
        return
    log.info("reloaded", config_file=new.config_file, changed=runtime.apply(new))
    systemd.ready()
