"""Real brokers for the forwarding tests: Debian's nats-server (JetStream) and mosquitto,
started as plain processes on unused loopback ports with their files in a temp dir, and a
small TCP proxy that can delay traffic or blackhole the broker's replies.

A missing broker binary skips the test on a developer box and FAILS it in CI (CI=true),
so the fault tests always run where it matters.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from conftest import wait_until
from fakemodule import unused_port


def need_binary(name: str, packages: str = "nats-server mosquitto") -> str:
    """The path of ``name``; skipped without it, failed under CI=true (Debian ``packages``)."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if path is None:
        message = f"{name} is not installed (apt-get install -y {packages})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def broker_port() -> int:
    """A free loopback port below the kernel's ephemeral range, for a broker that may start
    (again) after clients have been dialling it: a port inside that range can meanwhile be
    taken by one of their outgoing connections (a client's source port, or a TCP
    self-connect to a port nothing listens on), and the broker then fails with "Address
    already in use" (seen in CI)."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    for _ in range(100):
        port = random.randrange(max(1024, low - 10_000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 15) -> None:
    def listening() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with {proc.returncode}:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False
    try:
        wait_until(listening, timeout, f"the broker listening on {port}")
    except AssertionError:
        raise RuntimeError(f"broker did not listen on {port}:\n{log.read_text()}") from None


class Broker:
    """A broker process that can be killed and started again on the same port and files."""

    def __init__(self, tmp: Path, name: str, port: int | None = None):
        self.dir = tmp / name
        self.dir.mkdir(exist_ok=True)
        self.port = port or broker_port()
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "broker.log"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> "Broker":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        wait_port(self.port, self.proc, self.log)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(15)

    def restart(self) -> None:
        self.kill()
        self.start()


class Nats(Broker):
    def __init__(self, tmp: Path, auth: tuple[str, str] | None = None, port: int | None = None, conf: str = ""):
        super().__init__(tmp, "nats", port)
        self.binary = need_binary("nats-server")
        self.auth = auth
        self.conf = None
        if conf:  # server settings beyond the flags (max_payload, authorization)
            self.conf = self.dir / "nats.conf"
            self.conf.write_text(conf)

    def argv(self) -> list[str]:
        argv = [self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.dir / "js")]
        if self.conf is not None:
            argv += ["-c", str(self.conf)]
        if self.auth:
            argv += ["--user", self.auth[0], "--pass", self.auth[1]]
        return argv

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def add_stream(self, name: str = "VX11", subjects: str = "vx11.>", **config: Any) -> None:
        async def go() -> None:
            import nats
            nc = await nats.connect(self.url, user=self.auth and self.auth[0], password=self.auth and self.auth[1])
            await nc.jetstream().add_stream(name=name, subjects=[subjects], **config)
            await nc.close()
        asyncio.run(go())

    def purge(self, name: str = "VX11") -> None:
        """Empty the stream: the broker loses messages it had acknowledged."""
        async def go() -> None:
            import nats
            nc = await nats.connect(self.url, user=self.auth and self.auth[0], password=self.auth and self.auth[1])
            await nc.jetstream().purge_stream(name)
            await nc.close()
        asyncio.run(go())

    def stream_seqs(self, name: str = "VX11", expect: int | None = None, timeout: float = 60) -> list[dict]:
        """Every message body in the stream, oldest first, read by a pull consumer; waits
        until ``expect`` distinct seqs are there (or the timeout)."""
        async def go() -> list[dict]:
            import nats
            from nats.js.api import AckPolicy, ConsumerConfig
            nc = await nats.connect(self.url, user=self.auth and self.auth[0], password=self.auth and self.auth[1])
            js = nc.jetstream()
            bodies: list[dict] = []
            # no acks: the reader only counts, and 100,000 acks would take a minute
            sub = await js.pull_subscribe("vx11.>", stream=name,
                                          config=ConsumerConfig(ack_policy=AckPolicy.NONE))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    msgs = await sub.fetch(10_000, timeout=0.5)
                except nats.errors.TimeoutError:
                    msgs = []
                for m in msgs:
                    body = orjson.loads(m.data)
                    body["_msg_id"] = (m.headers or {}).get("Nats-Msg-Id")
                    bodies.append(body)
                if expect is None and not msgs:
                    break
                if expect is not None and len({(b["epoch"], b["seq"]) for b in bodies}) >= expect:
                    break
            await nc.close()
            return bodies
        return asyncio.run(go())


class Mosquitto(Broker):
    def __init__(self, tmp: Path, auth: tuple[str, str] | None = None, port: int | None = None,
                 durable: bool = False, tls: "TestCA | None" = None, acl: str | None = None,
                 extra: list[str] = ()):
        super().__init__(tmp, "mosquitto", port)
        self.binary = need_binary("mosquitto")
        self.auth = auth  # also the test subscriber's credentials
        # No silent drop for a queued subscriber (the default drops past 1000 messages), and
        # with ``durable`` saved at every change: the default (every 1800 s) loses PUBACKed
        # messages in a SIGKILL, and so does a 1 s interval (measured: 16 of 30,000). Saving
        # at every change costs the broker most of its speed, so only the kill test asks for it.
        lines = [f"listener {self.port} 127.0.0.1", "persistence true", f"persistence_location {self.dir}/",
                 *(["autosave_on_changes true", "autosave_interval 1"] if durable else ["autosave_interval 1"]),
                 "max_queued_messages 0", "max_inflight_messages 0", "max_queued_bytes 0", *extra]
        self.tls_port = None
        if tls is not None:
            # a second listener with TLS (its options apply to the listener above them);
            # the plain one stays for the test's subscriber
            self.tls_port = broker_port()
            lines += [f"listener {self.tls_port} 127.0.0.1", f"cafile {tls.ca}", f"certfile {tls.cert}",
                      f"keyfile {tls.key}"]
        if os.geteuid() == 0:  # as root mosquitto drops to its own user, which cannot read our temp dir
            lines.append("user root")
        if auth:
            (self.dir / "passwd").write_text("")
            subprocess.run([shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd", "-b",
                            str(self.dir / "passwd"), *auth], check=True)
            lines += ["allow_anonymous false", f"password_file {self.dir}/passwd"]
        else:
            lines.append("allow_anonymous true")
        if acl is not None:
            (self.dir / "acl").write_text(acl)
            lines.append(f"acl_file {self.dir}/acl")
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> "Mosquitto":
        super().start()
        if self.tls_port is not None:
            wait_port(self.tls_port, self.proc, self.log)
        return self

    def argv(self) -> list[str]:
        return [self.binary, "-c", str(self.conf)]

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"


class TestCA:
    """A CA and a server certificate for 127.0.0.1 made with the system's openssl."""

    __test__ = False  # not a test class for pytest

    def __init__(self, tmp: Path):
        self.dir = tmp / "ca"
        self.dir.mkdir(exist_ok=True)
        self.ca, self.cert, self.key = self.dir / "ca.pem", self.dir / "server.pem", self.dir / "server.key"
        openssl = shutil.which("openssl") or "/usr/bin/openssl"
        ca_key, csr, ext = self.dir / "ca.key", self.dir / "server.csr", self.dir / "san.ext"

        def run(*argv: str) -> None:
            subprocess.run([openssl, *argv], check=True, capture_output=True)

        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(self.ca),
            "-days", "2", "-subj", "/CN=edgelink test CA")
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key), "-out", str(csr),
            "-subj", "/CN=127.0.0.1")
        ext.write_text("subjectAltName = IP:127.0.0.1\n")
        run("x509", "-req", "-in", str(csr), "-CA", str(self.ca), "-CAkey", str(ca_key), "-CAcreateserial",
            "-out", str(self.cert), "-days", "2", "-extfile", str(ext))


