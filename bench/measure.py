"""Every figure for one target: start-up, idle RSS, the wrk loads (``/health`` and ingest at
saturation and paced, ``/vx11/status``), WebSocket fan-out and the 1,000-client hold, with
RSS sampled throughout the load.

A figure whose measurement saw failed requests, unfinished deliveries or dropped clients is
listed in ``invalid`` with a warning: it is reported, but neither compared nor budget-checked.
A paced latency measured at an offered rate close to the target's own saturation throughput
is listed in ``not_comparable`` with a note: it is reported and budget-checked, but gets no
ratio, since it compares a loaded server with an idle one.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

from . import BenchError
from .disk import fsync_floor, tmpfs_directory
from .events import INGEST_PATH, Poster, alert_body
from .plan import Plan
from .proc import MIB, CpuClock, RssSampler, rss_bytes
from .targets import HOST, ServerProcess, Target, server_env
from .wrk import Load, WrkResult, run_wrk
from .wsload import fanout, hold

# A paced run that achieves less than this share of its offered rate gets a warning. Some
# shortfall is expected: each connection's cycle is its think time plus the latency.
PACED_SHORTFALL = 0.8

# A paced run offering at least this share of the same target's saturation throughput keeps
# that server near saturation, where latency is mostly queueing: its paced latencies are not
# compared with those of a server that was mostly idle at the same rate.
NEAR_SATURATION = 0.7

# What ends a target's run: our own checks, sockets, timeouts, and answers that are not JSON.
FAILURES = (BenchError, OSError, TimeoutError, ValueError)


def progress(target: str, message: str) -> None:
    print(f"[{target}] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class HttpFigure:
    """One wrk run: the figures it gives are named ``<prefix>_rps``, ``<prefix>_p50_ms`` ..."""

    prefix: str
    load: Load
    connections: int
    offered_rps: float | None = None  # paced runs: the rate the think time aims at
    saturation: str | None = None     # paced runs: the prefix of the same load's saturation run
    where: str = ""                   # what differs from the main run, for the progress lines

    def describe(self) -> str:
        pace = "saturation" if self.offered_rps is None else f"paced at ~{self.offered_rps:,.0f} req/s"
        return f"{self.load.method} {self.load.path} x{self.connections} {pace}{self.where}"


def _ingest(token: str) -> Load:
    return Load("POST", INGEST_PATH, {"X-VX11-Token": token, "Content-Type": "application/json"},
                alert_body(broadcast=False))


def http_loads(token: str, plan: Plan) -> tuple[HttpFigure, ...]:
    """Every HTTP figure in the order measured: each of /health and ingest at saturation, then
    paced; /vx11/status at saturation."""
    health = Load("GET", "/health")
    ingest = _ingest(token)
    return (
        HttpFigure("health", health, plan.connections),
        HttpFigure("health_paced", health.paced(plan.think_ms(plan.health_paced_rate)), plan.connections,
                   plan.health_paced_rate, "health"),
        HttpFigure("ingest", ingest, plan.connections),
        HttpFigure("ingest_paced", ingest.paced(plan.think_ms(plan.ingest_paced_rate)), plan.connections,
                   plan.ingest_paced_rate, "ingest"),
        HttpFigure("status", Load("GET", "/vx11/status"), plan.status_connections),
    )


class Measurement:
    """The figures of one target as they are taken, and what went wrong."""

    def __init__(self, target: Target) -> None:
        self.target = target.name
        self.result: dict[str, Any] = {"command": list(target.argv), "figures": {}, "latency_ms": {},
                                       "details": {}, "invalid": [], "not_comparable": [], "warnings": [],
                                       "notes": [], "error": None}
        self.figures: dict[str, float] = self.result["figures"]

    def note(self, note: str) -> None:
        self.result["notes"].append(note)
        progress(self.target, f"NOTE: {note}")

    def distrust(self, figures: tuple[str, ...], warning: str) -> None:
        self.result["invalid"].extend(figures)
        self.result["warnings"].append(warning)
        progress(self.target, f"WARNING: {warning}")


async def measure(target: Target, plan: Plan, module_env: Mapping[str, str], workdir: Path) -> dict[str, Any]:
    """Run ``target`` and measure it. A failure ends the target's run; the figures taken so far
    are kept and ``error`` says what went wrong."""
    token = secrets.token_hex(16)
    env = server_env({
        **module_env,
        "VX11_GATEWAY_TOKEN": token,
        "EDGELINK_DB": str(workdir / f"{target.name}.db"),
        "SHUB_ENABLED": "true",  # probe all nine modules
        "EDGELINK_MAX_CONNECTIONS": str(2 * plan.hold_clients),  # the 1,000 clients plus the posters
    })
    server = ServerProcess(target, env, workdir / f"{target.name}.log")
    m = Measurement(target)
    try:
        m.figures["startup_ms"] = await server.start() * 1000
        progress(target.name, f"up in {m.figures['startup_ms']:.0f} ms on port {server.port}")
        await asyncio.sleep(plan.settle)
        m.figures["rss_idle_mb"] = rss_bytes(server.pid) / MIB
        with RssSampler(server.pid) as sampler:
            await _http_figures(server, token, plan, m)
            await _websocket_figures(server, token, plan, m, sampler)
        m.figures["rss_peak_mb"] = sampler.peak() / MIB
    except FAILURES as exc:
        m.result["error"] = f"{type(exc).__name__}: {exc}"
        progress(target.name, f"FAILED: {m.result['error'].splitlines()[0]}")
    finally:
        await server.stop()
    if m.result["error"] is None:
        await _ingest_in_memory(target, plan, env, token, m)
    return m.result


async def _ingest_in_memory(target: Target, plan: Plan, env: Mapping[str, str], token: str,
                            m: Measurement) -> None:
    """The paced ingest again, with the ledger on tmpfs: still ``synchronous=FULL``, every
    commit still made before the 201, but the fsync costs nothing, so the latency is the
    server's own. Beside it, the disk's fsync floor in the directory the first run used."""
    floor = await asyncio.to_thread(fsync_floor, Path(env["EDGELINK_DB"]).parent, plan.duration)
    m.figures["disk_fsync_p99_ms"] = floor["p99_ms"]
    m.result["details"]["disk_fsync"] = floor
    progress(m.target, f"disk fsync floor: p50 {floor['p50_ms']:.2f} ms, p99 {floor['p99_ms']:.2f} ms, "
                       f"max {floor['max_ms']:.1f} ms over {floor['fsyncs']} fsyncs")
    shm = tmpfs_directory()
    if shm is None:
        m.note("no writable tmpfs at /dev/shm: the in-memory ingest figure was not measured")
        return
    with tempfile.TemporaryDirectory(prefix="edgelink-bench-", dir=shm) as memdir:
        server = ServerProcess(target, {**env, "EDGELINK_DB": f"{memdir}/{target.name}.db"},
                               Path(env["EDGELINK_DB"]).with_suffix(".tmpfs.log"))
        figure = HttpFigure("ingest_tmpfs", _ingest(token).paced(plan.think_ms(plan.ingest_paced_rate)),
                            plan.connections, plan.ingest_paced_rate, "ingest", ", ledger on tmpfs")
        try:
            await server.start()
            await _http_figures(server, token, plan, m, (figure,))
        except FAILURES as exc:
            m.result["error"] = f"{type(exc).__name__}: {exc}"
            progress(target.name, f"FAILED: {m.result['error'].splitlines()[0]}")
        finally:
            await server.stop()


async def _http_figures(server: ServerProcess, token: str, plan: Plan, m: Measurement,
                        figures: tuple[HttpFigure, ...] | None = None) -> None:
    """Each figure ``plan.passes`` times, the passes interleaved (all figures once, then again),
    so that a slow moment of the box lands in one run of a figure rather than all of them;
    every figure is the median of its passes."""
    figures = http_loads(token, plan) if figures is None else figures
    runs: dict[str, list[tuple[WrkResult, dict[str, float]]]] = {figure.prefix: [] for figure in figures}
    for n in range(plan.passes):
        for figure in figures:
            cpu = CpuClock(server.pid)
            run = await run_wrk(server.base_url, figure.load, figure.connections, plan.duration)
            runs[figure.prefix].append((run, cpu.elapsed()))
            progress(m.target, f"{figure.describe()} (pass {n + 1}/{plan.passes}): {run.rps:.0f} req/s, "
                               f"p50 {run.percentiles_ms['50']:.2f} ms, p99 {run.percentiles_ms['99']:.2f} ms")
    for figure in figures:
        _record(m, figure, runs[figure.prefix])


def _record(m: Measurement, figure: HttpFigure, runs: list[tuple[WrkResult, dict[str, float]]]) -> None:
    """The medians of a figure's passes; every pass is kept in the details."""
    prefix = figure.prefix
    percentiles = {p: median(run.percentiles_ms[p] for run, _ in runs) for p in runs[0][0].percentiles_ms}
    rps = median(run.rps for run, _ in runs)
    m.figures[f"{prefix}_rps"] = rps
    m.figures[f"{prefix}_p50_ms"] = percentiles["50"]
    m.figures[f"{prefix}_p99_ms"] = percentiles["99"]
    m.figures[f"{prefix}_cpu_us"] = median(spent["server_cpu_s"] / run.requests * 1e6 for run, spent in runs)
    m.result["latency_ms"][prefix] = percentiles
    m.result["details"][prefix] = {"connections": figure.connections,
                                   "passes": [{**run.as_dict(), **spent} for run, spent in runs],
                                   "offered_rps": figure.offered_rps, "think_ms_mean": figure.load.think_ms}
    failed: dict[str, int] = {}
    for run, _ in runs:
        for kind, n in run.errors.items():
            if n:
                failed[kind] = failed.get(kind, 0) + n
    if failed:
        requests = sum(run.requests for run, _ in runs)
        m.distrust(tuple(f"{prefix}_{name}" for name in ("rps", "p50_ms", "p99_ms", "cpu_us")),
                   f"{figure.describe()}: {sum(failed.values())} of {requests} requests "
                   f"failed {failed} (status = non-2xx/3xx answers)")
    if figure.offered_rps is not None:
        _check_pace(m, figure, rps)


