"""Two edgelink installs on the same box in the same run: ``GET /health`` and durable
``POST /events/ingest`` at saturation (50 connections), the two alternated round by round,
each round with a fresh database, so that a change is judged against the code before it
rather than against figures taken on another machine or at another time.

    python -m bench.compare OLD/bin/edgelink NEW/bin/edgelink [--rounds 5] [--duration 5]

Prints each round and then, per figure, the medians and new / old. Server CPU per request
(from ``/proc/<pid>/stat``) moves less with the box's load than req/s does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import tempfile
from pathlib import Path
from statistics import median

from .events import INGEST_PATH, alert_body
from .proc import CpuClock
from .targets import ServerProcess, Target, server_env
from .wrk import Load, run_wrk

CONNECTIONS = 50


def _loads(token: str) -> dict[str, Load]:
    return {"health": Load("GET", "/health"),
            "ingest": Load("POST", INGEST_PATH, {"X-VX11-Token": token, "Content-Type": "application/json"},
                           alert_body(broadcast=False))}


async def _round(name: str, script: str, workdir: Path, duration: float) -> dict[str, float]:
    token = secrets.token_hex(16)
    env = server_env({"VX11_GATEWAY_TOKEN": token, "EDGELINK_DB": str(workdir / f"{name}.db")})
    server = ServerProcess(Target(name, (script, "serve", "--host", "{host}", "--port", "{port}")), env,
                           workdir / f"{name}.log")
    figures: dict[str, float] = {}
    try:
        await server.start()
        await asyncio.sleep(1.0)
        for figure, load in _loads(token).items():
            cpu = CpuClock(server.pid)
            run = await run_wrk(server.base_url, load, CONNECTIONS, duration)
            if sum(run.errors.values()):
                raise SystemExit(f"{name} {figure}: errors {run.errors}")
            figures[f"{figure}_rps"] = run.rps
            figures[f"{figure}_cpu_us"] = cpu.elapsed()["server_cpu_s"] / run.requests * 1e6
    finally:
        await server.stop()
    return figures


async def _main(old: str, new: str, rounds: int, duration: float) -> dict[str, dict[str, float]]:
    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    for n in range(rounds):
        for name, script in (("old", old), ("new", new)) if n % 2 == 0 else (("new", new), ("old", old)):
            with tempfile.TemporaryDirectory(prefix="edgelink-compare-") as tmp:
                figures = await _round(name, script, Path(tmp), duration)
            runs[name].append(figures)
            print(f"round {n + 1} {name}: " + ", ".join(f"{k} {v:,.1f}" for k, v in figures.items()),
                  file=sys.stderr, flush=True)
    medians = {name: {k: median(r[k] for r in results) for k in results[0]} for name, results in runs.items()}
    return {**medians, "new/old": {k: medians["new"][k] / medians["old"][k] for k in medians["new"]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("old", help="the edgelink command of the install to compare against")
    parser.add_argument("new", help="the edgelink command of the install being judged")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of both, alternated (default 5)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of wrk per figure (default 5)")
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(_main(args.old, args.new, args.rounds, args.duration)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
