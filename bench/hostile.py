"""``python -m bench.hostile --seed N --minutes M``: randomized hostile input against the real
``edgelink serve`` (issue 20), next to one well-behaved authenticated client.

Each round draws, from the seed, an endpoint, a body shape (deep, wide, tiny keys, emoji,
a huge string), a client behaviour (not reading, trickling, pipelining, disconnecting at
once), a number of clients (1-50) and whether they carry the token, and runs them against
the gateway for a few seconds while the good client ingests an event every ~50 ms. At the
end it checks the promises of API.md §1:

- the gateway's peak resident memory (``VmHWM``) stays under 80 MiB;
- in rounds whose attackers are all anonymous, the good client got no refusal and no
  timeout (anonymous clients cannot make the gateway refuse an authenticated request);
- every event the good client was answered 201 for is in the ledger (read after stop).

The modules are one loopback server in a thread: the task route answers a small JSON,
the stream route streams 64 KiB chunks until the caller goes. The seed is printed first
and with every failure, so a failing run can be repeated exactly.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import orjson

from edgelink.config import KNOB, MIB, MODULE_DEFAULTS

TOKEN = "hostile-token-0123456789"
BUDGET_MIB = 80
SOFT_MIB = KNOB["memory_soft"].default / MIB  # the gateway runs with the default settings
ENDPOINTS = (  # method, path, whether it takes a body
    ("POST", "/events/ingest", True), ("POST", "/vx11/intent/task", True), ("POST", "/vx11/intent/stream", True),
    ("POST", "/operator/chat", True), ("GET", "/health", False), ("GET", "/openapi.json", False),
    ("GET", "/metrics", False), ("GET", "/operator/snapshot", False),
)
SHAPES = ("deep", "wide", "tiny_keys", "emoji", "huge_string")
BEHAVIOURS = ("non_reading", "trickling", "pipelining", "disconnecting")
MAX_BODY = 1024 * 1024


def body_of(shape: str, size: int, rng: random.Random) -> bytes:
    """A JSON document of about ``size`` bytes (at most the body limit) of the given shape."""
    size = min(size, MAX_BODY - 1024)
    if shape == "deep":  # many 60-deep nests side by side: depth under the limit, many containers
        one = b"[" * 60 + b"]" * 60
        return b'{"source":"h","type":"x.deep","payload":{"d":[' + b",".join([one] * max(1, size // 121)) + b"]}}"
    if shape == "wide":
        return b'{"source":"h","type":"x.wide","payload":{"w":[' + b",".join([b"[]"] * max(1, size // 3)) + b"]}}"
    if shape == "tiny_keys":
        pairs = b",".join(b'"%x":0' % i for i in range(max(1, size // 9)))
        return b'{"source":"h","type":"x.keys","payload":{' + pairs + b"}}"
    if shape == "emoji":
        text = "".join(rng.choice("😀🚀🔥✨🧠") for _ in range(max(1, size // 4)))
        return orjson.dumps({"source": "h", "type": "x.emoji", "message": text, "payload": {"m": text}})
    return orjson.dumps({"source": "h", "type": "x.huge", "message": "s" * size, "payload": {"s": "s" * 8}})


# --- the modules -------------------------------------------------------------------------


class Modules:
    """Every module on one loopback port: /switch/stream streams, everything else answers JSON."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        conn.settimeout(60)
        try:
            while not self._stop.is_set():
                head, body, buf = read_message(conn, buf)  # a close ends the loop (OSError)
                length = len(body)
                path = head.split(b" ", 2)[1]
                if path == b"/switch/stream":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
                    data = b"data: " + b"z" * 65530 + b"\n\n"
                    for _ in range(400):  # ~26 MB, or until the gateway hangs up
                        conn.sendall(b"%x\r\n%s\r\n" % (len(data), data))
                    conn.sendall(b"0\r\n\r\n")
                    continue
                reply = orjson.dumps({"status": "ok", "response": "fine", "model_used": "h", "got": length})
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(reply), reply))
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()


# --- the gateway -------------------------------------------------------------------------


@dataclass
class Gateway:
    proc: subprocess.Popen
    port: int
    db: Path
    log: Path

    def peak_mib(self) -> float:
        return self._status_mib("VmHWM")

    def rss_mib(self) -> float:
        return self._status_mib("VmRSS")

    def _status_mib(self, field: str) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no {field}")


