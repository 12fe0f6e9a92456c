"""systemd integration against real sockets: notify datagrams, watchdog pings, passed fds."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import uvloop

import edgelink
from conftest import holds, until
from edgelink import systemd

REPO = Path(edgelink.__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_systemd_env(monkeypatch):
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A datagram socket bound at a path, named by $NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def drain(sock: socket.socket) -> list[bytes]:
    """Every datagram already queued, without waiting for more."""
    got = []
    timeout = sock.gettimeout()
    sock.setblocking(False)  # with a timeout set, Python would wait out EAGAIN
    try:
        while True:
            got.append(sock.recv(4096))
    except BlockingIOError:
        return got
    finally:
        sock.settimeout(timeout)


# -- notify ---------------------------------------------------------------------------


def test_without_notify_socket_nothing_is_sent():
    assert systemd.notify("READY=1") is False
    assert systemd.ready() is False
    assert systemd.watchdog() is False


def test_ready_stopping_watchdog_reach_a_path_socket(notify_socket):
    assert systemd.ready() is True
    assert notify_socket.recv(4096) == b"READY=1"
    assert systemd.stopping() is True
    assert notify_socket.recv(4096) == b"STOPPING=1"
    assert systemd.watchdog() is True
    assert notify_socket.recv(4096) == b"WATCHDOG=1"
    assert systemd.notify("STATUS=serving\nREADY=1") is True
    assert notify_socket.recv(4096) == b"STATUS=serving\nREADY=1"


def test_abstract_socket_name(monkeypatch):
    name = f"edgelink-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.ready() is True
        assert sock.recv(4096) == b"READY=1"


def test_reloading_carries_monotonic_usec(notify_socket):
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert systemd.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = notify_socket.recv(4096).decode().split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert len(lines) == 2


def test_send_failure_is_logged_not_raised(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert systemd.ready() is False
    assert '"event":"systemd_notify_failed","state":"READY=1"' in capsys.readouterr().err
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/path")
    assert systemd.ready() is False
    assert "not an AF_UNIX path" in capsys.readouterr().err


# -- watchdog -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "usec, pid, expected",
    [
        (None, None, None),
        ("2000000", None, 1.0),
        ("2000000", "self", 1.0),
        ("2000000", "other", None),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
        ("2000000", "nope", None),
    ],
)
def test_watchdog_interval(monkeypatch, usec, pid, expected):
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(pid, pid))
    assert systemd.watchdog_interval() == expected


def test_start_watchdog_is_none_when_the_watchdog_is_off():
    async def scenario():
        return systemd.start_watchdog()

    assert asyncio.run(scenario()) is None


HALF = 0.1  # seconds between pings for WATCHDOG_USEC=200000

# The gateway runs on uvloop; the watchdog must behave the same on either loop.
LOOPS = pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])


@LOOPS
def test_watchdog_pings_at_half_the_period(notify_socket, monkeypatch, run):
    monkeypatch.setenv("WATCHDOG_USEC", "200000")

    async def scenario():
        task = systemd.start_watchdog()
        assert task is not None
        started = time.monotonic()
        await asyncio.sleep(5 * HALF)  # real time: how many pings half a second holds is the point
        elapsed = time.monotonic() - started
        task.cancel()
        await asyncio.wait((task,))
        return elapsed

    elapsed = run(scenario())
    pings = drain(notify_socket)
    assert set(pings) == {b"WATCHDOG=1"}
    # about 5 expected; never faster than one per interval (plus the one at start)
    assert 2 <= len(pings) <= elapsed / HALF + 2


@LOOPS
def test_watchdog_stops_while_the_loop_is_blocked_and_after_cancel(notify_socket, monkeypatch, run):
    monkeypatch.setenv("WATCHDOG_USEC", "200000")

    async def scenario():
        task = systemd.start_watchdog()
        await until(lambda: drain(notify_socket), why="a ping before the block")

        time.sleep(6 * HALF)  # real time: the loop stuck for 3 periods: a thread would keep pinging, it cannot
        assert drain(notify_socket) == []

        await until(lambda: drain(notify_socket), why="unstuck: pings resume")

        task.cancel()
        await asyncio.wait((task,))
        drain(notify_socket)
        await holds(lambda: drain(notify_socket) == [], 3 * HALF, "no ping after the cancel")

    run(scenario())


# -- socket activation ----------------------------------------------------------------


def test_listen_fds_without_activation():
    assert systemd.listen_fds() == []


@pytest.mark.parametrize("pid", ["other", "garbage"])
def test_listen_fds_meant_for_another_process(monkeypatch, pid):
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1) if pid == "other" else pid)
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "http")
    assert systemd.listen_fds() == []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        assert name not in os.environ


def test_listen_fds_zero(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "0")
    assert systemd.listen_fds() == []
    assert "LISTEN_FDS" not in os.environ


CHILD = textwrap.dedent(
    """
    import json, os, socket, subprocess
    from edgelink import systemd

    socks = systemd.listen_fds()
    (sock,) = socks
    report = {
        "fd": sock.fileno(),
        "family": sock.family.name,
        "type": sock.type.name,
        "blocking": sock.getblocking(),
        "inheritable": sock.get_inheritable(),
        "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
        # what a child of ours would inherit
        "grandchild": subprocess.run(
            ["sh", "-c", 'echo "${LISTEN_PID-unset} ${LISTEN_FDS-unset}"; '
                         'test -e /proc/$$/fd/3 && echo fd3-open || echo fd3-closed'],
            capture_output=True, text=True, check=True,
        ).stdout.split(),
    }
    sock.settimeout(30)  # so that a lost parent cannot leave this process behind
    conn, _ = sock.accept()
    with conn:
        conn.sendall(json.dumps(report).encode())
    """
)


def test_listen_fds_in_a_socket_activated_process(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))}
    env.update(LISTEN_FDS="1", LISTEN_FDNAMES="http", PYTHONPATH=str(REPO))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        # As systemd does: the socket at fd 3 and LISTEN_PID naming the process that gets it.
        # sh receives it as stdin (dash cannot name fds above 9), moves it to 3, then execs
        # python, which keeps the pid that $$ named.
        child = subprocess.Popen(
            ["/bin/sh", "-c", 'LISTEN_PID=$$ exec "$0" "$1" 3<&0 </dev/null', sys.executable, str(script)],
            stdin=listener.fileno(),
            env=env,
            stderr=subprocess.PIPE,
        )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
                data = b""
                while chunk := conn.recv(4096):
                    data += chunk
        finally:
            _, stderr = child.communicate(timeout=30)
    assert child.returncode == 0, stderr.decode()
    assert json.loads(data) == {
        "fd": 3,
        "family": "AF_INET",
        "type": "SOCK_STREAM",
        "blocking": False,
        "inheritable": False,
        "env_left": [],
        "grandchild": ["unset", "unset", "fd3-closed"],
    }
