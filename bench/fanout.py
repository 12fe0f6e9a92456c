"""``python -m bench.fanout``: WebSocket fan-out with the clients spread over several processes.

In ``python -m bench`` the 200 counting clients share the harness's one event loop, which on
two cores can be what limits the figure. Here ``--processes`` child processes hold the clients
(``--clients`` in all), each counting frames without decoding them (``wsclient.py``); the
parent posts ``--events`` broadcast events over 32 keep-alive connections as fast as they
are answered and reports frames delivered per second (first POST to the last frame at the
last client) and the server's CPU seconds per 1,000 frames::

    .venv/bin/python -m bench.fanout                        # 200 clients in 4 processes, 2,000 events
    EDGELINK_LEDGER_SYNC=full .venv/bin/python -m bench.fanout   # with an fsync per commit

The ledger runs with ``synchronous=NORMAL`` unless ``EDGELINK_LEDGER_SYNC`` says otherwise,
so that the figure is the fan-out rather than the disk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from .events import Poster
from .proc import CpuClock
from .targets import HOST, TARGETS, ServerProcess, server_env
from .wsclient import CountingClient

TOKEN = "fanout-token"
POSTERS = 32


async def client_main(url: str, count: int, frames: int) -> None:
    """A child: connect ``count`` clients, say "ready", then say when all have ``frames`` each."""
    received = 0
    done = asyncio.get_running_loop().create_future()

    def on_message() -> None:
        nonlocal received
        received += 1
        if received == count * frames and not done.done():
            done.set_result(time.monotonic())

    clients = [(await CountingClient.connect(url, on_message))[0] for _ in range(count)]
    print("ready", flush=True)
    try:
        finished = await asyncio.wait_for(done, 300)
        print(json.dumps({"done": finished, "received": received}), flush=True)
    except TimeoutError:
        print(json.dumps({"done": None, "received": received}), flush=True)
    for client in clients:
        await client.close()


async def run(args: argparse.Namespace, db: str) -> dict[str, Any]:
    env = server_env({"VX11_GATEWAY_TOKEN": TOKEN, "EDGELINK_DB": db, "EDGELINK_PROBE_INTERVAL": "0",
                      "EDGELINK_MAX_CONNECTIONS": "2000",
                      "EDGELINK_LEDGER_SYNC": os.environ.get("EDGELINK_LEDGER_SYNC", "normal")})
    server = ServerProcess(TARGETS["edgelink"], env, Path(db).with_suffix(".log"))
    await server.start()
    url = f"ws://{HOST}:{server.port}/ws?token={TOKEN}"
    share = [args.clients // args.processes + (i < args.clients % args.processes) for i in range(args.processes)]
    children = [await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.fanout", "--child", url, str(n), str(args.events),
        stdout=asyncio.subprocess.PIPE) for n in share]
    poster = Poster(HOST, server.port, TOKEN, POSTERS)
    try:
        for child in children:
            assert child.stdout is not None
            if (await child.stdout.readline()).strip() != b"ready":
                raise SystemExit("a client process failed to connect")
        clock = CpuClock(server.pid)
        started = time.monotonic()
        await poster.post_many(args.events)
        posted = time.monotonic() - started
        reports = [json.loads(await child.stdout.readline()) for child in children]  # type: ignore[union-attr]
        cpu = clock.elapsed()
    finally:
        await poster.aclose()
        for child in children:
            await child.wait()
        await server.stop()
    frames = sum(r["received"] for r in reports)
    complete = all(r["done"] is not None for r in reports)
    seconds = max(r["done"] for r in reports) - started if complete else float("nan")
    return {"clients": args.clients, "processes": args.processes, "events": args.events, "frames": frames,
            "complete": complete, "seconds": seconds, "post_seconds": posted, "frames_per_s": frames / seconds,
            "server_cpu_s": cpu["server_cpu_s"], "server_cpu_ms_per_1000_frames": cpu["server_cpu_s"] / frames * 1e6,
            "sync": env["EDGELINK_LEDGER_SYNC"]}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--child", nargs=3, metavar=("URL", "COUNT", "FRAMES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        url, count, frames = args.child
        uvloop.run(client_main(url, int(count), int(frames)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        figures = uvloop.run(run(args, f"{tmp}/ledger.db"))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