def start_gateway(workdir: Path, module_url: str) -> Gateway:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGELINK_", "VX11_", "TENTACULO"))}
    env.update({name: module_url for _, name, _ in MODULE_DEFAULTS})
    env.update(VX11_GATEWAY_TOKEN=TOKEN, EDGELINK_DB=str(workdir / "hostile.db"), EDGELINK_PROBE_INTERVAL="0",
               EDGELINK_HOST="127.0.0.1", EDGELINK_LEDGER_SYNC="normal")
    log = workdir / "hostile.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("edgelink")), "serve", "--port", "0"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in log.read_bytes().splitlines():
            if line.startswith(b"{") and b'"event":"started"' in line:
                return Gateway(proc, orjson.loads(line)["port"], workdir / "hostile.db", log)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"the gateway did not start:\n{log.read_text()}")


# --- clients -----------------------------------------------------------------------------


def request_bytes(method: str, path: str, body: bytes, token: bool) -> bytes:
    auth = b"X-VX11-Token: %s\r\n" % TOKEN.encode() if token else b""
    framing = b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body) if body else b""
    return b"%s %s HTTP/1.1\r\nHost: h\r\n%s%s\r\n" % (method.encode(), path.encode(), auth, framing)


def attacker(port: int, behaviour: str, raw_head: bytes, body: bytes, until: float, rng: random.Random) -> None:
    """One hostile client until ``until`` (monotonic), reconnecting as its behaviour needs."""
    while time.monotonic() < until:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            time.sleep(0.05)
            continue
        try:
            if behaviour == "non_reading":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.settimeout(1)
                for _ in range(8):
                    sock.sendall(raw_head + body)
                while time.monotonic() < until:
                    time.sleep(0.2)
            elif behaviour == "trickling":
                sock.sendall(raw_head + body[: len(body) // 2])
                rest = body[len(body) // 2:]
                while rest and time.monotonic() < until:
                    sock.sendall(rest[:16])
                    rest = rest[16:]
                    time.sleep(0.5)
            elif behaviour == "pipelining":
                sock.settimeout(5)
                sock.sendall((raw_head + body) * 4)
                while sock.recv(65536):
                    if time.monotonic() >= until:
                        break
            else:  # disconnecting: the whole request, then a reset at once
                sock.sendall(raw_head + body)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass
        finally:
            sock.close()
        time.sleep(rng.random() * 0.05)


@dataclass
class GoodClient:
    """Ingests one event every ~50 ms on its own keep-alive connection, noting every answer."""

    port: int
    stored: list[str] = field(default_factory=list)  # event ids answered 201
    refusals: list[tuple[float, str]] = field(default_factory=list)  # (monotonic time, what)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        sock, n = None, 0
        while not self._stop.is_set():
            n += 1
            body = orjson.dumps({"source": "good", "type": "system.alert", "payload": {
                "alert_id": f"a{n}", "severity": "info", "message": "m", "timestamp": 1}})
            sent = time.monotonic()
            try:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
                sock.sendall(request_bytes("POST", "/events/ingest", body, True) + body)
                status, reply = read_response(sock)
                if status == 201:
                    self.stored.append(orjson.loads(reply)["event_id"])
                else:
                    self.refusals.append((sent, f"{status} {reply[:200]!r}"))
            except (OSError, ValueError) as exc:
                self.refusals.append((sent, f"{type(exc).__name__}: {exc}"))
                if sock is not None:
                    sock.close()
                sock = None
            time.sleep(0.05)
        if sock is not None:
            sock.close()

    def stop(self) -> None:
        self._stop.set()


def read_message(sock: socket.socket, buf: bytes = b"") -> tuple[bytes, bytes, bytes]:
    """One HTTP message from ``sock`` after the bytes already in ``buf``: its head, its body
    (by Content-Length) and what follows it; ConnectionError if the peer closes first."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a whole head")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        rest += chunk
    return head, rest[:length], rest[length:]


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    head, body, _ = read_message(sock)
    if b"connection: close" in head.lower():
        raise ConnectionError(f"closed after {head.split(b' ', 2)[1].decode()}")
    return int(head.split(b" ", 2)[1]), body


# --- the run -----------------------------------------------------------------------------


@dataclass
class Round:
    endpoint: tuple[str, str, bool]
    shape: str
    behaviour: str
    clients: int
    token: bool
    size: int
    started: float = 0.0
    ended: float = 0.0

    def label(self) -> str:
        method, path, _ = self.endpoint
        who = "authenticated" if self.token else "anonymous"
        return f"{self.clients} {who} {self.behaviour} {method} {path} {self.shape} {self.size >> 10} KiB"


def draw(rng: random.Random, max_clients: int) -> Round:
    return Round(rng.choice(ENDPOINTS), rng.choice(SHAPES), rng.choice(BEHAVIOURS), rng.randint(1, max_clients),
                 rng.random() < 0.4, rng.choice((512, 16 << 10, 256 << 10, 900 << 10)))


def run(seed: int, seconds: float, round_seconds: float = 4.0, max_clients: int = 50,
        say: Callable[[str], None] = print) -> list[str]:
    """Rounds for ``seconds``; the problems found (empty if every promise held)."""
    rng = random.Random(seed)
    say(f"hostile: seed {seed}, {seconds:.0f} s")
    modules = Modules()
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        gw = start_gateway(Path(tmp), modules.url)
        good = GoodClient(gw.port)
        good_thread = threading.Thread(target=good.run, daemon=True)
        good_thread.start()
        rounds: list[Round] = []
        end = time.monotonic() + seconds
        try:
            while time.monotonic() < end:
                r = draw(rng, max_clients)
                method, path, takes_body = r.endpoint
                body = body_of(r.shape, r.size, rng) if takes_body or rng.random() < 0.3 else b""
                head = request_bytes(method, path, body, r.token)
                r.started = time.monotonic()
                until = r.started + round_seconds
                threads = [threading.Thread(target=attacker, daemon=True,
                                            args=(gw.port, r.behaviour, head, body, until, random.Random(rng.random())))
                           for _ in range(r.clients)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(round_seconds + 15)
                r.ended = time.monotonic()
                rounds.append(r)
                say(f"  round {len(rounds)}: {r.label()}: peak {gw.peak_mib():.1f} MiB")
                # What a round left behind is given back before the next, so that a refusal
                # of the good client during a round is that round's doing: an authenticated
                # round may rightly take the process over EDGELINK_MEMORY_SOFT (the idle process
                # plus the whole account is above it), and the overload manager then refuses
                # new bodies until the memory is back under the mark.
                settle = time.monotonic() + 15
                time.sleep(0.5)
                while gw.rss_mib() >= SOFT_MIB - 2 and time.monotonic() < settle:
                    time.sleep(0.1)
        finally:
            good.stop()
            good_thread.join(15)
            peak = gw.peak_mib()
            gw.proc.send_signal(signal.SIGTERM)
            try:
                gw.proc.wait(30)
            except subprocess.TimeoutExpired:
                gw.proc.kill()
                problems.append("the gateway did not stop within 30 s of SIGTERM")
            modules.stop()
        say(f"hostile: {len(rounds)} rounds, peak RSS {peak:.1f} MiB, good client: {len(good.stored)} stored, "
            f"{len(good.refusals)} refused or failed")
        if peak >= BUDGET_MIB:
            problems.append(f"peak RSS {peak:.1f} MiB >= {BUDGET_MIB} MiB")
        for sent, what in good.refusals:
            during = [r for r in rounds if r.started <= sent <= r.ended + 0.5]
            if during and not any(r.token for r in during):
                problems.append(f"the good client was refused during anonymous round(s) "
                                f"{'; '.join(r.label() for r in during)}: {what}")
        with sqlite3.connect(gw.db) as db:
            have = {row[0] for row in db.execute("SELECT event_id FROM events WHERE source = 'good'")}
        missing = [e for e in good.stored if e not in have]
        if missing:
            problems.append(f"{len(missing)} events answered 201 are not in the ledger (first: {missing[0]})")
        if not good.stored:
            problems.append("the good client got nothing stored")
    for problem in problems:
        say(f"hostile: seed {seed}: {problem}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=None, help="the run's seed (default: a random one, printed)")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--max-clients", type=int, default=50)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    problems = run(seed, args.minutes * 60, max_clients=args.max_clients)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
