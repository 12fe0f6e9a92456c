"""Fixtures that run the real ``edgelink`` command as a subprocess on a loopback port."""

from __future__ import annotations

import asyncio
import http.client
import inspect
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import orjson
import pytest

from edgelink.config import MODULE_DEFAULTS
from fakemodule import FakeModule, unused_port

TOKEN = "test-token-0123456789"
# The installed console script, as a user runs it (next to this interpreter in a venv).
EDGELINK = str(Path(sys.executable).with_name("edgelink"))


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Gateway:
    proc: subprocess.Popen
    port: int
    log_path: Path
    db: Path
    token: str = TOKEN
    env: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
                token: bool = True, raw: bytes | None = None, timeout: float = 30) -> Reply:
        """One request on a fresh connection with the stdlib client."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        hdrs = dict(headers or {})
        if token:
            hdrs.setdefault("X-VX11-Token", self.token)
        data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
        if data is not None:
            hdrs.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> Reply:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return self.request("POST", path, body, **kw)

    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        return s

    def logs(self) -> str:
        return self.log_path.read_text()

    def status_kib(self, field: str) -> int:
        """A ``/proc/<pid>/status`` figure in KiB: ``VmHWM`` is the peak RSS, ``VmRSS`` the current."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise KeyError(field)

    def open_fds(self) -> int:
        """How many file descriptors the process holds (its sockets among them)."""
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def cpu_ticks(self) -> int:
        """The CPU time the process has used (user + system), in clock ticks."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        return int(fields[11]) + int(fields[12])

    def wait_idle(self, quiet: float = 0.3, timeout: float = 60) -> None:
        """Wait until the process has used no CPU for ``quiet`` seconds: it has done all it
        would do with what it was sent (answered what it would answer, read what it would
        read) and waits on its sockets. Fails if it is still busy after ``timeout``."""
        wait_still(self.cpu_ticks, quiet, timeout, "the gateway to go idle")

    def peak_rss_mib(self) -> float:
        return self.status_kib("VmHWM") / 1024

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


# What configures an edgelink or a v7 gateway, or tells it it runs under systemd: none of it
# leaks from the shell running the tests into a process a test starts.
OUR_ENV_PREFIXES = ("EDGELINK_", "VX11_", "TENTACULO", "ENABLE_", "NOTIFY_", "WATCHDOG_", "LISTEN_", "JOURNAL_")


# The longest files start first on the suite's workers (addopts' -n 4, a file to a worker),
# so none of them is what the others wait for at the end: the broker faults (about 2
# minutes), the hostile run (one 100 s test), the booted containers, the browser.
LONGEST_FIRST = ("test_forward_brokers.py", "test_hostile.py", "test_systemd_boot.py", "test_console.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)  # stable: the rest keep their order


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any of ``OUR_ENV_PREFIXES``, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(OUR_ENV_PREFIXES)}
    env.update(extra)
    return env


def start_gateway(tmp_path: Path, env: dict[str, str] | None = None, args: list[str] | None = None,
                  command: str = "serve", name: str = "gw", launcher: list[str] | None = None,
                  stdin: Any = None) -> Gateway:
    """Start ``edgelink <command> --port 0`` and wait for its ``started`` log line.
    ``launcher`` is a command prefix that execs the rest (to set up fds as systemd does)."""
    log_path = tmp_path / f"{name}.log"
    db = tmp_path / f"{name}.db"
    full_env = clean_env()
    full_env.update({
        "VX11_GATEWAY_TOKEN": TOKEN,
        "EDGELINK_DB": str(db),
        "EDGELINK_PROBE_INTERVAL": "0",
        "EDGELINK_HOST": "127.0.0.1",
    })
    full_env.update(env or {})
    argv = [*(launcher or []), EDGELINK, command, "--port", "0", *(args or [])]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=tmp_path,
                                stdin=stdin if stdin is not None else subprocess.DEVNULL)
    started = wait_for_log(log_path, "started", proc)
    return Gateway(proc, started["port"], log_path, db, full_env.get("VX11_GATEWAY_TOKEN", ""), full_env)


def wait_until(condition: Any, timeout: float = 10, why: str = "", every: float = 0.02) -> Any:
    """Poll ``condition()`` every ``every`` seconds until it returns something true, and return
    that; fail with ``why`` after ``timeout`` seconds. For what another process or thread does,
    which no event tells us (``every``: longer where asking is costly, e.g. in a container)."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"not in {timeout} s: {why or condition}"
        time.sleep(every)  # real time: the other side (a process, a thread) moves on its own clock
    return result


