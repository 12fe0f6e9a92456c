"""``python -m bench.scale``: edgelink with a ledger of 1,000,000 events against a small one.

The ledger is created by edgelink's own ``Ledger`` (its schema, triggers and epoch), then
filled with plain SQL in one transaction, which takes seconds where HTTP would take
minutes. For each size the gateway is started on the file and measured:

* ``/operator/snapshot``: sequential requests, median and p99 latency;
* replay: one WebSocket client asking ``since_seq`` for the last ``--replay`` events,
  frames per second until it has them all;
* ingest: wrk at saturation (50 connections), durable as configured.

    .venv/bin/python -m bench.scale                      # 1,000,000 and 20,000 events
    .venv/bin/python -m bench.scale --events 200000      # a quicker look

The figures go to ``bench/results/scale-<timestamp>.json`` and a plot beside it (``--out`` elsewhere).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from edgelink.config import load_settings
from edgelink.ledger import Ledger

from .__main__ import RESULTS
from .events import INGEST_PATH, alert_body
from .httpclient import HttpConnection
from .proc import CpuClock
from .targets import HOST, TARGETS, ServerProcess, server_env
from .wrk import Load, run_wrk
from .wsclient import CountingClient

TOKEN = "scale-token"
SMALL = 20_000
FILL_CHUNK = 50_000
TYPES = ("system.alert", "switch.tension.updated", "shub.action.narrated", "madre.decision.explained",
         "forensic.snapshot.created", "sensor.reading", "board.heartbeat")


def fill(db: str, count: int) -> float:
    """Create the ledger with edgelink's schema, then insert ``count`` broadcast events
    spread over the last six days (inside the default retention); returns the seconds."""
    settings = load_settings(env={"EDGELINK_DB": db, "VX11_GATEWAY_TOKEN": TOKEN})

    async def create() -> None:
        ledger = Ledger.from_settings(settings)
        await ledger.start()
        await ledger.close()

    asyncio.run(create())
    started = time.perf_counter()
    now_ms = int(time.time() * 1000)
    span_ms = 6 * 86_400_000
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA synchronous=OFF")
    with conn:
        for first in range(0, count, FILL_CHUNK):
            rows = []
            for i in range(first, min(count, first + FILL_CHUNK)):
                kind = TYPES[i % len(TYPES)]
                ts = now_ms - span_ms + span_ms * i // count
                payload = json.dumps({"alert_id": f"a-{i}", "severity": "info", "message": "filled by bench.scale",
                                      "timestamp": ts}).encode()
                rows.append((os.urandom(16).hex(), kind, f"sensor-{i % 97}", ts, payload, None,
                             int(kind.count(".") >= 2 or kind == "system.alert"), 1))
            conn.executemany("INSERT INTO events (event_id, type, source, timestamp, payload, metadata, canonical, "
                             "broadcast) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    conn.close()
    return time.perf_counter() - started


async def snapshot_latency(port: int, requests: int) -> dict[str, float]:
    conn = HttpConnection(HOST, port, {"X-VX11-Token": TOKEN})
    times = []
    try:
        for _ in range(requests):
            started = time.perf_counter()
            status, body = await conn.request("GET", "/operator/snapshot")
            times.append((time.perf_counter() - started) * 1000)
            if status != 200:
                raise SystemExit(f"/operator/snapshot answered {status}: {body[:200]!r}")
    finally:
        await conn.close()
    times.sort()
    return {"requests": requests, "p50_ms": statistics.median(times), "p99_ms": times[int(len(times) * 0.99) - 1],
            "max_ms": times[-1]}


async def replay_rate(port: int, since: int, expected: int) -> dict[str, float]:
    received = 0
    done = asyncio.get_running_loop().create_future()

    def on_message() -> None:
        nonlocal received
        received += 1
        if received == expected and not done.done():
            done.set_result(None)

    started = time.perf_counter()
    client, first = await CountingClient.connect(
        f"ws://{HOST}:{port}/ws?token={TOKEN}&since_seq={since}", on_message)
    try:
        await asyncio.wait_for(done, 120)
    finally:
        await client.close()
    seconds = time.perf_counter() - started
    return {"events": expected, "seconds": seconds, "events_per_s": expected / seconds,
            "replayed": first.get("replayed")}


async def measure(db: str, events: int, args: argparse.Namespace, replay: int) -> dict[str, Any]:
    env = server_env({"VX11_GATEWAY_TOKEN": TOKEN, "EDGELINK_DB": db, "EDGELINK_PROBE_INTERVAL": "0",
                      "EDGELINK_WS_REPLAY_MAX": str(max(replay, 1)), "EDGELINK_MAX_CONNECTIONS": "2000"})
    server = ServerProcess(TARGETS["edgelink"], env, Path(db).with_suffix(".log"))
    figures: dict[str, Any] = {"events": events, "startup_s": await server.start()}
    try:
        figures["snapshot"] = await snapshot_latency(server.port, args.snapshots)
        if replay:
            figures["replay"] = await replay_rate(server.port, events - replay, replay)
        load = Load("POST", INGEST_PATH, {"X-VX11-Token": TOKEN, "Content-Type": "application/json"},
                    alert_body(broadcast=False))
        clock = CpuClock(server.pid)
        result = await run_wrk(server.base_url, load, 50, args.duration)
        cpu = clock.elapsed()
        figures["ingest"] = {**result.as_dict(), "cpu_us_per_request":
                             cpu["server_cpu_s"] / max(result.requests, 1) * 1e6}
    finally:
        await server.stop()
    return figures


def plot(path: Path, sizes: list[dict[str, Any]]) -> None:
    """Three panels against the number of stored events: snapshot latency, replay and ingest rates."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must be chosen before pyplot is imported
    import matplotlib.pyplot as plt

    labels = [f"{f['events']:,}" for f in sizes]
    fig, (snap, replay, ingest) = plt.subplots(1, 3, figsize=(14, 4.5))
    x = range(len(sizes))
    snap.bar([i - 0.2 for i in x], [f["snapshot"]["p50_ms"] for f in sizes], 0.4, label="p50")
    snap.bar([i + 0.2 for i in x], [f["snapshot"]["p99_ms"] for f in sizes], 0.4, label="p99")
    snap.axhline(10, color="grey", linestyle="--", label="target 10 ms")
    snap.set(title="/operator/snapshot", ylabel="ms")
    snap.legend()
    replay.bar(x, [f.get("replay", {}).get("events_per_s", 0) for f in sizes])
    replay.set(title="WebSocket replay (since_seq)", ylabel="events/s")
    ingest.bar(x, [f["ingest"]["rps"] for f in sizes])
    ingest.set(title="POST /events/ingest, 50 connections", ylabel="req/s")
    for ax in (snap, replay, ingest):
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("events stored")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the large ledger")
    parser.add_argument("--replay", type=int, default=SMALL, help="events replayed over one WebSocket")
    parser.add_argument("--snapshots", type=int, default=200, help="sequential /operator/snapshot requests")
    parser.add_argument("--duration", type=int, default=5, help="seconds of wrk ingest load")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    run: dict[str, Any] = {"sync": os.environ.get("EDGELINK_LEDGER_SYNC", "full"), "sizes": []}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        for count, replay in ((0, 0), (SMALL, min(args.replay, SMALL)), (args.events, min(args.replay, args.events))):
            db = f"{tmp}/ledger-{count}.db"
            fill_s = fill(db, count)
            print(f"{count} events filled in {fill_s:.1f} s ({os.path.getsize(db) / 2**20:.0f} MiB)", file=sys.stderr)
            figures = uvloop.run(measure(db, count, args, replay))
            figures["fill_s"] = fill_s
            run["sizes"].append(figures)
            print(json.dumps(figures), file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"scale-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(run, indent=1) + "\n")
    plot(path.with_suffix(".png"), run["sizes"])
    print(f"{'events':>10} {'snapshot p50':>13} {'p99 ms':>8} {'replay ev/s':>12} {'ingest req/s':>13} {'p99 ms':>8}")
    for f in run["sizes"]:
        rep = f.get("replay", {}).get("events_per_s", 0)
        print(f"{f['events']:>10} {f['snapshot']['p50_ms']:>13.2f} {f['snapshot']['p99_ms']:>8.2f} {rep:>12.0f} "
              f"{f['ingest']['rps']:>13.0f} {f['ingest']['percentiles_ms'].get('99', 0):>8.2f}")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
