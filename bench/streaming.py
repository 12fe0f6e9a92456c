"""Streaming through the gateway against streaming straight from the module.

``python -m bench.streaming`` starts a streaming module (its own process) and edgelink in
front of it, then measures, the same way for both paths (``direct`` to the module, ``gateway``
through ``POST /vx11/intent/stream``):

- time to first byte: from writing the request on an open connection to reading the first
  body byte, over sequential streams (p50, p90, p99);
- latency per chunk: each chunk carries the module's ``CLOCK_MONOTONIC`` at the moment it
  was written; the client subtracts it from the moment it read the chunk (one clock for
  both processes on Linux);
- RSS of the gateway (VmRSS, sampled every 50 ms) idle and with 200 concurrent streams open.

The figures are printed as JSON; the "added" keys are gateway minus direct. Options:
``--streams`` (sequential streams for TTFB), ``--chunks`` (chunks per stream for the per-chunk
figure), ``--concurrent`` (default 200).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import h11
import orjson

from edgelink.config import MODULE_DEFAULTS

from .proc import MIB, RssSampler, rss_bytes
from .targets import HOST, TARGETS, ServerProcess, server_env

TOKEN = "bench-stream-token"


# --- the module (run as ``python -m bench.streaming module``) ---------------------------

async def _module_serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    h = h11.Connection(h11.SERVER)
    try:
        while True:
            body = b""
            while True:
                event = h.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    h.receive_data(data)
                    if not data and h.their_state is h11.IDLE:
                        return
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    return
            plan = orjson.loads(body or b"{}")
            writer.write(h.send(h11.Response(status_code=200, headers=[
                (b"content-type", b"text/event-stream"), (b"transfer-encoding", b"chunked")])))
            for i in range(int(plan.get("n", 1))):
                if i:
                    await asyncio.sleep(plan.get("gap_ms", 0) / 1000)
                writer.write(h.send(h11.Data(data=b'data: {"i":%d,"t":%d}\n\n' % (i, time.monotonic_ns()))))
                await writer.drain()
            writer.write(h.send(h11.EndOfMessage()))
            await writer.drain()
            h.start_next_cycle()
    except (ConnectionError, h11.ProtocolError):
        pass
    finally:
        writer.close()


async def _module_main() -> None:
    server = await asyncio.start_server(_module_serve, HOST, 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


# --- the client ---------------------------------------------------------------------------

class _Stream:
    """One keep-alive connection that posts a plan and reads the streamed answer."""

    def __init__(self, port: int, path: str):
        self.port, self.path = port, path
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.h = h11.Connection(h11.CLIENT)

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(HOST, self.port)

    async def send(self, plan: dict[str, Any]) -> float:
        """Write the request; the perf_counter at which it was written."""
        assert self.writer is not None
        if self.h.our_state is h11.DONE:
            self.h.start_next_cycle()
        body = orjson.dumps(plan)
        headers = [("host", HOST), ("content-length", str(len(body))), ("x-vx11-token", TOKEN),
                   ("content-type", "application/json")]
        self.writer.write(self.h.send(h11.Request(method="POST", target=self.path, headers=headers))
                          + self.h.send(h11.Data(data=body)) + self.h.send(h11.EndOfMessage()))
        return time.perf_counter()

    async def next(self) -> h11.Event:
        assert self.reader is not None
        while True:
            event = self.h.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.h.receive_data(await self.reader.read(65536))

    async def run(self, plan: dict[str, Any], lags: list[float] | None = None) -> float:
        """One stream; its time to first byte. Per-chunk lags (ms) are appended to ``lags``."""
        sent = await self.send(plan)
        first = 0.0
        while True:
            event = await self.next()
            if isinstance(event, h11.Response):
                if event.status_code != 200:
                    raise RuntimeError(f"{self.path}: HTTP {event.status_code}")
            elif isinstance(event, h11.Data):
                now_ns = time.monotonic_ns()
                first = first or time.perf_counter() - sent
                if lags is not None:
                    for line in bytes(event.data).split(b"\n"):
                        if line.startswith(b"data: "):
                            lags.append((now_ns - orjson.loads(line[6:])["t"]) / 1e6)
            elif isinstance(event, h11.EndOfMessage):
                return first

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": round(pick(0.5), 4), "p90": round(pick(0.9), 4), "p99": round(pick(0.99), 4),
            "mean": round(statistics.fmean(ordered), 4)}


async def _path_figures(port: int, path: str, streams: int, chunks: int) -> dict[str, Any]:
    client = _Stream(port, path)
    await client.open()
    for _ in range(20):  # warm up: the gateway's upstream pool, caches
        await client.run({"n": 2})
    ttfb = [await client.run({"n": 1}) * 1000 for _ in range(streams)]
    lags: list[float] = []
    for _ in range(max(1, chunks // 50)):
        await client.run({"n": 50, "gap_ms": 2}, lags)
    await client.close()
    return {"ttfb_ms": _percentiles(ttfb), "chunk_lag_ms": _percentiles(lags), "chunks": len(lags)}


async def _concurrent_rss(gateway: ServerProcess, count: int) -> dict[str, float]:
    idle = rss_bytes(gateway.pid)
    clients = [_Stream(gateway.port, "/vx11/intent/stream") for _ in range(count)]
    for c in clients:
        await c.open()
    with RssSampler(gateway.pid, interval=0.05) as sampler:
        # 50 chunks 100 ms apart: every stream stays open for about 5 s at once.
        await asyncio.gather(*(c.run({"n": 50, "gap_ms": 100}) for c in clients))
    for c in clients:
        await c.close()
    return {"streams": count, "rss_idle_mib": round(idle / MIB, 1), "rss_peak_mib": round(sampler.peak() / MIB, 1)}


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    module = subprocess.Popen([sys.executable, "-m", "bench.streaming", "module"], stdout=subprocess.PIPE)
    assert module.stdout is not None
    module_port = int(module.stdout.readline())
    url = f"http://{HOST}:{module_port}"
    with tempfile.TemporaryDirectory() as tmp:
        env = server_env({"VX11_GATEWAY_TOKEN": TOKEN, "EDGELINK_DB": str(Path(tmp) / "bench.db"),
                          "EDGELINK_PROBE_INTERVAL": "0", "EDGELINK_MAX_CONNECTIONS": "2000",
                          **{env_name: url for _, env_name, _ in MODULE_DEFAULTS}})
        gateway = ServerProcess(TARGETS["edgelink"], env, Path(tmp) / "edgelink.log")
        try:
            await gateway.start()
            direct = await _path_figures(module_port, "/switch/stream", args.streams, args.chunks)
            via = await _path_figures(gateway.port, "/vx11/intent/stream", args.streams, args.chunks)
            rss = await _concurrent_rss(gateway, args.concurrent)
        finally:
            await gateway.stop()
            module.terminate()
            module.wait()
    return {
        "direct": direct, "gateway": via,
        "added_ttfb_ms_p50": round(via["ttfb_ms"]["p50"] - direct["ttfb_ms"]["p50"], 4),
        "added_chunk_lag_ms_p50": round(via["chunk_lag_ms"]["p50"] - direct["chunk_lag_ms"]["p50"], 4),
        "concurrent": rss,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.streaming", description=__doc__.split("\n\n")[0])
    parser.add_argument("role", nargs="?", choices=["module"], help=argparse.SUPPRESS)
    parser.add_argument("--streams", type=int, default=500, help="sequential streams for the TTFB figure")
    parser.add_argument("--chunks", type=int, default=2000, help="chunks for the per-chunk latency figure")
    parser.add_argument("--concurrent", type=int, default=200, help="concurrent streams for the RSS figure")
    args = parser.parse_args()
    if args.role == "module":
        asyncio.run(_module_main())
        return
    print(json.dumps(asyncio.run(_main(args)), indent=2))


if __name__ == "__main__":
    main()
