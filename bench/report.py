"""The run's outputs: the text table with ratios, the JSON document and the latency plot."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .measure import NEAR_SATURATION
from .plan import rate_label

# (figure, label, unit); the table lists them in this order. Labels may use {health_rate} and
# {ingest_rate}, the offered rates of the paced runs ("1k/s").
ROWS = (
    ("startup_ms", "start-up to first 200 on /health", "ms"),
    ("rss_idle_mb", "RSS idle", "MiB"),
    ("health_rps", "GET /health throughput, saturation", "req/s"),
    ("health_p50_ms", "GET /health p50, saturation", "ms"),
    ("health_p99_ms", "GET /health p99, saturation", "ms"),
    ("health_cpu_us", "GET /health server CPU per request", "us"),
    ("health_paced_rps", "GET /health req/s achieved @{health_rate} paced", "req/s"),
    ("health_paced_p50_ms", "GET /health p50 @{health_rate} paced", "ms"),
    ("health_paced_p99_ms", "GET /health p99 @{health_rate} paced", "ms"),
    ("ingest_rps", "POST /events/ingest throughput, saturation", "req/s"),
    ("ingest_p50_ms", "POST /events/ingest p50, saturation", "ms"),
    ("ingest_p99_ms", "POST /events/ingest p99, saturation", "ms"),
    ("ingest_cpu_us", "POST /events/ingest server CPU per request", "us"),
    ("ingest_paced_rps", "POST /events/ingest req/s achieved @{ingest_rate} paced", "req/s"),
    ("ingest_paced_p50_ms", "POST /events/ingest p50 @{ingest_rate} paced", "ms"),
    ("ingest_paced_p99_ms", "POST /events/ingest p99 @{ingest_rate} paced", "ms"),
    ("disk_fsync_p99_ms", "disk fsync p99 (the floor of a durable commit)", "ms"),
    ("ingest_tmpfs_rps", "POST /events/ingest req/s achieved @{ingest_rate}, tmpfs", "req/s"),
    ("ingest_tmpfs_p50_ms", "POST /events/ingest p50 @{ingest_rate} paced, tmpfs", "ms"),
    ("ingest_tmpfs_p99_ms", "POST /events/ingest p99 @{ingest_rate} paced, tmpfs", "ms"),
    ("status_rps", "GET /vx11/status throughput", "req/s"),
    ("status_p50_ms", "GET /vx11/status p50", "ms"),
    ("status_p99_ms", "GET /vx11/status p99", "ms"),
    ("status_cpu_us", "GET /vx11/status server CPU per request", "us"),
    ("ws_fanout_fps", "WebSocket fan-out, 200 clients", "frames/s"),
    ("ws_fanout_cpu_ms", "ingest + fan-out server CPU per 1,000 frames", "ms"),
    ("rss_peak_mb", "RSS peak under load", "MiB"),
    ("rss_ws1000_mb", "RSS, 1,000 WS clients + events", "MiB"),
)
# (saturation key, paced key or None, panel title); one panel each, the paced run dashed.
PLOTTED = (("health", "health_paced", "GET /health"), ("ingest", "ingest_paced", "POST /events/ingest"),
           ("status", None, "GET /vx11/status"))
PAIR = ("edgelink", "reference")
NOT_COMPARABLE = "^"
NO_RATIO = {"disk_fsync_p99_ms"}  # the box's, not the server's: measured beside each target  # marks a paced latency taken near that server's saturation (no ratio)


def _labels(plan: Mapping[str, Any]) -> dict[str, str]:
    return {"health_rate": rate_label(plan["health_paced_rate"]), "ingest_rate": rate_label(plan["ingest_paced_rate"])}


def _valid(result: Mapping[str, Any], key: str) -> float | None:
    value = result["figures"].get(key)
    return None if key in result["invalid"] else value


def _comparable(result: Mapping[str, Any], key: str) -> bool:
    return key not in result.get("not_comparable", ())


def ratios(targets: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """edgelink / reference for every figure both measured validly, except paced latencies
    that either server took near its own saturation."""
    if not all(name in targets for name in PAIR):
        return {}
    ours, theirs = (targets[name] for name in PAIR)
    found = {}
    for key, _, _ in ROWS:
        a, b = _valid(ours, key), _valid(theirs, key)
        if a is not None and b and key not in NO_RATIO and _comparable(ours, key) and _comparable(theirs, key):
            found[key] = a / b
    return found


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


def _cell(result: Mapping[str, Any], key: str) -> str:
    return (_number(result["figures"].get(key)) + ("*" if key in result["invalid"] else "")
            + ("" if _comparable(result, key) else NOT_COMPARABLE))


def format_table(document: Mapping[str, Any]) -> str:
    """Figures side by side with their ratio; ``*`` marks a figure measured with errors, ``^`` a
    paced latency taken near that server's saturation (shown, but not compared)."""
    targets, found, plan = document["targets"], document["ratios"], document["plan"]
    labels = _labels(plan)
    names = list(targets)
    header = ["figure", "unit", *names] + (["edgelink/ref"] if found else [])
    rows = [header]
    for key, label, unit in ROWS:
        row = [label.format(**labels), unit, *(_cell(targets[n], key) for n in names)]
        if found:
            if key in found:
                row.append(f"{found[key]:.2f}x")
            elif not all(_comparable(targets[n], key) for n in names):
                row.append("n/c" + NOT_COMPARABLE)
            else:
                row.append("-")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)  # text left, numbers right
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"saturation: {plan['connections']} connections (/vx11/status: {plan['status_connections']}), "
                 f"each sending its next request as soon as it has the answer\n"
                 f"paced @N/s: {plan['connections']} connections with random think times, "
                 f"offering about N requests/s in all; every HTTP figure is the median of "
                 f"{plan['passes']} interleaved passes\n"
                 f"tmpfs: the ledger in memory (synchronous=FULL still, the fsync free): the gateway's own latency")
    if any(result.get("not_comparable") for result in targets.values()):
        lines.append(f"{NOT_COMPARABLE} offered rate >= {NEAR_SATURATION:.0%} of that server's own saturation throughput: it ran "
                     f"near saturation, so its paced latency is mostly queueing, not comparable with a server "
                     f"idling at the same rate (n/c: no ratio)")
    for name, result in targets.items():
        lines += [f"* {name}: {warning}" for warning in result["warnings"]]
        lines += [f"note: {name}: {note}" for note in result.get("notes", ())]
        if result["error"]:
            lines.append(f"{name} failed: {result['error']}")
    return "\n".join(lines)


