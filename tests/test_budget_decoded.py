"""What bytes cost once decoded or stored (issue 20: findings 2, 3 and 5), against the
installed ``edgelink serve``: client JSON whose structure costs far more than its size,
WebSocket messages that inflate far past the frame limit, and stored session text counted
in bytes. Each attack checks the process's peak RSS (``VmHWM``) and that a well-behaved
client is still served. Run with ``-s`` to see the peaks.
"""

from __future__ import annotations

import asyncio
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import orjson
import websockets
from test_budget_clients import check_budget
from test_ws_events import _drain, _stuck_client

MIB = 1024 * 1024
WS_LIMIT = 64 * 1024


# --- WebSocket permessage-deflate (finding 3) ----------------------------------------------


def deflated(size: int) -> bytes:
    """A permessage-deflate payload (RFC 7692) that inflates to ``size`` bytes of spaces."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = b" " * MIB
    parts = [compressor.compress(chunk) for _ in range(size // MIB)]
    parts.append(compressor.flush(zlib.Z_SYNC_FLUSH))
    return b"".join(parts)[:-4]  # without the 00 00 ff ff the receiver adds back


def compressed_text_frame(payload: bytes) -> bytes:
    """One final text frame with RSV1 (compressed), masked with the all-zero key."""
    return struct.pack("!BBQ", 0xC1, 0x80 | 127, len(payload)) + b"\0\0\0\0" + payload


def test_a_small_frame_inflating_to_200_mib_closes_1009_without_holding_it(gateway_factory) -> None:
    gw = gateway_factory({"EDGELINK_WS_COMPRESSION": "true"})
    frame = compressed_text_frame(deflated(200 * MIB))  # ~200 KB on the wire

    def attack(i: int) -> list[tuple[int, bytes]]:
        sock = _stuck_client(gw, f"client_id=bomb{i}", "Sec-WebSocket-Extensions: permessage-deflate\r\n")
        try:
            sock.sendall(frame)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed before it was all sent: what matters is how
        closed, frames = _drain(sock, 20)
        sock.close()
        assert closed
        return frames

    with ThreadPoolExecutor(3) as pool:
        for frames in pool.map(attack, range(3)):
            closes = [payload for opcode, payload in frames if opcode == 8]
            assert closes and struct.unpack("!H", closes[0][:2])[0] == 1009, frames
    check_budget(gw, "3 WebSocket frames of ~200 KB deflating to 200 MiB each")

    async def well_behaved() -> None:  # a message just under the limit still inflates whole
        message = orjson.dumps({"echo": "z" * (WS_LIMIT - 100)}).decode()
        async with websockets.connect(f"ws://127.0.0.1:{gw.port}/ws?token={gw.token}",
                                      compression="deflate") as ws:
            assert orjson.loads(await ws.recv())["type"] == "connected"
            await ws.send(message)
            assert await asyncio.wait_for(ws.recv(), 20) == message
    asyncio.run(well_behaved())
    assert gw.get("/health", token=False).status == 200


def test_the_websocket_message_limit_counts_bytes_not_characters(gateway) -> None:
    async def go() -> int | None:
        async with websockets.connect(f"ws://127.0.0.1:{gateway.port}/ws?token={gateway.token}",
                                      max_size=None) as ws:
            assert orjson.loads(await ws.recv())["type"] == "connected"
            await ws.send("\N{GRINNING FACE}" * 20_000)  # 20,000 characters, 80,000 bytes
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 20)
            except websockets.ConnectionClosed:
                return ws.close_code
    assert asyncio.run(go()) == 1009