class MqttSubscriber:
    """A QoS 1 subscriber with a persistent session, connected before forwarding starts,
    collecting message bodies on a paho thread."""

    def __init__(self, broker: Mosquitto, topic: str = "vx11/#", v5: bool = False):
        import paho.mqtt.client as mqtt
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        if v5:  # MQTT 5, to see the user properties (a session kept only while connected)
            self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="central-consumer",
                                      protocol=mqtt.MQTTv5)
        else:
            self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="central-consumer",
                                      clean_session=False)
        self.subscribed = threading.Event()
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.subscribed.set()
        self.client.reconnect_delay_set(0.1, 1)
        if broker.auth is not None:
            self.client.username_pw_set(*broker.auth)
        self.client.connect("127.0.0.1", broker.port, 30)
        self.client.loop_start()
        # the SUBACK, not a guess at its time: a message published before it is lost to MQTT
        assert self.subscribed.wait(10), "no SUBACK from the broker in 10 s"

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        body = orjson.loads(msg.payload)
        body["_dup"] = bool(msg.dup)  # the broker delivering again what this session missed acking
        body["_user"] = getattr(msg.properties, "UserProperty", None)  # MQTT 5 only
        with self.lock:
            self.bodies.append(body)

    def wait(self, expect: int, timeout: float = 60) -> list[dict]:
        """What arrived, once ``expect`` distinct events did (or the timeout passed: the
        caller's check then says what is missing)."""
        def enough() -> bool:
            with self.lock:
                return len({(b["epoch"], b["seq"]) for b in self.bodies}) >= expect
        try:
            wait_until(enough, timeout, f"{expect} events delivered")
        except AssertionError:
            pass
        with self.lock:
            return list(self.bodies)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Proxy:
    """A TCP proxy to a broker on its own thread: ``delay`` seconds each way, and
    ``blackhole`` swallows what the broker sends back (acks) while the client's bytes
    still reach the broker."""

    def __init__(self, target_port: int, delay: float = 0.0):
        self.target_port = target_port
        self.delay = delay
        self.blackhole = False
        self.port = unused_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task] = set()
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(5)

    async def _start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.tasks.add(asyncio.current_task())
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(self._pipe(reader, up_writer, False), self._pipe(up_reader, writer, True),
                                 return_exceptions=True)
        except asyncio.CancelledError:
            pass  # close(): asyncio's server callback would report a cancelled handler as an error
        finally:
            self.tasks.discard(asyncio.current_task())

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, replies: bool) -> None:
        # a delay line: each chunk is written ``delay`` after it was read, without holding
        # back the chunks read meanwhile (so a window of messages stays in flight)
        line: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            while (item := await line.get()) is not None:
                due, data = item
                await asyncio.sleep(due - time.monotonic())  # real time: a delay line delays
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        try:
            while data := await reader.read(65536):
                if not (replies and self.blackhole):
                    line.put_nowait((time.monotonic() + self.delay, data))
            line.put_nowait(None)
            await sender
        finally:
            sender.cancel()
            writer.close()

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    @property
    def port_url(self) -> str:
        return f"127.0.0.1:{self.port}"


