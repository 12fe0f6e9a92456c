"""``python -m bench``: measure edgelink and the FastAPI reference peer in one run.

Each target is started in turn on a free loopback port against nine fake modules; the
figures of both, their ratio and the budget verdicts are printed, and the run is written to
``bench/results/<timestamp>.json`` with a latency plot ``<timestamp>.png`` beside it.
Exit status 1 when a budget fails, a target could not be measured or any edgelink figure was
measured with errors.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import uvloop

from . import BenchError
from .budgets import check_budgets, failed
from .fakemodules import FakeModules
from .measure import measure
from .plan import Plan
from .report import format_budgets, format_table, plot_latency, ratios, write_json
from .targets import TARGETS
from .wrk import wrk_path

RESULTS = Path(__file__).resolve().parent / "results"
NOFILE_UNLIMITED = 65536  # what to ask for when the hard limit is "unlimited" (Linux refuses that)


def whole_seconds(text: str) -> float:
    """``--duration``: wrk's ``-d`` takes whole seconds only (wrk 4.1 rejects ``2.5s``)."""
    try:
        seconds = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds (wrk takes no fractions)") from None
    if seconds < 1:
        raise argparse.ArgumentTypeError(f"{seconds} is not at least 1 second")
    return float(seconds)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench",
                                     description="Measure edgelink and the FastAPI reference peer in one run.")
    parser.add_argument("--smoke", action="store_true", help="a few seconds per figure (CI)")
    parser.add_argument("--only", choices=sorted(TARGETS), help="measure one target only")
    parser.add_argument("--duration", type=whole_seconds, metavar="SECONDS",
                        help="whole seconds per load figure, at least 1 (default 10, or 3 with --smoke)")
    parser.add_argument("--passes", type=int, choices=range(1, 10), metavar="N",
                        help="runs of each HTTP figure, interleaved; the figure is their median (default 3)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON and PNG")
    return parser.parse_args(argv)


def raise_nofile() -> int:
    """Lift the open-files limit to the hard limit: 1,000 WebSocket clients need as many sockets
    here and in the server, which inherits the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = NOFILE_UNLIMITED if hard == resource.RLIM_INFINITY else hard
    if soft != wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


async def run_targets(names: list[str], plan: Plan, workdir: Path) -> dict[str, dict[str, Any]]:
    # SIGTERM cancels the run like Ctrl-C does, so that the server being measured is stopped too.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    modules = FakeModules()
    await modules.start()
    try:
        return {name: await measure(TARGETS[name], plan, modules.env, workdir) for name in names}
    finally:
        await modules.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan.make(smoke=args.smoke, duration=args.duration, passes=args.passes)
    names = [args.only] if args.only else list(TARGETS)
    try:
        wrk_path()
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    nofile = raise_nofile()
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="edgelink-bench-") as workdir:
        try:
            targets = uvloop.run(run_targets(names, plan, Path(workdir)))
        except (KeyboardInterrupt, asyncio.CancelledError):
            print("bench: interrupted, nothing written", file=sys.stderr)
            return 130
    document = {
        "timestamp": started,
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                 "nofile": nofile, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                 "ledger_sync": os.environ.get("EDGELINK_LEDGER_SYNC", "full")},
        "plan": {**asdict(plan), "fanout_events": plan.fanout_events, "smoke": args.smoke,
                 "health_paced_think_ms": plan.think_ms(plan.health_paced_rate),
                 "ingest_paced_think_ms": plan.think_ms(plan.ingest_paced_rate)},
        "targets": targets,
        "ratios": ratios(targets),
        "budgets": check_budgets(targets, plan),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = args.out / f"{started}.json", args.out / f"{started}.png"
    write_json(json_path, document)
    plot_latency(png_path, targets, document["plan"])
    print(format_table(document))
    print(format_budgets(document["budgets"]))
    print(f"results: {json_path}\nplot:    {png_path}")
    untrusted = sorted(targets.get("edgelink", {}).get("invalid", ()))
    if untrusted:
        # Even when no budget covers them: a figure measured with errors is not a measurement.
        print(f"FAIL: edgelink figures measured with errors (see the * warnings): {', '.join(untrusted)}")
    broken = failed(document["budgets"]) or any(t["error"] for t in targets.values()) or untrusted
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
