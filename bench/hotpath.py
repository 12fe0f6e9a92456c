"""``python -m bench.hotpath``: the cost of one request inside the process, without sockets.

The real ``HttpProtocol``, ``Dispatcher``, router, handlers and ledger are driven through a
stand-in transport that records what is written, on uvloop: what is left is edgelink's own
CPU per request (h11, dispatch, handler, ledger), free of the kernel and of the load tool,
so a change's effect shows even on a busy machine. Run it under ``cProfile`` or callgrind
for the split::

    .venv/bin/python -m bench.hotpath health --requests 50000
    .venv/bin/python -m bench.hotpath ingest --requests 5000 --profile
    valgrind --tool=callgrind .venv/bin/python -m bench.hotpath health --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from typing import Any

import orjson
import uvloop

from edgelink.app import build_router
from edgelink.config import load_settings
from edgelink.dispatch import Dispatcher
from edgelink.http.server import HttpServer
from edgelink.overload import OverloadManager
from edgelink.runtime import Runtime

from .micro.inputs import INGEST_BODY

TOKEN = "bench-token"
HEALTH = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n"


def ingest_request() -> bytes:
    body = orjson.dumps(INGEST_BODY)
    return (b"POST /events/ingest HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Type: application/json\r\n"
            b"X-VX11-Token: %s\r\nContent-Length: %d\r\n\r\n%s" % (TOKEN.encode(), len(body), body))


class Transport:
    """What HttpProtocol uses of a transport; each write completes the pending answer."""

    def __init__(self) -> None:
        self.answered: asyncio.Future[bytes] | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def write(self, data: bytes) -> None:
        if self.answered is not None and not self.answered.done():
            self.answered.set_result(data)

    def writelines(self, parts: Any) -> None:
        self.write(b"".join(parts))

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def can_write_eof(self) -> bool:
        return True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


async def drive(kind: str, requests: int, rounds: int, profile: bool, db: str) -> list[float]:
    settings = load_settings(env={"VX11_GATEWAY_TOKEN": TOKEN, "EDGELINK_DB": db, "EDGELINK_PROBE_INTERVAL": "0"})
    runtime = Runtime(settings)
    await runtime.start()
    runtime.router = build_router()
    server = HttpServer(Dispatcher(runtime.router, runtime), settings, runtime.account)
    # the overload manager runs as in `edgelink serve`: its readings are part of the cost
    overload = server.overload = OverloadManager(server, lambda: runtime.settings, runtime.metrics)
    overload.start()
    proto = server._make_protocol()
    transport = Transport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    raw = HEALTH if kind == "health" else ingest_request()
    expect = b"HTTP/1.1 200 " if kind == "health" else b"HTTP/1.1 201 "
    loop = asyncio.get_running_loop()

    async def one() -> None:
        transport.answered = loop.create_future()
        proto.data_received(raw)
        answer = await transport.answered
        if not answer.startswith(expect):
            raise SystemExit(f"unexpected answer: {answer[:200]!r}")

    for _ in range(min(requests, 1000)):  # warm-up: caches, the ledger's first pages
        await one()
    per_request: list[float] = []
    profiler = cProfile.Profile() if profile else None
    for _ in range(rounds):
        if profiler is not None:
            profiler.enable()
        started = time.perf_counter()
        for _ in range(requests):
            await one()
        per_request.append((time.perf_counter() - started) / requests * 1e6)
        if profiler is not None:
            profiler.disable()
    overload.stop()
    await runtime.stop()
    if profiler is not None:
        stats = pstats.Stats(profiler, stream=sys.stderr)
        stats.sort_stats("tottime").print_stats(30)
        print_split(stats, rounds * requests)
    return per_request


# (part, functions whose inclusive time it is, functions whose inclusive time it leaves out)
SPLIT = (
    ("h11: parse (next_event, receive_data)", ("h11/_connection.py:next_event", "h11/_connection.py:receive_data"), ()),
    ("h11: fresh Connection per request", ("h11/_connection.py:__init__",), ()),
    ("server: headers dict, Request (_start_request)", ("http/connection.py:_start_request",), ("dispatch.py:admit",)),
    ("server: response bytes (ResponseWriter.write own)", ("http/writer.py:write",),
     ("http/connection.py:end_response",)),
    ("server: timers (Timer.arm, Timer.cancel)", ("http/timer.py:arm", "http/timer.py:cancel"), ()),
    ("dispatch: admit, route, auth, metrics, id", ("dispatch.py:respond", "dispatch.py:admit", "dispatch.py:_finish"),
     ("api/", "edgelink/ledger/")),
    ("handler (api/)", ("api/",), ("edgelink/ledger/",)),
    ("ledger (on the loop)", ("edgelink/ledger/",), ()),
)


def _inclusive(stats: pstats.Stats, wanted: tuple[str, ...], outside: tuple[str, ...]) -> float:
    """Inclusive seconds of the functions named by ``wanted`` (``path:function`` suffixes),
    counted once where they call each other, less their calls into ``outside``."""
    def named(key: tuple[str, int, str], names: tuple[str, ...]) -> bool:
        label = f"{key[0]}:{key[2]}"
        # "dir/" and "file.py:" name every function there; "file.py:name" one function
        return any(label.endswith(n) or (n[-1] in "/:" and n.rstrip(":") in key[0]) for n in names)

    total = 0.0
    for key, (_, _, _, cumulative, callers) in stats.stats.items():  # type: ignore[attr-defined]
        if not named(key, wanted):
            continue
        # only the time entered from outside the group, so recursion is not counted twice
        share = sum(c[3] for caller, c in callers.items() if not named(caller, wanted))
        total += share if callers else cumulative
        for callee, (_, _, _, c_cumulative, c_callers) in stats.stats.items():  # type: ignore[attr-defined]
            if named(callee, outside) and key in c_callers:
                total -= c_callers[key][3]
    return total


def print_split(stats: pstats.Stats, count: int) -> None:
    whole = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    print(f"{'part':50} µs/request (under cProfile)  share", file=sys.stderr)
    for label, wanted, outside in SPLIT:
        seconds = _inclusive(stats, wanted, outside)
        print(f"{label:50} {seconds / count * 1e6:8.2f}  {seconds / whole:6.1%}", file=sys.stderr)
    print(f"{'all profiled':50} {whole / count * 1e6:8.2f}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("health", "ingest"))
    parser.add_argument("--requests", type=int, default=20000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="print a cProfile table to stderr")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        per_request = uvloop.run(drive(args.kind, args.requests, args.rounds, args.profile, f"{tmp}/ledger.db"))
    print(f"{args.kind}: median {statistics.median(per_request):.2f} µs/request over {args.rounds} rounds "
          f"of {args.requests} (min {min(per_request):.2f}, max {max(per_request):.2f})")


if __name__ == "__main__":
    main()