def tally(bodies: list[dict], n: int) -> dict[str, int]:
    """The fault table's row for one box whose seqs 1..n were acknowledged: what the
    consumer got (distinct seqs), lost (acknowledged, never delivered), duplicated (copies
    beyond the first, the broker's own DUP redeliveries left out) and reordered (distinct
    seqs that came after a higher one)."""
    seen: set[int] = set()
    copies = reordered = high = 0
    for b in bodies:
        if b["seq"] in seen:
            copies += not b.get("_dup")
            continue
        seen.add(b["seq"])
        reordered += b["seq"] < high
        high = max(high, b["seq"])
    return {"acknowledged": n, "delivered": len(seen), "lost": len(set(range(1, n + 1)) - seen),
            "duplicated": copies, "reordered": reordered}


def check_delivery(bodies: list[dict], n: int, window: int, interruptions: int, epoch: str | None = None,
                   dead: frozenset[int] = frozenset()) -> None:
    """At the consumer: every seq 1..n present (but the ``dead`` letters), in order after
    dedup by (edge_id, epoch, seq), and at most ``window`` duplicates per interruption. Copies the broker itself
    delivered again (MQTT DUP flag: its delivery to this subscriber was not acked before a
    broker kill) are the broker's, not the forwarder's resends, and are not counted.
    The box's row of the fault table is printed (``pytest -s`` shows it)."""
    if epoch is not None:
        bodies = [b for b in bodies if b["epoch"] == epoch]
    for box in sorted({b["edge_id"] for b in bodies}):
        row = tally([b for b in bodies if b["edge_id"] == box], n)
        row["lost"] -= len(dead)
        row["dead_letters"] = len(dead)
        print(f"fault-table {os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]} box={box} "
              + " ".join(f"{k}={v}" for k, v in row.items()))
    seen: set[tuple] = set()
    order: list[int] = []
    for b in bodies:
        key = (b["edge_id"], b["epoch"], b["seq"])
        if key not in seen:
            seen.add(key)
            order.append(b["seq"])
    assert order == sorted(order), "out of order after dedup"
    expected = [seq for seq in range(1, n + 1) if seq not in dead]
    assert order == expected, (len(order), sorted(set(expected) - set(order))[:10], sorted(set(order) & dead))
    copies: dict[tuple, int] = {}
    for b in bodies:
        if not b.get("_dup"):
            key = (b["edge_id"], b["epoch"], b["seq"])
            copies[key] = copies.get(key, 0) + 1
    duplicates = sum(count - 1 for count in copies.values() if count > 1)
    assert duplicates <= window * max(1, interruptions), (duplicates, window, interruptions)