def format_budgets(verdicts: list[Mapping[str, Any]]) -> str:
    """One line per budget with the run it was judged on; information lines never fail the run."""
    if not verdicts:
        return "budgets: none apply (edgelink was not measured)"
    lines = []
    for v in verdicts:
        measured = _number(v["value"])
        if v["enforced"]:
            lines.append(f"budget {'PASS' if v['passed'] else 'FAIL'}: {v['label']} (measured {measured})\n"
                         f"    judged on the {v['run']}")
        else:
            verdict = "within" if v["passed"] else "over"
            lines.append(f"info (not a budget): {v['label']}: measured {measured}, {verdict} {v['limit']:g}\n"
                         f"    {v['why']}")
    return "\n".join(lines)


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n")


def plot_latency(path: Path, targets: Mapping[str, Mapping[str, Any]], plan: Mapping[str, Any]) -> None:
    """One panel per HTTP endpoint: latency at each wrk percentile, one colour per target,
    solid for the saturation run and dashed for the paced one."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must be chosen before pyplot is imported
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    colours = {name: f"C{i}" for i, name in enumerate(targets)}
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(15, 5.8))
    for ax, (key, paced_key, title) in zip(axes, PLOTTED, strict=True):
        subtitle = []
        for run_key, style in ((key, "-"), (paced_key, "--")):
            if run_key is None:
                continue
            details = [r["details"][run_key] for r in targets.values() if run_key in r["details"]]
            if not details:
                continue
            offered = details[0].get("offered_rps")
            run = "saturation" if offered is None else f"paced ~{offered:,.0f}/s"
            subtitle.append(f"{'solid' if style == '-' else 'dashed'}: {run}, "
                            f"{details[0]['connections']} conn.")
            for name, result in targets.items():
                percentiles = result["latency_ms"].get(run_key)
                if percentiles:
                    ax.plot([f"p{p}" for p in percentiles], list(percentiles.values()), style, marker="o",
                            color=colours[name], label=f"{name}, {'saturation' if style == '-' else 'paced'}")
        ax.set_title(title + ("\n" + "; ".join(subtitle) if subtitle else ""), fontsize=10)
        ax.set_xlabel("percentile")
        ax.set_ylabel("latency (ms, log scale)")
        ax.set_yscale("log")
        low, high = ax.get_ylim()
        # 1, 2, 5 per decade; every integer multiple when the panel spans about a decade or less
        subs = (1, 2, 5) if high > 12 * low else (1, 2, 3, 4, 5, 6, 7, 8, 9)
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=subs))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    # One legend for all panels, below them, so that no line is hidden behind it.
    legend: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    if legend:
        fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=len(legend), fontsize=9,
                   title="solid: saturation (back to back); dashed: paced at the rate in the panel title",
                   title_fontsize=9)
    fig.suptitle(f"wrk latency percentiles, {plan['duration']:g} s per run"
                 + (" (smoke)" if plan.get("smoke") else ""), fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
