"""MQTT 3.1.1 / 5 engine (``mqtt://``, ``mqtts://``; a URL path ``/5`` selects MQTT 5), on paho-mqtt.

QoS 1 to ``vx11/<edge_id>/events/<type>``; an event counts when its PUBACK arrives, and
under MQTT 5 a PUBACK reason code of 0x80 or more is a refusal (0x95 packet too large:
``too_large``, 0x87 not authorised: ``acl``, 0x90 / 0x99 bad topic or payload: ``invalid``,
the refusals of a message for itself; a message over the CONNACK's maximum packet size
is refused here before it is sent). A packet from the broker longer than FRAME_BYTES
drops the connection before its body is read.

Another box with the same edge_id (so the same client id) takes the connection over: an
MQTT 5 broker says so (DISCONNECT 0x8E, session taken over); under 3.1.1 the broker only
closes it, so TAKEOVER_SUSPECT connections in a row that the broker closed within
SHORT_LIVED seconds of their CONNACK are reported as a likely duplicate. The session is clean
(3.1.1 clean session, 5 clean start with no expiry): the ledger is the queue, and each
connection gets a new paho client, so the library never resends from a memory of its own.

paho is driven from the event loop through its socket callbacks (reader and writer
registered with the loop, ``loop_misc`` once a second for keep-alive); only its blocking
TCP connect runs in a thread, and the callbacks it makes from there hop to the loop.
Chosen over aiomqtt, which wraps the same client: aiomqtt's publish ignores the MQTT 5
PUBACK reason code and, when the connection drops, leaves a pending publish waiting
until its timeout instead of failing it.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
import threading
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers
from paho.mqtt.reasoncodes import ReasonCode

from ..log import log
from . import Target
from .engine import FRAME_BYTES, Acks, EngineError, Message, safe_type, tls_context, warn_duplicate_edge_id

if TYPE_CHECKING:
    from paho.mqtt.client import SocketLike  # a Protocol paho declares for its checker only

KEEPALIVE = 30  # seconds between PINGREQs on an idle connection
AUTH_CODES = {4, 5, 0x86, 0x87}  # 3.1.1 bad user/password, not authorised; their MQTT 5 codes
RECV_BYTES = 1 << 16  # one socket read serves this many bytes of PUBACKs to paho
QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only
WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
# what paho would build for every plain PUBACK, built once: its reason by the bytes after
# the message id (3.1.1: none; MQTT 5: none, or success / no matching subscribers with
# maybe a zero property length), and no properties
_SUCCESS, _NO_SUBSCRIBERS = (ReasonCode(PacketTypes.PUBACK, identifier=code) for code in (0x00, 0x10))
PLAIN_PUBACKS = {False: {b"": _SUCCESS},
                 True: {b"": _SUCCESS, b"\x00": _SUCCESS, b"\x00\x00": _SUCCESS,
                        b"\x10": _NO_SUBSCRIBERS, b"\x10\x00": _NO_SUBSCRIBERS}}
PUBACK_NO_PROPERTIES = Properties(PacketTypes.PUBACK)
REFUSALS = {0x95: "too_large", 0x87: "acl", 0x90: "invalid", 0x99: "invalid"}  # PUBACK reason -> kind
SESSION_TAKEN_OVER = 0x8E
SHORT_LIVED, TAKEOVER_SUSPECT = 5.0, 3  # seconds; connections in a row
_lifetimes: collections.deque[bool] = collections.deque(maxlen=TAKEOVER_SUSPECT)  # closed by the broker soon?


class _MsgIdProperties(Properties):
    """MQTT 5 PUBLISH properties holding the one ``msg_id`` user property. paho's own
    costs ~22 us per message to make and set (its setter scans every property name) and
    ~10 us to pack; this one takes the fields of one made at import, so it reads and
    prints like paho's, and packs its single property itself (MQTT 5 3.3.2.3: the
    properties' length, then 0x26 and a UTF-8 string pair), ~0.5 us in all."""

    _fields = Properties(PacketTypes.PUBLISH).__dict__
    _packed: bytes  # set in __dict__: paho's __setattr__ takes only property names

    def __init__(self, msg_id: str):
        fields = self.__dict__
        fields.update(self._fields)
        fields["UserProperty"] = [("msg_id", msg_id)]
        value = msg_id.encode()
        packed = b"\x26\x00\x06msg_id" + len(value).to_bytes(2, "big") + value
        fields["_packed"] = VariableByteIntegers.encode(len(packed)) + packed

    def pack(self) -> bytes:
        return self._packed