class HugeFrameServer:
    """A fake broker on its own thread: it answers a client's handshake as a NATS server
    (INFO, PONG) or an MQTT broker (CONNACK), then starts one enormous frame (a NATS MSG,
    an MQTT PUBLISH announcing ``size`` bytes) and streams its body until the client hangs
    up. ``connections`` counts clients; ``streamed`` holds the bytes each took."""

    def __init__(self, kind: str, size: int = 200 << 20):  # MQTT's largest is 256 MiB
        self.kind, self.size = kind, size
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.streamed: list[int] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{self.kind}://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.settimeout(10)
                try:
                    self._handshake(conn)
                    self.streamed.append(self._stream(conn))
                except OSError:
                    self.streamed.append(-1)

    def _handshake(self, conn: socket.socket) -> None:
        if self.kind == "mqtt":
            conn.recv(65536)  # CONNECT
            conn.sendall(b"\x20\x02\x00\x00")  # CONNACK, accepted
            return
        conn.sendall(b'INFO {"server_id":"fake","version":"2.9.10","proto":1,"headers":true,'
                     b'"max_payload":1048576,"host":"127.0.0.1","port":%d}\r\n' % self.port)
        seen = b""
        while b"SUB " not in seen or not seen.endswith(b"PING\r\n"):  # CONNECT, PING; SUB, PING
            data = conn.recv(65536)
            if not data:
                raise ConnectionError("client left")
            seen += data
            conn.sendall(b"PONG\r\n" * data.count(b"PING\r\n"))

    def _stream(self, conn: socket.socket) -> int:
        if self.kind == "mqtt":
            length, header = self.size, bytearray(b"\x30")  # PUBLISH, its remaining length as a varint
            while True:
                length, byte = divmod(length, 128)
                header.append(byte | (128 if length else 0))
                if not length:
                    break
        else:
            header = b"MSG _INBOX.fake.1 1 %d\r\n" % self.size
        conn.sendall(bytes(header))
        chunk, sent = b"x" * 65536, 0
        try:
            while sent < self.size:
                sent += conn.send(chunk)
        except OSError:
            pass
        return sent

    def close(self) -> None:
        self.listener.close()
