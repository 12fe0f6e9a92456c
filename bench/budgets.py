"""edgelink's performance budgets, checked against the figures of a run.

Each budget names the run it is judged on; every HTTP figure is the median of its passes
(``Plan.passes``). ``GET /health`` p99 is judged at saturation (50 connections sending back
to back). ``POST /events/ingest`` p99 is judged on the paced run (50 connections offering
about 1,000 events/s): in a closed loop at saturation, latency is queueing, about
connections / throughput (Little's law), so a p99 there is a throughput target rather than
a latency one. The paced run that is judged has the ledger on tmpfs: every event is still
committed with ``synchronous=FULL`` before its 201, but the fsync is free, so the figure is
the gateway's own. The same paced run on the disk is reported beside the disk's own fsync
floor (bench/disk.py), as information: a (virtual) disk whose fsync stalls for tens of
milliseconds puts those stalls into every durable commit, whatever the gateway does. Without
a tmpfs, the on-disk run is judged instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .plan import Plan, rate_label

SATURATION = "saturation run: {connections} connections, each sending its next request as soon as it has the answer"
TMPFS = ("paced run with the ledger on tmpfs: {connections} connections offering ~{rate:,.0f} req/s in all "
         "(exponential think time, mean {think:g} ms per connection)")
PACED = ("paced run: {connections} connections offering ~{rate:,.0f} req/s in all "
         "(exponential think time, mean {think:g} ms per connection)")
HOLD = ("1,000-client run: {clients:,} WebSocket clients connected, {rate:g} broadcast events/s "
        "for {duration:g} s, RSS sampled every 100 ms")


@dataclass(frozen=True)
class Budget:
    target: str
    figure: str
    limit: float
    label: str   # may use {connections}, {health_rate}, {ingest_rate}
    run: str     # the run the figure comes from: "saturation", "health_paced", "ingest_paced", "ingest_tmpfs", "hold"
    enforced: bool = True  # False: reported as information, never fails the run
    why: str = ""  # for information lines: why this figure is not a budget
    instead: "Budget | None" = None  # judged in its place when this figure was not measured at all

    def describe_run(self, plan: Plan) -> str:
        if self.run == "saturation":
            return SATURATION.format(connections=plan.connections)
        if self.run == "hold":
            return HOLD.format(clients=plan.hold_clients, rate=plan.hold_rate, duration=plan.duration)
        rate = {"health_paced": plan.health_paced_rate, "ingest_paced": plan.ingest_paced_rate,
                "ingest_tmpfs": plan.ingest_paced_rate}[self.run]
        return (TMPFS if self.run == "ingest_tmpfs" else PACED).format(connections=plan.connections, rate=rate, think=plan.think_ms(rate))

    def check(self, targets: Mapping[str, Mapping[str, Any]], plan: Plan) -> dict[str, Any]:
        """Pass when the figure was measured without errors and is below the limit."""
        result = targets[self.target]
        value = result["figures"].get(self.figure)
        if value is None and self.instead is not None:
            return self.instead.check(targets, plan)
        valid = value is not None and self.figure not in result["invalid"]
        label = self.label.format(connections=plan.connections, health_rate=rate_label(plan.health_paced_rate),
                                  ingest_rate=rate_label(plan.ingest_paced_rate))
        return {"target": self.target, "figure": self.figure, "limit": self.limit, "label": label,
                "run": self.describe_run(plan), "enforced": self.enforced, "value": value, "why": self.why,
                "passed": valid and value < self.limit}


SATURATION_WHY = ("at saturation latency is queueing (about connections / throughput), so this measures "
                  "throughput; the budget is judged on the paced run")
DISK_WHY = "durable on the disk: read it beside the disk's own fsync p99 in the table; the budget is judged on tmpfs"
INGEST_PACED = "POST /events/ingest p99 at {connections} connections, paced @{ingest_rate}"

BUDGETS = (
    Budget("edgelink", "health_p99_ms", 50.0, "GET /health p99 at {connections} connections < 50 ms",
           "saturation"),
    Budget("edgelink", "ingest_tmpfs_p99_ms", 10.0, INGEST_PACED + ", ledger on tmpfs < 10 ms", "ingest_tmpfs",
           instead=Budget("edgelink", "ingest_paced_p99_ms", 10.0, INGEST_PACED + " (no tmpfs: on the disk) < 10 ms",
                          "ingest_paced")),
    Budget("edgelink", "rss_ws1000_mb", 80.0, "RSS peak, 1,000 WebSocket clients, events flowing < 80 MiB",
           "hold"),
    # Information only (see the module docstring).
    Budget("edgelink", "ingest_paced_p99_ms", 10.0, INGEST_PACED + ", ledger on the disk, against 10 ms",
           "ingest_paced", enforced=False, why=DISK_WHY),
    Budget("edgelink", "ingest_p99_ms", 10.0, "POST /events/ingest p99 at {connections} connections, "
           "saturation, against 10 ms", "saturation", enforced=False, why=SATURATION_WHY),
)


def check_budgets(targets: Mapping[str, Mapping[str, Any]], plan: Plan) -> list[dict[str, Any]]:
    """The verdict of every budget whose target was part of the run."""
    return [budget.check(targets, plan) for budget in BUDGETS if budget.target in targets]


def failed(verdicts: list[Mapping[str, Any]]) -> bool:
    """Whether an enforced budget failed."""
    return any(v["enforced"] and not v["passed"] for v in verdicts)
