"""systemd integration with the standard library only: sd_notify, the watchdog, socket activation.

Every function is a no-op (or returns nothing) when not run by systemd, so the server calls
them unconditionally:

    socks = listen_fds()            # before binding: use these if systemd passed any
    ...                             # start serving
    ready()                         # Type=notify: the unit is "active" from here
    dog = start_watchdog()          # WatchdogSec=: pings from the event loop
    ...                             # on SIGHUP: reloading(), re-read config, ready()
    stopping()                      # on SIGTERM, before draining
    if dog: dog.cancel()

The protocol is datagrams of ``KEY=value`` lines to the AF_UNIX socket named by
$NOTIFY_SOCKET (sd_notify(3)); passed sockets start at fd 3 (sd_listen_fds(3)).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

from .log import log

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START


def notify(state: str) -> bool:
    """Send ``state`` (newline-separated ``KEY=value`` lines) to systemd.

    Returns True when sent; False when $NOTIFY_SOCKET is unset (not under systemd) or the
    send failed. A failure is logged, not raised: a status message must never take the
    gateway down.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address[0] == "@":
        address = "\0" + address[1:]  # abstract namespace
    elif address[0] != "/":
        log.warning("systemd_notify_skipped", detail="NOTIFY_SOCKET is not an AF_UNIX path or abstract name",
                    notify_socket=address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("systemd_notify_failed", state=state.partition("\n")[0], error=str(exc))
        return False
    return True


def ready() -> bool:
    """Startup (or a reload) finished: with Type=notify the unit becomes active now."""
    return notify("READY=1")


def stopping() -> bool:
    """Shutdown began: systemd shows "deactivating" instead of guessing."""
    return notify("STOPPING=1")


def reloading() -> bool:
    """A reload began; send ``ready()`` when it is done.

    MONOTONIC_USEC lets systemd ≥ 253 (Type=notify-reload) tell this reload from an older
    one; older versions ignore it.
    """
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def watchdog() -> bool:
    """Tell systemd the service is alive (WatchdogSec=)."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of WATCHDOG_USEC), or None if the watchdog is off.

    Off also when WATCHDOG_PID names another process: the variable was inherited, and the
    watchdog belongs to that parent.
    """
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
        pid = os.environ.get("WATCHDOG_PID", "")
        if pid and int(pid) != os.getpid():
            return None
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2_000_000  # half the period, as sd_watchdog_enabled(3) advises


def start_watchdog() -> asyncio.Task[None] | None:
    """Start pinging the watchdog from the running event loop; None if the watchdog is off.

    The pings are sent by a task on the loop, not by a thread, on purpose: a loop that is
    stuck stops pinging, and systemd restarts the service. Cancel the task at shutdown.
    """
    interval = watchdog_interval()
    if interval is None:
        return None
    return asyncio.get_running_loop().create_task(_ping(interval), name="systemd-watchdog")


async def _ping(interval: float) -> None:
    while True:
        watchdog()
        await asyncio.sleep(interval)


def listen_fds() -> list[socket.socket]:
    """The sockets systemd passed (socket activation), in order; empty if none were.

    They are made non-blocking and close-on-exec. $LISTEN_PID, $LISTEN_FDS and
    $LISTEN_FDNAMES are removed from the environment in every case, as
    sd_listen_fds(unset_environment=1) does, so that no child process takes them for its own.
    Raises OSError if a passed fd is not a socket (a unit misconfiguration).
    """
    pid = os.environ.pop("LISTEN_PID", "")
    count = os.environ.pop("LISTEN_FDS", "")
    os.environ.pop("LISTEN_FDNAMES", None)
    try:
        if int(pid) != os.getpid():
            return []  # meant for another process (inherited environment)
        n = int(count)
    except ValueError:
        return []
    socks = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + max(n, 0)):
        sock = socket.socket(fileno=fd)  # family and type are read from the fd
        sock.setblocking(False)
        sock.set_inheritable(False)
        socks.append(sock)
    return socks