class Settled:
    """A condition for ``wait_until``/``until``: true once ``read()`` has given the same figure
    (kept in ``value``) for ``quiet`` seconds: what was under way (a round in flight, a burst
    of work) has landed."""

    def __init__(self, read: Any, quiet: float) -> None:
        self.read, self.quiet = read, quiet
        self.value: Any = None
        self.since: float | None = None

    def __call__(self) -> bool:
        now, value = time.monotonic(), self.read()
        if self.since is None or value != self.value:
            self.value, self.since = value, now
        return now - self.since >= self.quiet


def wait_still(read: Any, quiet: float, timeout: float = 60, why: str = "") -> Any:
    """The figure ``read()`` gives once it has held still for ``quiet`` seconds."""
    settled = Settled(read, quiet)
    wait_until(settled, timeout, why or f"{read} to hold still", every=quiet / 4)
    return settled.value


def ms_after(after: int) -> int:
    """The wall clock in milliseconds, once it is past ``after`` (so timestamps taken from
    now on are later than ``after``)."""
    return wait_until(lambda: (now := int(time.time() * 1000)) > after and now, why="the clock ticks", every=0.001)


def trickle(socks: socket.socket | list[socket.socket], data: bytes, every: float) -> None:
    """Send ``data`` a byte at a time, ``every`` seconds apart, to one socket or to each of
    a list, until the gateway has cut every one off."""
    live = [socks] if isinstance(socks, socket.socket) else list(socks)
    for byte in data:
        for sock in list(live):
            try:
                sock.sendall(bytes([byte]))
            except OSError:  # cut off (reset, broken pipe): that one is done
                live.remove(sock)
        if not live:
            return
        time.sleep(every)  # real time: a client this slow must run into the gateway's timers


def _held_through(condition: Any, seconds: float, why: str) -> Any:
    """A condition true once ``seconds`` have passed, failing the test as soon as
    ``condition()`` does not hold: that nothing happens for a while only time can show."""
    end = time.monotonic() + seconds

    def over() -> bool:
        assert condition(), f"changed within {seconds} s: {why}"
        return time.monotonic() >= end
    return over


def stays(condition: Any, seconds: float, why: str) -> None:
    """``condition()`` holds all through ``seconds`` of real time, checked every 20 ms: for
    checks that something does NOT happen (a window stays full, nothing more is stored)."""
    wait_until(_held_through(condition, seconds, why), seconds + 30, why)


async def holds(condition: Any, seconds: float, why: str) -> None:
    """``stays`` inside a running loop: the tasks under test run meanwhile."""
    await until(_held_through(condition, seconds, why), seconds + 30, why)


async def until(condition: Any, timeout: float = 10, why: str = "") -> Any:
    """``wait_until`` inside a running loop (``condition`` may be a coroutine function):
    yields to the loop between polls, so the tasks under test make progress."""
    deadline = time.monotonic() + timeout

    async def check() -> Any:
        result = condition()
        return await result if inspect.isawaitable(result) else result

    while not (result := await check()):
        assert time.monotonic() < deadline, f"not in {timeout} s: {why or condition}"
        await asyncio.sleep(0.005)  # real time: tasks waiting on I/O or threads need the loop to turn
    return result


async def next_loop_turn() -> None:
    """Let every task that is ready run once; no time passes."""
    await asyncio.sleep(0)  # not real time: zero seconds, one pass of the event loop


def metric(gw: Gateway, series: str) -> float:
    """The value of one series of ``/metrics``, written as it is exported (``name`` or
    ``name{label="v",...}``); fails if the gateway does not export it."""
    for line in gw.get("/metrics", token=False).body.decode().splitlines():
        name, _, value = line.rpartition(" ")
        if name == series:
            return float(value)
    raise AssertionError(f"no {series} in /metrics")


def metric_sum(gw: Gateway, selector: str) -> float:
    """The sum of the ``/metrics`` series a selector picks, 0 when none is exported: a bare
    name picks every series of that name, text with a ``{`` every series beginning with it
    (``'edgelink_budget_bytes{'`` is every piece, ``'x_total{budget="bodies"}'`` that one)."""
    total = 0.0
    for line in gw.get("/metrics", token=False).body.decode().splitlines():
        if line.startswith("#") or not line:
            continue
        series, _, value = line.rpartition(" ")
        if series.startswith(selector) if "{" in selector else series.partition("{")[0] == selector:
            total += float(value)
    return total


def errors_logged(gw: Gateway) -> list[str]:
    """The gateway's log lines at level error or critical."""
    return [line for line in gw.logs().splitlines()
            if line.startswith("{") and orjson.loads(line).get("level") in ("error", "critical")]