class _BatchingClient(mqtt.Client):
    """paho with its socket I/O in chunks: it reads a packet in three ``recv`` calls
    (header, length, body) and writes each packet with its own ``send``; here one read
    fills a buffer those calls are served from, and the packets one ``loop_write`` emits
    go out in one ``send`` (``flush``). The write buffer holds at most what paho's own
    queue held: the forwarder's window of messages. A plain PUBACK skips paho's decoding
    (``_handle_pubackcomp``)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.read_buffer = bytearray()
        self.write_buffer = bytearray()
        self.oversize = 0  # the announced length of a packet refused for its size

    def _sock_recv(self, bufsize: int) -> bytes:
        packet = self._in_packet
        if packet["have_remaining"] and packet["remaining_length"] > FRAME_BYTES:
            # paho would gather the whole body in memory: the connection goes instead
            self.oversize = packet["remaining_length"]
            raise ConnectionError(f"a packet of {self.oversize} bytes from the broker")
        if not self.read_buffer:
            data = super()._sock_recv(RECV_BYTES)  # BlockingIOError when nothing came
            if not data:
                return data  # end of stream: paho drops the connection
            if QUICKACK is not None:
                # acknowledge at once: a broker with Nagle on (mosquitto's default) holds its
                # next PUBACKs until our TCP ACK, which would otherwise wait up to 40 ms
                # paho types _sock as its SocketLike, which has no setsockopt: here it is a socket
                self._sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)  # type: ignore[union-attr]
            self.read_buffer += data
        chunk = bytes(self.read_buffer[:bufsize])
        del self.read_buffer[:bufsize]
        return chunk

    def _sock_send(self, buf: bytes | bytearray) -> int:
        if self._sock is None:
            raise ConnectionError("self._sock is None")
        self.write_buffer += buf
        return len(buf)

    def _handle_pubackcomp(self, cmd: Any) -> Any:
        # A plain PUBACK is its 2-byte message id, under MQTT 5 maybe followed by a success
        # reason and a zero property length: paho decodes each into a new ReasonCode and
        # Properties, which costs more than the rest of the ack together. The ack itself
        # still goes through paho's own _do_on_publish (its message table, in-flight
        # count, on_publish). A refusal or any properties: paho's path.
        packet = self._in_packet["packet"]
        code = PLAIN_PUBACKS[self._protocol == mqtt.MQTTv5].get(bytes(packet[2:])) if len(packet) >= 2 else None
        if cmd != "PUBACK" or code is None:
            return super()._handle_pubackcomp(cmd)
        mid = (packet[0] << 8) | packet[1]
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, code, PUBACK_NO_PROPERTIES)
        return mqtt.MQTT_ERR_SUCCESS

    def flush(self) -> bool:
        """Send what the write buffer holds; True when some is left for the next writable
        event. Raises OSError when the connection is gone."""
        sock = self._sock
        if sock is None or not self.write_buffer:
            return False
        try:
            sent = sock.send(self.write_buffer)
        except WOULD_BLOCK:
            return True
        del self.write_buffer[:sent]
        return bool(self.write_buffer)


class MqttEngine:
    name = "mqtt"

    def __init__(self, target: Target):
        self.target = target
        self.v5 = target.path.strip("/") == "5"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: _BatchingClient | None = None
        self._connected: asyncio.Future[None] | None = None
        self.acks: Acks | None = None
        self._pending: dict[int, int] = {}  # paho's message id -> our index in acks
        self._misc: asyncio.Task[None] | None = None
        self._prefix = ""
        self._max_packet: int | None = None  # MQTT 5: the broker's maximum packet size, from its CONNACK
        self._edge_id = ""
        self._up_since: float | None = None  # loop time of the CONNACK

    async def connect(self, edge_id: str, timeout: float) -> None:
        t = self.target
        loop = self._loop = asyncio.get_running_loop()
        self.acks = Acks(loop)
        self._loop_thread = threading.get_ident()
        self._prefix = f"vx11/{edge_id}/events/"
        self._edge_id = edge_id
        self._connected = loop.create_future()
        protocol = mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311
        client = self._client = _BatchingClient(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgelink-{edge_id}", protocol=protocol,
            **({} if self.v5 else {"clean_session": True}))
        if t.user or t.token:
            client.username_pw_set(t.user or t.token, t.password or None)
        context = tls_context(t)
        if context is not None:
            client.tls_set_context(context)
        client.max_inflight_messages_set(0)  # no cap: the forwarder's window is the bound
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        client.connect_timeout = timeout
        try:
            await asyncio.wait_for(loop.run_in_executor(None, self._blocking_connect, client), timeout)
            await asyncio.wait_for(asyncio.shield(self._connected), timeout)
        except asyncio.TimeoutError:
            await self.close()
            raise EngineError("timeout", f"no CONNACK from {t.safe_url} within {timeout:g} s") from None
        except (OSError, ValueError) as exc:
            await self.close()
            raise EngineError("unreachable", f"{t.safe_url}: {exc}") from None
        except EngineError:
            await self.close()
            raise
        self._misc = loop.create_task(self._keepalive(client))
        self._up_since = loop.time()

    def _blocking_connect(self, client: mqtt.Client) -> None:
        if self.v5:
            client.connect(self.target.host, self.target.port, KEEPALIVE, clean_start=True)
        else:
            client.connect(self.target.host, self.target.port, KEEPALIVE)

    async def send(self, messages: list[Message]) -> None:
        client, acks = self._client, self.acks
        if client is None or acks is None or not client.is_connected():  # (acks come with the client)
            raise EngineError("disconnected", "not connected")
        pending, prefix, v5, max_packet = self._pending, self._prefix, self.v5, self._max_packet
        for msg in messages:
            properties = _MsgIdProperties(msg.msg_id) if v5 else None
            topic = prefix + safe_type(msg.type)
            if max_packet is not None and properties is not None:  # (a maximum comes only with MQTT 5)
                # fixed header (5 at most), topic, packet id, properties, body
                size = 5 + 2 + len(topic.encode()) + 2 + len(properties.pack()) + len(msg.body)
                if size > max_packet:
                    acks.refuse(acks.add(), EngineError("too_large", f"seq {msg.seq}: a packet of {size} bytes, the "
                                                                     f"broker's maximum packet size is {max_packet}"))
                    return  # nothing after it counts; it is sent again after the dead letter
            info = client.publish(topic, msg.body, qos=1, properties=properties)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise EngineError("disconnected", mqtt.error_string(info.rc))
            # the PUBACK cannot come within the call: paho only queues the packet (the
            # writer is registered with the loop) and reads only in _readable
            pending[info.mid] = acks.add()

    async def close(self) -> None:
        client, self._client = self._client, None
        self._fail(EngineError("disconnected", "engine closed"))
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        if client is not None:
            try:
                client.disconnect()
                client.loop_write()  # the DISCONNECT packet, if the socket still takes it
                client.flush()
            except (OSError, ValueError):
                pass  # the connection is gone either way
            sock = client.socket()
            if sock is not None:
                self._forget(sock.fileno())
                sock.close()

    def _started_loop(self) -> asyncio.AbstractEventLoop:
        """The loop connect() ran on (paho calls back only after it)."""
        assert self._loop is not None, "the engine was not connected"
        return self._loop

    # --- paho callbacks ---------------------------------------------------------------

    def _on_loop(self, callback: Any, *args: Any) -> None:
        """Run ``callback`` now on the loop's thread (so a CONNACK's reason is settled
        before the disconnect that follows it), or hop there from paho's connect thread."""
        if threading.get_ident() == self._loop_thread:
            callback(*args)
        else:
            self._started_loop().call_soon_threadsafe(callback, *args)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, code: Any, properties: Any) -> None:
        self._max_packet = getattr(properties, "MaximumPacketSize", None)
        self._on_loop(self._settle_connect, code)

    def _settle_connect(self, code: Any) -> None:
        if self._connected is None or self._connected.done():
            return
        if code.is_failure:
            kind = "auth" if code.value in AUTH_CODES else "rejected"
            self._connected.set_exception(EngineError(kind, f"{self.target.safe_url} refused the connection: {code}"))
        else:
            self._connected.set_result(None)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, code: Any, properties: Any) -> None:
        self._on_loop(self._broker_closed, code)

    def _broker_closed(self, code: Any) -> None:
        if self._client is not None and self._up_since is not None:  # not our own close
            if getattr(code, "value", None) == SESSION_TAKEN_OVER:
                warn_duplicate_edge_id(self._edge_id, "mqtt", "the broker handed this client id's session to "
                                                              "another connection (DISCONNECT 0x8E)")
            else:
                _lifetimes.append(self._started_loop().time() - self._up_since < SHORT_LIVED)
                if len(_lifetimes) == TAKEOVER_SUSPECT and all(_lifetimes):
                    warn_duplicate_edge_id(self._edge_id, "mqtt", f"the broker closed {TAKEOVER_SUSPECT} connections "
                                                                  f"in a row within {SHORT_LIVED:g} s of their CONNACK")
            self._up_since = None
        self._disconnected(str(code))

    def _disconnected(self, reason: str) -> None:
        oversize = self._client.oversize if self._client is not None else 0
        if oversize:
            error = EngineError("frame_too_large", f"the broker sent a packet of {oversize} bytes, more than "
                                                   f"{FRAME_BYTES}; connection dropped")
            if self.acks is None or self.acks.error is None:  # logged once, not per callback
                log.warning("forward_frame_too_large", engine="mqtt", url=self.target.safe_url, bytes=oversize,
                            bound=FRAME_BYTES)
        else:
            error = EngineError("disconnected", f"connection to the broker lost ({reason})")
        if self._connected is not None and not self._connected.done():
            self._connected.set_exception(error)
        self._fail(error)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, code: Any, properties: Any) -> None:
        index = self._pending.pop(mid, None)
        if index is None or self.acks is None:  # (pending only while acks are: for the checker)
            return
        if code.is_failure:
            self.acks.refuse(index, EngineError(REFUSALS.get(code.value, "rejected"), f"PUBACK reason: {code}"))
        else:
            self.acks.ack(index)

    def _fail(self, error: EngineError) -> None:
        self._pending = {}
        if self.acks is not None:
            self.acks.fail(error)

    # --- driving paho from the loop ---------------------------------------------------

    # Registered by file descriptor, taken when paho calls: by the time a hop from its
    # connect thread runs, it may have closed the socket object already. On the loop's own
    # thread (every publish registers the writer) they run at once, without a wake-up.
    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: SocketLike) -> None:
        self._on_loop(self._started_loop().add_reader, sock.fileno(), self._readable, client)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: SocketLike) -> None:
        self._on_loop(self._forget, sock.fileno())

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: SocketLike) -> None:
        self._on_loop(self._started_loop().add_writer, sock.fileno(), self._writable, client)

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: SocketLike) -> None:
        self._on_loop(self._started_loop().remove_writer, sock.fileno())

    def _forget(self, fd: int) -> None:
        if fd >= 0:
            loop = self._started_loop()
            loop.remove_reader(fd)
            loop.remove_writer(fd)

    def _readable(self, client: _BatchingClient) -> None:
        # our read buffer, or a TLS socket, may hold bytes the selector will not report
        # again; each round consumes some, and an error or a closed socket ends it
        while self._drive(client, client.loop_read) and self._client is client:
            sock = client.socket()
            if sock is None or not (client.read_buffer or getattr(sock, "pending", lambda: 0)() > 0):
                break

    def _writable(self, client: _BatchingClient) -> None:
        if not self._drive(client, client.loop_write):
            return
        sock = client.socket()
        if sock is None or self._client is not client:
            return
        try:
            left = client.flush()
        except OSError as exc:
            self._disconnected(repr(exc))
            return
        if left:  # loop_write unregistered the writer: paho's queue is empty, ours is not
            self._started_loop().add_writer(sock.fileno(), self._writable, client)

    def _drive(self, client: mqtt.Client, step: Any) -> bool:
        """Run one paho I/O step; False (the connection failed) on an error."""
        try:
            rc = step()
        except (OSError, ValueError) as exc:  # a TLS or socket error paho let through
            self._disconnected(repr(exc))
            return False
        if rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN):
            self._disconnected(mqtt.error_string(rc))
            return False
        return True

    async def _keepalive(self, client: mqtt.Client) -> None:
        while client.loop_misc() == mqtt.MQTT_ERR_SUCCESS:
            await asyncio.sleep(1)
            if self._up_since is not None and self._started_loop().time() - self._up_since > SHORT_LIVED:
                _lifetimes.clear()  # a connection that lasts: no takeover going on
        self._disconnected("keep-alive failed")


def engine(target: Target) -> MqttEngine:
    return MqttEngine(target)
