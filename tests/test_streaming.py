"""Streaming routes and streamed chat (API.md §3, §4) over real sockets, against a real
loopback module that streams."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import h11
import orjson
import pytest

from conftest import Settled, assert_error, module_env, received, until, wait_for_log, wait_until
from edgelink.api.chat import _TextDeltas
from fakemodule import HANG, FakeModule

SSE = b"text/event-stream"


@dataclass
class StreamPlan:
    """How a path streams: ``chunks`` one by one; after ``gate_after`` of them, wait for
    ``gate``; then ``then``: ``end`` (last chunk), ``stall`` (silence until the client
    leaves) or ``endless`` (``chunk`` again and again, as fast as TCP lets it)."""

    chunks: list[bytes]
    content_type: bytes = SSE
    then: str = "end"
    gate_after: int | None = None
    gate: threading.Event = field(default_factory=threading.Event)
    chunk: bytes = b"x" * 65536


class StreamingModule(FakeModule):
    """A FakeModule whose paths may stream (``reply(path, StreamPlan(...))``); it counts the
    body bytes it got out and notes when a streaming connection ended."""

    def __init__(self, name: str = "fake"):
        super().__init__(name)
        self.sent = 0
        self.ended: list[float] = []  # time.monotonic() when a stream's connection ended

    async def _answer(self, h: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      behaviour: str, status: int, data: Any) -> bool:
        if not isinstance(data, StreamPlan):
            return await super()._answer(h, reader, writer, behaviour, status, data)
        try:
            writer.write(h.send(h11.Response(status_code=status, headers=[
                (b"content-type", data.content_type), (b"transfer-encoding", b"chunked")])))
            for i, chunk in enumerate(data.chunks):
                if i == data.gate_after:
                    await until(data.gate.is_set, 120, "the test opens the gate")
                writer.write(h.send(h11.Data(data=chunk)))
                await writer.drain()
                self.sent += len(chunk)
            if data.then == "stall":
                await reader.read()
                return False
            while data.then == "endless":
                writer.write(h.send(h11.Data(data=data.chunk)))
                await writer.drain()
                self.sent += len(data.chunk)
            writer.write(h.send(h11.EndOfMessage()))
            await writer.drain()
            return True
        except ConnectionError:
            return False
        finally:
            if h.our_state is not h11.DONE:
                self.ended.append(time.monotonic())


class StreamClient:
    """A raw HTTP/1.1 client reading a response a body chunk at a time (h11 parses)."""

    def __init__(self, port: int, http10: bool = False):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.h = h11.Connection(h11.CLIENT)
        self.http10 = http10

    def send(self, method: str, path: str, body: Any = None, token: str = "", headers: list | None = None) -> None:
        data = orjson.dumps(body) if body is not None else b""
        if self.h.our_state is h11.DONE and self.h.their_state is h11.DONE:
            self.h.start_next_cycle()
        hdrs = [("host", "t"), ("content-length", str(len(data))), *(headers or [])]
        if token:
            hdrs.append(("x-vx11-token", token))
        if self.http10:  # h11 speaks 1.1 only: write the 1.0 request by hand
            self.sock.sendall(f"{method} {path} HTTP/1.0\r\n".encode()
                              + "".join(f"{k}: {v}\r\n" for k, v in hdrs).encode() + b"\r\n" + data)
            self.h = h11.Connection(h11.CLIENT)
            self.h.send(h11.Request(method=method, target=path, headers=hdrs))
            self.h.send(h11.Data(data=data))
            self.h.send(h11.EndOfMessage())
            return
        self.sock.sendall(self.h.send(h11.Request(method=method, target=path, headers=hdrs))
                          + self.h.send(h11.Data(data=data)) + self.h.send(h11.EndOfMessage()))

    def _event(self) -> Any:
        while True:
            event = self.h.next_event()
            if event is h11.NEED_DATA:
                self.h.receive_data(self.sock.recv(65536))
                continue
            return event

    def head(self) -> tuple[int, dict[str, str]]:
        event = self._event()
        assert isinstance(event, h11.Response), event
        return event.status_code, {k.decode(): v.decode() for k, v in event.headers}

    def chunk(self) -> bytes | None:
        """The next body bytes, None at the end of the body."""
        event = self._event()
        if isinstance(event, h11.EndOfMessage):
            return None
        assert isinstance(event, h11.Data), event
        return event.data

    def rest(self) -> bytes:
        parts = []
        while (part := self.chunk()) is not None:
            parts.append(part)
        return b"".join(parts)

    def close(self) -> None:
        self.sock.close()


def events(body: bytes) -> list[tuple[str, Any]]:
    """The (event, JSON data) pairs of an SSE body."""
    out = []
    for block in body.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in fields:
            out.append((fields.get("event", "message"), orjson.loads(fields["data"])))
    return out


def data(text: str, **extra: Any) -> bytes:
    return b"data: %s\n\n" % orjson.dumps({"text": text, **extra})


@pytest.fixture
def switch() -> Any:
    module = StreamingModule("switch").start()
    yield module
    module.stop()


def test_intent_relays_each_chunk_as_it_arrives_and_keeps_the_connection(switch, gateway_factory):
    plan = StreamPlan([data("one"), data("two"), data("three")], gate_after=1)
    switch.reply("/switch/stream", plan)
    gw = gateway_factory(module_env({"switch": switch}))
    client = StreamClient(gw.port)
    client.send("POST", "/vx11/intent/stream", {"prompt": "p"}, gw.token, [("x-correlation-id", "corr-stream-1")])
    status, headers = client.head()
    assert status == 200 and headers["content-type"] == "text/event-stream"
    assert headers["transfer-encoding"] == "chunked" and "content-length" not in headers
    assert headers["cache-control"] == "no-cache" and headers["x-accel-buffering"] == "no"
    assert headers["x-correlation-id"] == "corr-stream-1"
    # The first event is through while the module still holds back the others.
    assert client.chunk() == data("one") and not plan.gate.is_set()
    plan.gate.set()
    assert client.rest() == data("two") + data("three")
    [request] = received(switch, "/switch/stream")
    assert request.headers["x-correlation-id"] == "corr-stream-1" and request.json == {"prompt": "p"}
    client.send("GET", "/health")  # keep-alive: the same connection serves the next request
    assert client.head()[0] == 200
    client.close()
    metrics = gw.get("/metrics").body.decode()
    assert 'edgelink_streams_open{route="/vx11/intent/{intent}"} 0' in metrics
    assert 'edgelink_stream_first_byte_seconds_count{route="/vx11/intent/{intent}"} 1' in metrics
    assert f'edgelink_stream_bytes_total{{route="/vx11/intent/{{intent}}"}} {3 * len(data("one")) + 2}' in metrics
    # A stream read to its end gives its upstream connection back to the pool.
    switch.reply("/switch/stream", StreamPlan([data("again")]))
    assert gw.post("/vx11/intent/stream", {}).body == data("again")
    first, second = received(switch, "/switch/stream")
    assert second.connection == first.connection


def test_http10_caller_gets_a_close_delimited_stream(switch, gateway_factory):
    switch.reply("/switch/stream", StreamPlan([b"alpha ", b"beta"], content_type=b"text/plain"))
    gw = gateway_factory(module_env({"switch": switch}))
    client = StreamClient(gw.port, http10=True)
    client.send("POST", "/vx11/intent/stream", {}, gw.token)
    raw = b""
    client.sock.settimeout(10)
    while chunk := client.sock.recv(65536):
        raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"connection: close" in head
    assert b"transfer-encoding" not in head and b"content-length" not in head
    assert body == b"alpha beta"


def test_headers_then_silence_is_a_504_and_counts_for_the_breaker(switch, gateway_factory):
    switch.reply("/switch/stream", StreamPlan([], then="stall"))
    gw = gateway_factory(module_env({"switch": switch}, EDGELINK_STREAM_IDLE="0.5"))
    reply = gw.post("/vx11/intent/stream", {})
    assert_error(reply, 504, "upstream_timeout", module="switch")
    assert gw.get("/vx11/circuit-breaker/status").json()["breakers"]["switch"]["failure_count"] == 1
    wait_until(lambda: switch.ended)  # the gateway hung up on the silent module


@pytest.mark.parametrize("content_type", [SSE, b"text/plain"])
def test_silence_mid_stream_ends_it_with_an_error_marker(switch, gateway_factory, content_type):
    switch.reply("/switch/stream", StreamPlan([data("first")], content_type=content_type, then="stall"))
    gw = gateway_factory(module_env({"switch": switch}, EDGELINK_STREAM_IDLE="0.5"))
    client = StreamClient(gw.port)
    client.send("POST", "/vx11/intent/stream", {}, gw.token)
    assert client.head()[0] == 200
    assert client.chunk() == data("first")
    if content_type == SSE:
        assert events(client.rest())[-1] == ("error", {"error": "upstream_timeout", "module": "switch",
                                                       "detail": "nothing from the module for 0.5 s"})
    else:  # no last chunk: the caller's HTTP parser sees the body cut short
        with pytest.raises(h11.RemoteProtocolError):
            client.rest()
    # The first byte came: the breaker judged it a success, the silence later is not its to count.
    assert gw.get("/vx11/circuit-breaker/status").json()["breakers"]["switch"]["failure_count"] == 0
    client.close()


def test_module_that_never_answers_times_out_at_the_route_timeout(switch, gateway_factory, tmp_path):
    switch.behave("/switch/tokens", HANG)
    config = tmp_path / "edgelink.toml"
    config.write_text('[routes.tokens]\nmodule = "switch"\nendpoint = "/switch/tokens"\ntimeout = 0.5\n'
                      'stream = true\n')
    gw = gateway_factory(module_env({"switch": switch}), args=["--config", str(config)])
    assert gw.get("/vx11/routes").json()["routes"]["tokens"]["stream"] is True
    assert_error(gw.post("/vx11/intent/tokens", {}), 504, "upstream_timeout", module="switch")


def test_slow_caller_pauses_an_endless_module_and_memory_stays_flat(switch, gateway_factory):
    switch.reply("/switch/stream", StreamPlan([], content_type=b"application/octet-stream", then="endless"))
    gw = gateway_factory(module_env({"switch": switch}))
    client = StreamClient(gw.port)
    client.send("POST", "/vx11/intent/stream", {}, gw.token)
    assert client.head()[0] == 200
    before = gw.peak_rss_mib()
    got = 0
    while got < 48 * 1024 * 1024:  # read slowly: small reads with pauses
        got += len(client.chunk() or b"")
        if got % (4 * 1024 * 1024) < 65536:
            time.sleep(0.05)  # real time: a slow reader
            # TCP holds the module back: what it sent beyond what we read is socket buffers.
            assert switch.sent - got < 32 * 1024 * 1024, (switch.sent, got)
    growth = gw.peak_rss_mib() - before
    assert growth < 8, f"gateway peak RSS grew {growth:.1f} MiB relaying {got >> 20} MiB"
    client.close()
    wait_until(lambda: switch.ended)


def test_caller_leaving_mid_stream_closes_the_module_connection_at_once(switch, gateway_factory):
    # The module goes quiet after its first event: only the caller's leaving can end this.
    switch.reply("/switch/stream", StreamPlan([data("hello")], then="stall"))
    gw = gateway_factory(module_env({"switch": switch}))
    client = StreamClient(gw.port)
    client.send("POST", "/vx11/intent/stream", {}, gw.token)
    assert client.head()[0] == 200 and client.chunk()
    left = time.monotonic()
    client.close()
    wait_until(lambda: switch.ended, timeout=5)
    assert switch.ended[0] - left < 1.0, "the module's connection outlived the caller by over 1 s"
    wait_until(lambda: 'edgelink_streams_open{route="/vx11/intent/{intent}"} 0'
               in gw.get("/metrics").body.decode())
    assert gw.get("/vx11/circuit-breaker/status").json()["breakers"]["switch"]["failure_count"] == 0


def test_200_concurrent_streams_stay_within_budget(switch, gateway_factory):
    plan = StreamPlan([data(f"part {i} " + "y" * 500) for i in range(4)], gate_after=1)
    switch.reply("/switch/stream", plan)
    gw = gateway_factory(module_env({"switch": switch}))
    clients = [StreamClient(gw.port) for _ in range(200)]
    for c in clients:
        c.send("POST", "/vx11/intent/stream", {}, gw.token)
    for c in clients:
        assert c.head()[0] == 200 and c.chunk().startswith(b"data:")
    assert 'edgelink_streams_open{route="/vx11/intent/{intent}"} 200' in gw.get("/metrics").body.decode()
    plan.gate.set()
    for c in clients:
        assert len(events(c.rest())) == 3
        c.close()
    peak = gw.peak_rss_mib()
    assert peak < 80, f"peak RSS {peak:.1f} MiB with 200 concurrent streams"


def test_stream_in_flight_at_sigterm_finishes_within_the_grace(switch, gateway_factory):
    plan = StreamPlan([data("a"), data("b")], gate_after=1)
    switch.reply("/switch/stream", plan)
    gw = gateway_factory(module_env({"switch": switch}, EDGELINK_SHUTDOWN_GRACE="10"))
    client = StreamClient(gw.port)
    client.send("POST", "/vx11/intent/stream", {}, gw.token)
    assert client.head()[0] == 200 and client.chunk() == data("a")
    gw.proc.send_signal(signal.SIGTERM)
    wait_for_log(gw.log_path, "stopping", gw.proc)
    plan.gate.set()
    assert client.rest() == data("b")
    assert gw.proc.wait(15) == 0


def test_stream_still_running_when_the_grace_ends_is_ended_cleanly(switch, gateway_factory):
    switch.reply("/switch/stream", StreamPlan([data("a")], then="stall"))
    gw = gateway_factory(module_env({"switch": switch}, EDGELINK_SHUTDOWN_GRACE="0.5"))
    client = StreamClient(gw.port)
    client.send("POST", "/vx11/intent/stream", {}, gw.token)
    assert client.head()[0] == 200 and client.chunk() == data("a")
    gw.proc.send_signal(signal.SIGTERM)
    assert client.chunk() is None  # the last chunk, not a reset
    assert gw.proc.wait(15) == 0


# --- chat with "stream": true (API.md §4) --------------------------------------------------

def chat_stream(gw: Any, message: str = "hi", **extra: Any) -> tuple[int, dict[str, str], bytes]:
    client = StreamClient(gw.port)
    client.send("POST", "/operator/chat", {"message": message, "stream": True, **extra}, gw.token,
                [("x-correlation-id", "corr-chat-1")])
    status, headers = client.head()
    body = client.rest()
    client.close()
    return status, headers, body


def test_streamed_chat_sends_meta_deltas_done_and_records_the_reply(switch, gateway_factory):
    switch.reply("/switch/stream", StreamPlan([b": comment\n\n", data("Hel"), data("lo", model_used="m-9"),
                                               b"data: [DONE]\n\n"]))
    gw = gateway_factory(module_env({"switch": switch}))
    status, headers, body = chat_stream(gw)
    assert status == 200 and headers["content-type"] == "text/event-stream"
    got = events(body)
    assert [e for e, _ in got] == ["meta", "delta", "delta", "done"]
    meta = got[0][1]
    assert meta["correlation_id"] == "corr-chat-1" and meta["provider"] == "switch"
    assert [d["text"] for _, d in got[1:3]] == ["Hel", "lo"]
    done = got[-1][1]
    assert done["response"] == "Hello" and done["model_used"] == "m-9" and done["degraded"] is False
    [request] = received(switch, "/switch/stream")
    assert request.json["message"] == "hi" and request.json["correlation_id"] == "corr-chat-1"
    assert request.headers["x-correlation-id"] == "corr-chat-1"
    session = gw.get(f"/operator/session/{meta['session_id']}").json()
    assert [(m["role"], m["content"]) for m in session["messages"]] == [("user", "hi"), ("assistant", "Hello")]


def test_streamed_chat_falls_back_to_madre_before_the_first_byte(fake, gateway_factory):
    madre = fake("madre")
    madre.reply("/madre/chat", {"response": "from madre", "model_used": "madre-1"})
    gw = gateway_factory(module_env({"madre": madre}))  # switch is down
    status, _, body = chat_stream(gw)
    got = events(body)
    assert status == 200 and [e for e, _ in got] == ["meta", "delta", "done"]
    assert got[0][1]["provider"] == "madre" and got[1][1] == {"text": "from madre"}
    assert got[2][1]["degraded"] is True and got[2][1]["model_used"] == "madre-1"


def test_streamed_chat_failing_mid_stream_ends_with_an_error_event(switch, gateway_factory):
    switch.reply("/switch/stream", StreamPlan([data("partial")], then="stall"))
    gw = gateway_factory(module_env({"switch": switch}, EDGELINK_STREAM_IDLE="0.5"))
    status, _, body = chat_stream(gw)
    assert status == 200
    assert [e for e, _ in events(body)] == ["meta", "delta", "error"]
    assert events(body)[-1][1] == {"error": "chat_unavailable"}


def test_streamed_chat_with_nothing_answering_is_503(gateway_factory):
    gw = gateway_factory(module_env())
    reply = gw.post("/operator/chat", {"message": "hi", "stream": True})
    assert_error(reply, 503, "chat_unavailable")
    assert_error(gw.post("/operator/chat", {"message": "hi", "stream": "yes"}), 422, "validation_error")


def test_text_deltas_read_sse_split_anywhere_and_plain_text():
    deltas = _TextDeltas(b"text/event-stream; charset=utf-8", "switch")
    stream = b'event: x\ndata: {"delta": "a\xc3\xa9"}\r\n\r\ndata: plain words\n\ndata: {"status": 1}\n\n'
    texts = [t for i in range(len(stream)) for t in deltas.feed(stream[i:i + 1])]
    assert texts == ["a\u00e9", "plain words"]
    plain = _TextDeltas(b"text/plain", "switch")
    assert plain.feed(b"caf\xc3") + plain.feed(b"\xa9!") == ["caf", "\u00e9!"]


# --- the transport alone: an in-process HttpServer on a loopback socket -------------------

class _Producer:
    """A dispatcher answering every request with a stream of ``size``-byte chunks; it
    notes how much it produced and whether its generator was closed."""

    def __init__(self, size: int = 16384, count: int | None = None, fail_after: int | None = None):
        self.size, self.count, self.fail_after = size, count, fail_after
        self.produced = 0
        self.closed = asyncio.Event()

    async def _chunks(self) -> Any:
        try:
            i = 0
            while self.count is None or i < self.count:
                if i == self.fail_after:
                    raise RuntimeError("producer failed")
                self.produced += self.size
                yield b"z" * self.size
                i += 1
        finally:
            self.closed.set()

    async def handle(self, req: Any) -> Any:
        from edgelink.http.messages import StreamingResponse
        return StreamingResponse(200, b"first", [], b"text/plain", chunks=self._chunks())

    def respond(self, req: Any) -> Any:
        return self.handle(req)  # a coroutine: the server runs it in a task

    def websocket(self, req: Any) -> Any:
        raise AssertionError("no WebSocket here")


async def _serving(producer: _Producer) -> Any:
    from edgelink.config import Settings
    from edgelink.http.server import HttpServer
    server = HttpServer(producer, Settings())
    await server.start("127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_a_client_that_does_not_read_holds_at_most_one_chunk_in_the_gateway():
    async def run() -> None:
        producer = _Producer()
        server, port = await _serving(producer)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # keep the kernel's share small
        writer.write(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
        # until the producer is no longer asked for chunks: its count holds still for 0.2 s
        await until(Settled(lambda: producer.produced, 0.2))
        [conn] = server.connections
        # What waits in the process is the one chunk that did not fit in the kernel's buffer.
        assert conn.transport.get_write_buffer_size() <= producer.size + 16
        assert not producer.closed.is_set()
        writer.close()
        await asyncio.wait_for(producer.closed.wait(), 5)  # the caller left: the generator is closed
        await server.shutdown(0)

    asyncio.run(run())


def test_head_gets_the_head_only_and_a_failing_producer_truncates_the_body():
    async def run() -> None:
        producer = _Producer(count=3)
        server, port = await _serving(producer)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"HEAD /x HTTP/1.1\r\nHost: t\r\n\r\n")
        h = h11.Connection(h11.CLIENT)
        h.send(h11.Request(method="HEAD", target="/x", headers=[("host", "t")]))
        h.send(h11.EndOfMessage())
        events = []
        while not any(isinstance(e, h11.EndOfMessage) for e in events):
            event = h.next_event()
            if event is h11.NEED_DATA:
                h.receive_data(await reader.read(65536))
            else:
                events.append(event)
        assert events[0].status_code == 200 and [type(e) for e in events[1:]] == [h11.EndOfMessage]
        assert producer.produced == 0  # never asked for a chunk
        h.start_next_cycle()
        h.send(h11.Request(method="GET", target="/x", headers=[("host", "t")]))
        h.send(h11.EndOfMessage())
        writer.write(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
        body = b""
        while True:  # the same connection serves the next request
            event = h.next_event()
            if event is h11.NEED_DATA:
                h.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        assert body == b"first" + b"z" * 3 * producer.size
        writer.close()

        failing = _Producer(count=3, fail_after=1)
        server.dispatcher = failing
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 5)  # the server closes the connection
        assert raw.endswith(b"z" * failing.size + b"\r\n") and b"\r\n0\r\n\r\n" not in raw
        writer.close()
        await server.shutdown(0)

    asyncio.run(run())


def test_demo_switch_streams_the_chat_word_by_word(gateway_factory):
    gw = gateway_factory(command="demo")
    client = StreamClient(gw.port)
    client.send("POST", "/operator/chat", {"message": "hi there", "stream": True}, gw.token)
    assert client.head()[0] == 200
    chunks = []
    while (chunk := client.chunk()) is not None:
        chunks.append(chunk)
    client.close()
    got = events(b"".join(chunks))
    words = [d["text"] for e, d in got if e == "delta"]
    # The words come 80 ms apart, each in its own chunk unless a loaded box delays some together.
    assert len(words) > 5 and len(chunks) > 3
    done = got[-1]
    assert done[0] == "done" and done[1]["response"] == "".join(words) and done[1]["response"].endswith("hi there")
    assert done[1]["provider"] == "switch" and done[1]["degraded"] is False


def test_stream_flag_in_the_route_table(tmp_path):
    from edgelink.config import ConfigError, load_settings

    env = {"VX11_GATEWAY_TOKEN": "t"}
    assert [r.intent for r in load_settings(env=env).intents if r.stream] == ["stream"]
    config = tmp_path / "edgelink.toml"
    config.write_text('[routes.stream]\nstream = false\n[routes.code]\nstream = true\n')
    routes = {r.intent: r for r in load_settings(env=env, config_file=str(config)).intents}
    assert routes["stream"].stream is False and routes["stream"].endpoint == "/switch/stream"
    assert routes["code"].stream is True
    config.write_text('[routes.code]\nstream = "sometimes"\n')
    with pytest.raises(ConfigError, match="routes.code"):
        load_settings(env=env, config_file=str(config))


@pytest.mark.parametrize("path", ["/vx11/intent/stream", "/operator/chat"])
def test_caller_leaving_before_the_first_byte_closes_the_module_connection(switch, gateway_factory, path):
    # Headers, then nothing: within the 30 s idle bound only the caller's leaving ends this.
    switch.reply("/switch/stream", StreamPlan([], then="stall"))
    madre = StreamingModule("madre").start()
    try:
        gw = gateway_factory(module_env({"switch": switch, "madre": madre}))
        client = StreamClient(gw.port)
        client.send("POST", path, {"message": "hi", "stream": True}, gw.token)
        wait_until(lambda: received(switch, "/switch/stream"))
        time.sleep(0.2)  # real time: the module's head is in, the gateway waits for its first byte (unseen from here)
        left = time.monotonic()
        client.close()
        wait_until(lambda: switch.ended, timeout=5)
        assert switch.ended[0] - left < 1.0, "the module's connection outlived the caller by over 1 s"
        assert not received(madre, "/madre/chat")  # nobody to answer: no fallback
        breaker = gw.get("/vx11/circuit-breaker/status").json()["breakers"]["switch"]
        assert breaker == {"state": "closed", "failure_count": 0, "last_failure": None}
    finally:
        madre.stop()