def health_ok(gw: Gateway) -> None:
    """``/health`` answers 200 ``{"status": "ok", ...}``."""
    r = gw.get("/health", token=False)
    assert r.status == 200 and r.json()["status"] == "ok", (r.status, r.body)


def still_serving(gw: Gateway) -> None:
    """``/health`` answers 200 and nothing on the way was a bug of ours: no error in the log."""
    health_ok(gw)
    errors = errors_logged(gw)
    assert not errors, errors[:5]


def post_event(gw: Gateway, event_type: str, payload: Any, source: str = "madre", **extra: Any) -> Reply:
    """``POST /events/ingest`` of one event (``extra``: more body fields); the reply as it came."""
    return gw.post("/events/ingest", {"source": source, "type": event_type, "payload": payload, **extra})


def ws_url(gw: Gateway, query: str = "") -> str:
    """The gateway's ``/ws`` URL with this query (a token goes in it when the test wants one)."""
    return f"ws://127.0.0.1:{gw.port}/ws?{query}"


def log_records(log_path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in log_path.read_bytes().splitlines() if line.startswith(b"{")]


def wait_for_log(log_path: Path, event: str, proc: subprocess.Popen | None = None, timeout: float = 20,
                 after: int = 0) -> dict[str, Any]:
    """The first log record named ``event`` (past the first ``after`` records)."""
    def found() -> dict[str, Any] | None:
        for rec in log_records(log_path)[after:]:
            if rec.get("event") == event:
                return rec
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}:\n{log_path.read_text()}")
        return None
    try:
        return wait_until(found, timeout, f"a {event!r} log line", every=0.05)
    except AssertionError:
        if proc is not None and event == "started":
            proc.kill()
        raise RuntimeError(f"no {event!r} log line in time:\n{log_path.read_text()}") from None


URL_ENV = {name: env for name, env, _ in MODULE_DEFAULTS}  # module name -> its URL variable


def module_env(fakes: dict[str, FakeModule] | None = None, **extra: str) -> dict[str, str]:
    """Every module URL: the given fakes, every other module on its own closed port."""
    fakes = fakes or {}
    env = {env_name: fakes[name].url if name in fakes else f"http://127.0.0.1:{unused_port()}"
           for name, env_name in URL_ENV.items()}
    env.update(extra)
    return env


def received(module: FakeModule, path: str) -> list[Any]:
    """The requests a fake module got on ``path``."""
    return [r for r in module.requests if r.path == path]


def assert_error(reply: Reply, status: int, code: str, **fields: Any) -> dict[str, Any]:
    """The reply is an API.md §1 error with this status and code (and these fields)."""
    assert reply.status == status, (reply.status, reply.body)
    body = reply.json()
    assert body["error"] == code and body["status_code"] == status, body
    for key, value in fields.items():
        assert body[key] == value, (key, body)
    return body


@pytest.fixture
def fake() -> Iterator[Any]:
    """``fake(name)`` starts a FakeModule, stopped after the test."""
    started: list[FakeModule] = []

    def make(name: str = "fake") -> FakeModule:
        module = FakeModule(name).start()
        started.append(module)
        return module

    yield make
    for module in started:
        module.stop()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Gateway] = []

    def factory(env: dict[str, str] | None = None, args: list[str] | None = None, **kw: Any) -> Gateway:
        gw = start_gateway(tmp_path, env, args, name=f"gw{len(started)}", **kw)
        started.append(gw)
        return gw

    yield factory
    for gw in started:
        if gw.proc.poll() is None:
            gw.proc.kill()
            gw.proc.wait()


@pytest.fixture
def gateway(gateway_factory: Any) -> Gateway:
    return gateway_factory()


@pytest.fixture(scope="module")
def shared_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One default gateway for a test module's tests that change nothing another test reads
    and read nothing another test changes (no log, counter or stored-event checks): a
    gateway start saved per test."""
    gw = start_gateway(tmp_path_factory.mktemp("shared"))
    yield gw
    if gw.proc.poll() is None:
        gw.proc.kill()
        gw.proc.wait()


def recv_all(sock: socket.socket, timeout: float = 10) -> bytes:
    """Read until the peer closes (or the timeout passes)."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except (socket.timeout, ConnectionResetError):
        pass
    return b"".join(chunks)


class RawClient:
    """A raw socket that reads HTTP/1.1 responses one at a time, keeping what follows."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed by the server; unread: {self.buf!r}")
        self.buf += chunk

    def read_response(self, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
        self.sock.settimeout(timeout)
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", "0")) if status >= 200 else 0
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body

    def closed_by_peer(self, timeout: float = 10) -> bool:
        """True if the server closes the connection (EOF or reset) within the timeout."""
        self.sock.settimeout(timeout)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False
