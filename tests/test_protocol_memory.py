"""The HTTP and WebSocket protocols driven in memory (tests/memtransport.py): limits,
pipelining, flow control, timers, closing, the upgrade and shutdown, without sockets and
without waiting for time to pass. What really crosses a socket is tested end to end in
test_http.py, test_websocket.py and the budget tests."""

from __future__ import annotations

import asyncio
import os
import struct

import orjson
from memtransport import App, MemoryTransport, connect, make_server, turns

from edgelink.http.connection import HttpProtocol
from edgelink.http.upgrade import WebSocketProtocol

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def get(path: str, *headers: str, version: str = "1.1") -> bytes:
    return (f"GET {path} HTTP/{version}\r\nHost: t\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode()


def answers(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """(status, head, body) of each response in ``data`` (Content-Length framed)."""
    found = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        found.append((status, head.lower(), rest[:length]))
        data = rest[length:]
    return found


def error_code(answer: tuple[int, bytes, bytes]) -> str:
    return orjson.loads(answer[2])["error"]


# --- limits ---------------------------------------------------------------------------


def test_request_line_over_the_limit_is_refused_414_before_it_ends():
    app = App()
    server = make_server(app, max_request_line=256)
    transport = connect(server)
    transport.send(b"GET /" + b"a" * 300)  # no line end yet: the limit is passed already
    [answer] = answers(transport.take())
    assert answer[0] == 414 and error_code(answer) == "uri_too_long"
    assert app.refusals == ["request_line"] and app.seen == []
    assert transport.eof_written  # closed, lingering


def test_header_block_over_the_limit_is_refused_431_before_it_ends():
    app = App()
    server = make_server(app, max_header=2048)
    transport = connect(server)
    transport.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"b" * 3000)
    [answer] = answers(transport.take())
    assert answer[0] == 431 and error_code(answer) == "headers_too_large"
    assert app.refusals == ["header_block"] and app.seen == []


def test_too_many_header_fields_are_refused_431_before_parsing_them():
    app = App()
    server = make_server(app, max_header_fields=8)
    transport = connect(server)
    transport.send(get("/", *(f"X-F{i}: v" for i in range(20)))[:-2])  # the head not ended yet
    [answer] = answers(transport.take())
    assert answer[0] == 431 and app.refusals == ["header_fields"] and app.seen == []


def test_a_head_within_the_field_limit_is_answered():
    app = App()
    server = make_server(app, max_header_fields=8)
    transport = connect(server)
    transport.send(get("/", *(f"X-F{i}: v" for i in range(6))))
    [answer] = answers(transport.take())
    assert answer[0] == 200 and app.refusals == []


def test_body_over_the_limit_is_refused_413_from_its_length_before_it_is_sent():
    app = App()
    server = make_server(app, max_body=100)
    transport = connect(server)
    transport.send(b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n")
    [answer] = answers(transport.take())
    assert answer[0] == 413 and error_code(answer) == "payload_too_large"
    assert app.refusals == ["body"] and app.seen == []


def test_chunked_body_over_the_limit_is_refused_413_while_it_arrives():
    app = App()
    server = make_server(app, max_body=100)
    transport = connect(server)
    transport.send(b"POST /p HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
    transport.send(b"40\r\n" + b"x" * 64 + b"\r\n")
    assert transport.take() == b""  # 64 bytes: within the limit so far
    transport.send(b"40\r\n" + b"x" * 64 + b"\r\n")
    [answer] = answers(transport.take())
    assert answer[0] == 413 and app.refusals == ["body"] and app.seen == []


# --- pipelining and flow control -------------------------------------------------------


def test_pipelined_requests_are_answered_in_order_behind_a_task():
    async def run() -> None:
        app = App()
        server = make_server(app)
        transport = connect(server)
        transport.send(get("/slow1") + get("/a") + get("/b"))
        await turns()
        assert app.seen == ["/slow1"]  # the others wait until this one is answered
        assert transport.take() == b""
        transport.send(get("/c"))  # more pipelined while answering: not read meanwhile
        assert not transport.reading
        app.slow[0].set_result(None)
        await turns()
        server.loop.run_ready()  # type: ignore[attr-defined]
        bodies = [body for _, _, body in answers(transport.take())]
        assert bodies == [b"/slow1|", b"/a|", b"/b|", b"/c|"]
        assert transport.reading

    asyncio.run(run())


def test_a_client_that_does_not_read_is_not_answered_nor_read_until_it_does():
    app = App()
    server = make_server(app)
    transport = connect(server)
    transport.client_reads = False
    transport.send(get("/first") + get("/second"))
    assert app.seen == ["/first"]  # its answer waits in our buffer: the next one is not made
    assert transport.write_paused and not transport.reading
    transport.send(get("/third"))  # held in the kernel, not read
    assert app.seen == ["/first"]
    transport.client_reads = True
    read = transport.read_all()
    server.loop.run_ready()  # type: ignore[attr-defined]
    assert app.seen == ["/first", "/second", "/third"]
    assert [body for _, _, body in answers(read + transport.take())] == [b"/first|", b"/second|", b"/third|"]
    assert transport.reading and not transport.aborted


def test_a_client_that_reads_nothing_is_dropped_after_the_send_timeout():
    app = App()
    server = make_server(app, send_timeout=30.0)
    transport = connect(server)
    transport.client_reads = False
    transport.send(get("/x"))
    server.loop.advance(29.0)  # type: ignore[attr-defined]
    assert not transport.aborted
    server.loop.advance(2.0)  # type: ignore[attr-defined]
    assert transport.aborted and app.refusals == ["write_buffer"]


# --- timers ---------------------------------------------------------------------------


def test_a_head_not_complete_in_time_gets_408():
    app = App()
    server = make_server(app, header_timeout=10.0)
    transport = connect(server)
    server.loop.advance(5.0)  # type: ignore[attr-defined]
    transport.send(b"GET / HTTP/1.1\r\nHo")
    server.loop.advance(9.0)  # type: ignore[attr-defined]
    assert transport.take() == b""  # the header timeout starts with the first byte
    server.loop.advance(2.0)  # type: ignore[attr-defined]
    [answer] = answers(transport.take())
    assert answer[0] == 408 and app.refusals == ["request_time"]


def test_a_body_trickled_in_is_cut_at_the_body_deadline():
    app = App()
    server = make_server(app, header_timeout=10.0, body_timeout=30.0)
    transport = connect(server)
    transport.send(b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n")
    for _ in range(5):  # a byte every 5 s: each buys another header timeout, up to 30 s in all
        server.loop.advance(5.0)  # type: ignore[attr-defined]
        transport.send(b"x")
    server.loop.advance(4.9)  # type: ignore[attr-defined]
    assert transport.take() == b""
    server.loop.advance(0.2)  # type: ignore[attr-defined]  # 30 s since the head, not 10 since the last byte
    [answer] = answers(transport.take())
    assert answer[0] == 408 and app.seen == []


def test_an_idle_keep_alive_connection_is_closed_quietly_after_the_timeout():
    app = App()
    server = make_server(app, keepalive_timeout=5.0, header_timeout=10.0)
    transport = connect(server)
    transport.send(get("/a"))
    assert answers(transport.take())[0][0] == 200
    server.loop.advance(4.9)  # type: ignore[attr-defined]
    assert not transport.eof_written
    server.loop.advance(0.2)  # type: ignore[attr-defined]
    assert transport.eof_written and transport.take() == b""  # no 408 for an idle connection


def test_a_fully_received_request_is_not_dropped_by_a_timer_that_falls_due_while_it_is_handled():
    async def run() -> None:
        app = App()
        server = make_server(app, keepalive_timeout=5.0, header_timeout=10.0, body_timeout=30.0)
        transport = connect(server)
        server.loop.advance(9.5)  # type: ignore[attr-defined]
        transport.send(get("/slow"))  # complete just before the header timeout
        await turns()
        server.loop.advance(60.0)  # type: ignore[attr-defined]
        assert transport.take() == b"" and not transport.eof_written
        app.slow[0].set_result(None)
        await turns()
        [answer] = answers(transport.take())
        assert answer[0] == 200 and app.refusals == []

    asyncio.run(run())


# --- closing --------------------------------------------------------------------------


def test_connection_close_is_answered_then_closed_lingering():
    app = App()
    server = make_server(app, keepalive_timeout=5.0)
    transport = connect(server)
    transport.send(get("/a", "Connection: close") + get("/not-answered"))
    [answer] = answers(transport.take())
    assert answer[0] == 200 and b"connection: close" in answer[1]
    assert app.seen == ["/a"]
    # FIN sent, the socket still open and read, so what the client still sends is
    # discarded rather than answered with a RST that could destroy the answer
    assert transport.eof_written and not transport.closing and transport.reading
    transport.send(b"more bytes the client had in flight")
    assert app.seen == ["/a"] and not transport.closing
    server.loop.advance(5.1)  # type: ignore[attr-defined]
    assert transport.closing


def test_a_lingering_close_ends_when_the_client_closes_too():
    app = App()
    server = make_server(app, keepalive_timeout=5.0)
    transport = connect(server)
    transport.send(get("/a", "Connection: close"))
    assert transport.eof_written and not transport.closing
    transport.send_eof()
    assert transport.closing


def test_http10_is_answered_and_closed():
    app = App()
    server = make_server(app)
    transport = connect(server)
    transport.send(get("/a", version="1.0"))
    [answer] = answers(transport.take())
    assert answer[0] == 200 and answer[1].startswith(b"http/1.1 200") and b"connection: close" in answer[1]
    assert transport.eof_written


def test_connection_lost_releases_the_share_and_forgets_the_connection():
    app = App()
    server = make_server(app)
    transport = connect(server)
    assert len(server.connections) == 1
    transport.abort()
    server.loop.run_ready()  # type: ignore[attr-defined]
    assert server.connections == set() and not any(server.account.held.values())


# --- the upgrade ----------------------------------------------------------------------


def client_frame(text: bytes, opcode: int = 0x1) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(text))
    return bytes((0x80 | opcode, 0x80 | len(text))) + mask + masked


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of the unmasked frames in ``data``."""
    frames = []
    while data:
        opcode, n = data[0] & 0x0F, data[1] & 0x7F
        start = 2
        if n == 126:
            n, start = struct.unpack("!H", data[2:4])[0], 4
        frames.append((opcode, data[start:start + n]))
        data = data[start + n:]
    return frames


def handshake(version: str = "13") -> bytes:
    return get("/ws", "Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {KEY}",
               f"Sec-WebSocket-Version: {version}")


def test_the_upgrade_hands_the_connection_over_and_reads_the_first_frame_sent_with_it():
    async def run() -> None:
        app = App()
        server = make_server(app, ws_compression=False)
        transport = connect(server)
        http = transport.protocol
        transport.send(handshake() + client_frame(b"hello"))  # the first frame in the same read
        head, _, rest = transport.take().partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=" in head.lower()
        assert rest == b""
        assert isinstance(http, HttpProtocol) and isinstance(transport.protocol, WebSocketProtocol)
        assert server.connections == {transport.protocol}
        await turns()
        assert app.ws_messages == ["hello"]
        transport.send(client_frame(b"again"))
        await turns()
        assert app.ws_messages == ["hello", "again"]
        assert server_frames(transport.take()) == [(0x1, b"echo:hello"), (0x1, b"echo:again")]
        transport.abort()
        server.loop.run_ready()  # type: ignore[attr-defined]
        await turns()
        assert server.connections == set() and not any(server.account.held.values())

    asyncio.run(run())


def test_an_upgrade_with_a_wrong_version_is_refused_426_and_not_handed_over():
    app = App()
    server = make_server(app)
    transport = connect(server)
    transport.send(handshake(version="8"))
    [answer] = answers(transport.take())
    assert answer[0] == 426 and b"sec-websocket-version: 13" in answer[1]
    assert isinstance(transport.protocol, HttpProtocol) and transport.eof_written


# --- shutdown -------------------------------------------------------------------------


def test_shutdown_closes_websockets_with_1001_and_answers_a_request_in_flight_then_closes():
    async def run() -> None:
        app = App()
        server = make_server(app, ws_compression=False)
        ws = connect(server)
        ws.send(handshake())
        ws.take()
        http = connect(server)
        http.send(get("/slow"))
        await turns()
        stopping = asyncio.get_running_loop().create_task(server.shutdown(30.0))
        await turns()
        [(opcode, payload)] = server_frames(ws.take())
        assert opcode == 0x8 and struct.unpack("!H", payload[:2])[0] == 1001
        assert not stopping.done()  # waits for the request in flight and the close handshake
        app.slow[0].set_result(None)
        await turns()
        [answer] = answers(http.take())
        assert answer[0] == 200 and b"connection: close" in answer[1]
        http.send_eof()  # the client closes after its answer (lingering close)
        server.loop.run_ready()  # type: ignore[attr-defined]
        await turns()
        assert http.lost and not stopping.done()  # the WebSocket's close handshake is not over
        ws.send(client_frame(struct.pack("!H", 1001), opcode=0x8))  # the client answers the close
        server.loop.run_ready()  # type: ignore[attr-defined]
        await asyncio.wait_for(stopping, 5)
        assert server.connections == set()

    asyncio.run(run())


def test_a_connection_accepted_as_shutdown_begins_has_its_request_answered():
    # Under socket activation a poller across a restart connects at any moment: one the listener
    # accepted in the pass that closed it was answered with a bare 503 error (no /health body)
    # and not waited for. It is served like a connection made just before the signal.
    async def run() -> None:
        app = App()
        server = make_server(app)
        loop = asyncio.get_running_loop()
        stopping = loop.create_task(server.shutdown(30.0))
        accepted: list[MemoryTransport] = []
        # accepted before the listener closed: its connection_made is a callback already queued
        loop.call_soon(lambda: accepted.append(connect(server)))
        await turns()
        [late] = accepted
        assert not stopping.done()  # its request is waited for
        late.send(get("/health"))
        await turns()
        [answer] = answers(late.take())
        assert answer[0] == 200 and answer[2] == b"/health|" and b"connection: close" in answer[1]
        late.send_eof()
        server.loop.run_ready()  # type: ignore[attr-defined]
        await asyncio.wait_for(stopping, 5)

    asyncio.run(run())


def test_permessage_deflate_is_agreed_only_when_offered_and_enabled():
    async def run() -> None:
        offered = handshake()[:-2] + b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
        for compression, request, agreed in ((True, offered, True), (True, handshake(), False),
                                             (False, offered, False)):
            transport = connect(make_server(App(), ws_compression=compression))
            transport.send(request)
            head = transport.take().lower()
            assert head.startswith(b"http/1.1 101 ")
            assert (b"sec-websocket-extensions: permessage-deflate" in head) is agreed
            assert transport.protocol.ws._compressed is agreed
            transport.abort()

    asyncio.run(run())


def test_an_http10_upgrade_without_host_is_refused_400():
    app = App()
    transport = connect(make_server(app))
    transport.send(handshake().replace(b"HTTP/1.1\r\nHost: t\r\n", b"HTTP/1.0\r\n"))
    [answer] = answers(transport.take())
    assert answer[0] == 400 and isinstance(transport.protocol, HttpProtocol)
