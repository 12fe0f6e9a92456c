"""Running the gateway: start the pieces, listen, wait for a signal, shut down in order."""

from __future__ import annotations

import asyncio
import signal
import socket
from typing import Any, Awaitable, Callable, Coroutine

from . import __version__
from .app import build_router
from .config import Settings
from .dispatch import Dispatcher
from .http.server import HttpServer
from .log import configure, log
from .runtime import Runtime


def run(main: Coroutine[Any, Any, Any]) -> Any:
    """Run ``main`` on uvloop, or on the standard loop (saying so) when uvloop is missing."""
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop_unavailable", detail="running on the standard asyncio loop")
        return asyncio.run(main)
    return uvloop.run(main)


async def serve(settings: Settings, *, sock: socket.socket | None = None,
                on_ready: Callable[[Runtime], Awaitable[None] | None] | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting, let in-flight work finish within
    the grace period, close WebSockets with 1001 and flush the ledger."""
    configure(settings.log_level)
    runtime = Runtime(settings)
    await runtime.start()
    server = HttpServer(Dispatcher(build_router(), runtime), settings)
    try:
        await server.start(settings.host, settings.port, sock=sock)
    except OSError as exc:
        await runtime.stop()
        raise SystemExit(f"edgelink: cannot listen on {settings.host}:{settings.port}: {exc.strerror}") from None
    runtime.port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    log.info("started", version=__version__, host=settings.host, port=runtime.port,
             loop=type(loop).__module__.split(".")[0], auth=settings.enable_auth)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        result = on_ready(runtime)
        if result is not None:
            await result
    await stop.wait()
    log.info("stopping", grace_seconds=settings.shutdown_grace)
    runtime.stopping = True
    await server.shutdown(settings.shutdown_grace)
    await runtime.stop()
    log.info("stopped")
