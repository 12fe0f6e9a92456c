"""Peak RSS (VmHWM) of a fresh gateway under each attack on what bytes cost once decoded or
stored (issue 20, findings 2, 3, 5 and 7; docs/decoded-memory.md), for a source tree.

The attacks are those of tests/test_budget_decoded.py and tests/test_budget_ledger.py,
run with the tree's own test helpers and its installed ``edgelink`` (the one next to this
interpreter), without their assertions, so that the same figures can be taken of an older
checkout (with its own venv and this tree's test helpers copied into it):

    .venv/bin/python bench/decoded_memory.py . idle f2a f2b f2s f3 f5 f7
"""

from __future__ import annotations

import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

tree = Path(sys.argv[1]).resolve()
sys.path.insert(0, str(tree / "tests"))

from conftest import Gateway, module_env, start_gateway  # noqa: E402
from test_budget_clients import in_parallel, keepalive_posts  # noqa: E402
from test_budget_decoded import (  # noqa: E402
    BODY,
    compressed_text_frame,
    deflated,
    emoji_deltas,
    empty_lists,
    log_rows,
    tiny_keys,
)
from test_budget_ledger import add_made_up_types  # noqa: E402
from test_streaming import StreamClient, StreamingModule, StreamPlan  # noqa: E402
from test_ws_events import _drain, _stuck_client  # noqa: E402


def gateway(env: dict[str, str] | None = None) -> Gateway:
    return start_gateway(Path(tempfile.mkdtemp()), env)


def finish(gw: Gateway, name: str) -> None:
    print(f"{name}: peak RSS {gw.peak_rss_mib():.1f} MiB", flush=True)
    gw.proc.kill()
    gw.proc.wait()


def idle() -> None:
    gw = gateway()
    time.sleep(0.5)
    finish(gw, "idle")


def costly_json(shape: Callable[[int], list]) -> None:
    """8 clients x 3 keep-alive POSTs of 1 MiB of ``shape`` to ingest, chat and an intent."""
    gw = gateway(module_env())
    costly = shape(BODY)
    bodies = {"/events/ingest": {"source": "s", "type": "c", "payload": {"x": costly}},
              "/operator/chat": {"message": "hi", "metadata": {"x": costly}}, "/vx11/intent/code": {"x": costly}}

    def client(i: int) -> set[int] | str:
        path = list(bodies)[i % 3]
        try:
            return {status for status, _ in keepalive_posts(gw, path, [bodies[path]] * 3)}
        except Exception as exc:  # an old gateway may drop the connection
            return repr(exc)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(client, range(8)))
    finish(gw, f"8 clients x 3 POSTs of 1 MiB {shape.__name__} (statuses of the first 3: {answers[:3]})")


def session_reads() -> None:
    """3 concurrent reads of a session holding ~15 MiB of (cheap to decode) metadata."""
    gw = gateway(module_env())
    keepalive_posts(gw, "/operator/chat", [{"message": "hi", "session_id": "big", "metadata": log_rows(BODY - 200)}
                                           for _ in range(16)])
    before = gw.peak_rss_mib()
    in_parallel(3, lambda: len(gw.get("/operator/session/big", timeout=300).body))
    finish(gw, f"3 reads of a 15 MiB session ({before:.1f} MiB before the reads)")


def deflate_bombs() -> None:
    """3 WebSocket frames of ~200 KB that inflate to 200 MiB each."""
    gw = gateway({"EDGELINK_WS_COMPRESSION": "true"})
    frame = compressed_text_frame(deflated(200 * 1024 * 1024))

    def attack(i: int) -> None:
        sock = _stuck_client(gw, f"client_id=bomb{i}", "Sec-WebSocket-Extensions: permessage-deflate\r\n")
        try:
            sock.sendall(frame)
        except OSError:
            pass
        _drain(sock, 20)
        sock.close()
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(attack, range(3)))
    finish(gw, "3 frames of 200 KB inflating to 200 MiB")


def emoji_chats() -> None:
    """3 concurrent streamed chats of 500,000 deltas of 16 emoji each."""
    switch = StreamingModule("switch").start()
    switch.reply("/switch/stream", StreamPlan(emoji_deltas(500_000)))
    gw = gateway(module_env({"switch": switch}))

    def chat(i: int) -> None:
        client = StreamClient(gw.port)
        client.sock.settimeout(300)
        client.send("POST", "/operator/chat", {"message": "hi", "stream": True, "session_id": f"e{i}"}, gw.token)
        client.head()
        while client.chunk() is not None:
            pass
        client.close()
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(chat, range(3)))
    time.sleep(1)
    finish(gw, f"3 streamed chats of 8 million emoji (resident after: {gw.status_kib('VmRSS') / 1024:.1f} MiB)")
    switch.stop()


def many_types() -> None:
    """A snapshot, then 3 at once, over 200,000 distinct event types."""
    gw = gateway()
    gw.stop()
    add_made_up_types(gw.db, 200_000)
    gw = gateway({"EDGELINK_DB": str(gw.db)})
    gw.get("/operator/snapshot", timeout=300)
    one = gw.peak_rss_mib()
    in_parallel(3, lambda: gw.get("/operator/snapshot", timeout=300).status)
    finish(gw, f"200,000 types: one snapshot {one:.1f} MiB, then three at once")


ATTACKS = {"idle": idle, "f2a": lambda: costly_json(empty_lists), "f2b": lambda: costly_json(tiny_keys),
           "f2s": session_reads, "f3": deflate_bombs, "f5": emoji_chats, "f7": many_types}

if __name__ == "__main__":
    for name in sys.argv[2:] or ATTACKS:
        ATTACKS[name]()