def _check_pace(m: Measurement, figure: HttpFigure, achieved: float) -> None:
    """Notes on a paced run: offered near this target's saturation, or not kept up with."""
    saturation = m.figures.get(f"{figure.saturation}_rps")
    if saturation and figure.offered_rps >= NEAR_SATURATION * saturation:
        m.result["not_comparable"].extend(f"{figure.prefix}_{name}" for name in ("p50_ms", "p99_ms"))
        m.note(f"{figure.describe()}: the offered rate is {figure.offered_rps / saturation:.0%} of this "
               f"server's saturation throughput ({saturation:,.0f} req/s), so it ran near saturation and its "
               f"paced latencies are queueing; they get no ratio")
    if achieved < PACED_SHORTFALL * figure.offered_rps:
        # Not distrusted: a server that cannot keep up shows it in its latency as well.
        m.note(f"{figure.describe()}: only {achieved:,.0f} req/s achieved; the server (or the box) "
               f"did not keep up with the paced load")


async def _websocket_figures(server: ServerProcess, token: str, plan: Plan, m: Measurement,
                             sampler: RssSampler) -> None:
    ws_url = f"ws://{HOST}:{server.port}/ws?token={token}"
    poster = Poster(HOST, server.port, token, plan.post_concurrency)
    try:
        cpu = CpuClock(server.pid)
        spread = {**await fanout(ws_url, poster, plan), **cpu.elapsed()}
        m.result["details"]["ws_fanout"] = spread
        m.figures["ws_fanout_fps"] = spread["frames_per_s"]
        m.figures["ws_fanout_cpu_ms"] = spread["server_cpu_s"] * 1e6 / max(spread["frames"], 1)
        progress(m.target, f"fan-out to {spread['clients']} clients: {spread['frames_per_s']:.0f} frames/s "
                           f"(CPU s: server {spread['server_cpu_s']:.2f}, harness {spread['harness_cpu_s']:.2f})")
        _check_delivery(m, ("ws_fanout_fps", "ws_fanout_cpu_ms"), spread)

        cpu = CpuClock(server.pid)
        held = {**await hold(ws_url, poster, sampler, plan), **cpu.elapsed()}
        m.result["details"]["ws_hold"] = held
        m.figures["rss_ws1000_mb"] = held["rss_peak_bytes"] / MIB
        progress(m.target, f"{held['clients']} clients, {held['events']} events: "
                           f"RSS {m.figures['rss_ws1000_mb']:.1f} MiB")
        _check_delivery(m, ("rss_ws1000_mb",), held)
    finally:
        await poster.aclose()


def _check_delivery(m: Measurement, figures: tuple[str, ...], run: Mapping[str, Any]) -> None:
    if run["frames"] < run["expected_frames"] or run["lost_clients"]:
        m.distrust(figures, f"{run['clients']} WebSocket clients: {run['frames']} of {run['expected_frames']} "
                            f"frames delivered, {run['lost_clients']} clients closed by the server")
