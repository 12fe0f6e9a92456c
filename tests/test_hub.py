"""The hub and WebSocket send path in one process, over a real loopback TCP connection, so
that what happens within one turn of the loop is under the test's control: broadcasts of a
turn go out together at its end (``Hub._fan_out``), and each connection still gets its
frames in the order they were sent.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from conftest import next_loop_turn, until
from edgelink.gateway.events import Event
from edgelink.gateway.metrics import Registry
from edgelink.http.websocket import WebSocket
from edgelink.hub import Hub
from edgelink.ledger import Ledger


class _Server(asyncio.Protocol):
    """The server side: the WebSocket handshake by wsproto, then a ``WebSocket``."""

    def __init__(self, accepted: asyncio.Future[WebSocket], queue_limit: int, queue_bytes: int):
        self.accepted = accepted
        self.queue_limit, self.queue_bytes = queue_limit, queue_bytes
        self.conn = WSConnection(ConnectionType.SERVER)
        self.ws: WebSocket | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.ws is not None:
            self.ws.feed(data)
            return
        self.conn.receive_data(data)
        for event in self.conn.events():
            if isinstance(event, Request):
                self.transport.write(self.conn.send(AcceptConnection()))
                self.ws = WebSocket(self.transport, self.conn, None, max_message=1 << 20,
                                    queue_limit=self.queue_limit, queue_bytes=self.queue_bytes,
                                    ping_interval=60, compressed=False, set_reading=lambda on: None)
                self.accepted.set_result(self.ws)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ws is not None:
            self.ws.connection_lost()

    def pause_writing(self) -> None:
        assert self.ws is not None
        self.ws.pause_writing()

    def resume_writing(self) -> None:
        assert self.ws is not None
        self.ws.resume_writing()


class _Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.conn = WSConnection(ConnectionType.CLIENT)
        self.events: list = []

    async def handshake(self, port: int) -> None:
        self.writer.write(self.conn.send(Request(host=f"127.0.0.1:{port}", target="/ws")))
        while not any(isinstance(e, AcceptConnection) for e in self.events):
            await self._read()

    async def _read(self) -> None:
        data = await asyncio.wait_for(self.reader.read(65536), 10)
        assert data, "the server closed the connection"
        self.conn.receive_data(data)
        self.events.extend(self.conn.events())

    async def until_closed(self) -> list:
        """Every message and the close frame, as (kind, value)."""
        while not any(isinstance(e, CloseConnection) for e in self.events):
            await self._read()
        return self.messages()

    def messages(self) -> list:
        """(kind, value) per message; wsproto hands a message over in parts as its bytes arrive."""
        out, part = [], ""
        for e in self.events:
            if isinstance(e, TextMessage):
                part += e.data
                if e.message_finished:
                    out.append(("text", orjson.loads(part)))
                    part = ""
            elif isinstance(e, CloseConnection):
                out.append(("close", e.code))
        return out


def _event(seq: int) -> Event:
    return Event(f"ev-{seq}", "system.alert", "test", 1, {"n": seq}, None, True, True, seq)


async def _connected(tmp_path: Path, count: int, queue_limit: int = 64, queue_bytes: int = 1 << 20):
    """A hub with ``count`` live clients (replayed from an empty ledger) and their peers."""
    loop = asyncio.get_running_loop()
    pending: list[asyncio.Future[WebSocket]] = []

    def protocol() -> _Server:
        pending.append(loop.create_future())
        return _Server(pending[-1], queue_limit, queue_bytes)

    server = await loop.create_server(protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    ledger = Ledger(str(tmp_path / "ledger.db"), sync="normal")
    await ledger.start()
    hub = Hub(Registry(), hold_limit=10, hold_bytes=1 << 20)
    pairs = []
    for _ in range(count):
        peer = _Client(*await asyncio.open_connection("127.0.0.1", port))
        await peer.handshake(port)
        ws = await pending[len(pairs)]
        client = hub.add(ws, f"c{len(pairs)}", None)
        await hub.replay(client, 0, ledger)  # nothing stored: the client goes live
        pairs.append((ws, peer))
    return server, ledger, hub, pairs


def test_frames_of_one_turn_keep_the_order_they_were_sent_in(tmp_path):
    async def go():
        server, ledger, hub, [(a, peer_a), (b, peer_b)] = await _connected(tmp_path, 2)
        # one turn: nothing awaited from here to the closes
        hub.broadcast(_event(1))
        a.send(b'{"echo": 1}')
        hub.broadcast(_event(2))
        hub.broadcast(_event(3), {"alert_id": "flat"})
        b.send(b'{"echo": 2}')
        hub.broadcast(_event(4))
        a.close()
        b.close(1001)
        flat = {"alert_id": "flat", **_event(3).frame()}
        assert await peer_a.until_closed() == [
            ("text", _event(1).frame()), ("text", {"echo": 1}), ("text", _event(2).frame()), ("text", flat),
            ("text", _event(4).frame()), ("close", 1000)]
        assert await peer_b.until_closed() == [
            ("text", _event(1).frame()), ("text", _event(2).frame()), ("text", flat), ("text", {"echo": 2}),
            ("text", _event(4).frame()), ("close", 1001)]
        server.close()
        await ledger.close()
    asyncio.run(asyncio.wait_for(go(), 60))


def test_a_turn_over_the_send_queue_bound_closes_only_that_client_1013(tmp_path):
    async def go():
        # a 4-frame send queue: what the paused transport does not take overflows it
        server, ledger, hub, [(slow, peer_slow), (fast, peer_fast)] = await _connected(
            tmp_path, 2, queue_limit=4)
        peer_slow.writer.transport.pause_reading()  # its socket is simply no longer read
        big = {"blob": "x" * 60_000}
        sent = 0
        while slow.close_code is None:
            sent += 1
            hub.broadcast(Event(f"big-{sent}", "system.alert", "t", 1, big, None, True, True, 2 * sent - 1))
            hub.broadcast(Event(f"small-{sent}", "system.alert", "t", 1, {}, None, True, True, 2 * sent))
            await peer_fast._read()  # a turn or more: the frames reach the sockets; one reads
            assert sent < 1000, "the slow client was never closed"
        assert slow.close_code == 1013 and slow not in hub.clients
        assert fast in hub.clients and fast.close_code is None
        fast.close()
        frames = await peer_fast.until_closed()
        assert [value["event_id"] for kind, value in frames[:-1]] == [
            f"{kind}-{n}" for n in range(1, sent + 1) for kind in ("big", "small")]
        assert frames[-1] == ("close", 1000)
        server.close()
        await ledger.close()
    asyncio.run(asyncio.wait_for(go(), 60))


def test_a_client_gets_what_was_broadcast_while_it_was_registered_in_that_turn(tmp_path):
    async def go():
        server, ledger, hub, [(a, peer_a), (b, peer_b)] = await _connected(tmp_path, 2)
        hub.remove(hub.clients[b])
        hub.broadcast(_event(1))  # b is not registered: not for it
        client_b = hub.add(b, "b-again", None)
        hub.broadcast(_event(2))  # held for b until its replay is done
        await hub.replay(client_b, 2, ledger)
        hub.broadcast(_event(3))
        hub.remove(hub.clients[a])  # after event 3, which is still a's
        hub.broadcast(_event(4))
        a.close()
        b.close()
        assert await peer_a.until_closed() == [("text", _event(n).frame()) for n in (1, 2, 3)] + [("close", 1000)]
        assert await peer_b.until_closed() == [("text", _event(n).frame()) for n in (2, 3, 4)] + [("close", 1000)]
        server.close()
        await ledger.close()
    asyncio.run(asyncio.wait_for(go(), 60))


class _CountingTransport:
    """A transport that counts the calls handing it bytes."""

    def __init__(self, transport: asyncio.Transport):
        self._transport = transport
        self.calls = 0

    def write(self, data: bytes) -> None:
        self.calls += 1
        self._transport.write(data)

    def writelines(self, data: list[bytes]) -> None:
        self.calls += 1
        self._transport.writelines(data)

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


def test_a_send_queue_drains_in_order_and_in_few_writes_once_the_client_reads(tmp_path):
    async def go():
        server, ledger, hub, [(ws, peer)] = await _connected(tmp_path, 1, queue_limit=100_000, queue_bytes=64 << 20)
        peer.writer.transport.pause_reading()
        blob = "y" * 1000
        n = 0
        while len(ws._out) < 2000:  # the transport has paused: frames wait in the send queue
            n += 1
            hub.broadcast(Event(f"e-{n}", "system.alert", "t", 1, {"b": blob}, None, True, True, n))
            await next_loop_turn()
            assert n < 100_000, "the transport never paused"
        counted = ws._transport = _CountingTransport(ws._transport)
        peer.writer.transport.resume_reading()
        while ws._out or ws.queued_bytes:
            await peer._read()
        # each resume hands the transport what fits under its high-water mark at once
        # (64 KiB, some 60 frames of 1 KiB), not a write per frame
        assert counted.calls < n / 10, (counted.calls, n)
        ws.close()
        frames = await peer.until_closed()
        assert [value["event_id"] for kind, value in frames[:-1]] == [f"e-{i}" for i in range(1, n + 1)]
        server.close()
        await ledger.close()
    asyncio.run(asyncio.wait_for(go(), 60))


def test_messages_received_are_taken_from_the_account_until_handled(tmp_path):
    from edgelink.account import INBOUND, Account

    async def go():
        server, ledger, hub, [(ws, peer)] = await _connected(tmp_path, 1)
        account = Account(10_000, 1.0)
        ws.share = account.open()
        for text in ('{"n": 1}', '{"emoji": "\N{GRINNING FACE}"}'):  # 8 and 17 bytes
            peer.writer.write(peer.conn.send(TextMessage(data=text)))
        await until(lambda: ws.share.held == 25, why="25 bytes held")
        assert ws.share.by_piece[INBOUND] == 25  # held while the handler has not taken them
        assert await ws.receive() == '{"n": 1}' and ws.share.held == 17
        others = account.open()
        assert others.take("body", account.free)  # the rest of the account is someone else's
        peer.writer.write(peer.conn.send(TextMessage(data='{"n": 2}')))
        assert ("close", 1013) in await peer.until_closed()
        assert await ws.receive() == '{"emoji": "\N{GRINNING FACE}"}' and ws.share.held == 0
        ws.connection_lost()
        others.close()
        assert account.used == 0
        server.close()
        await ledger.close()

    asyncio.run(go())
