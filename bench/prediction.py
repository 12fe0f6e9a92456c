"""How well the health prediction (edgelink/gateway/prediction.py, API.md §11) warns, and what
it costs: generated traces with known truth, replayed on a simulated clock through the real
estimator and the real circuit breaker (edgelink/gateway/breaker.py).

Each trace is a module called ``--rate`` times a second through a breaker (3 failures in a
row open it, 60 s before a trial) with a timeout (15 s, the chat route's), and probed every
30 s (``GET /health``, which stays fast unless the module is down):

- ``creep``: 40 ms with log-normal noise (sigma 0.25), healthy for 3 h, then growing a few
  percent a minute (1, 3, 5) until its calls time out. Figure: lead time, from the first
  ``degrading`` to the breaker opening.
- ``errors``: healthy with 1 % failures, then the failure rate rising to 100 % over 30 min.
  Lead time as above.
- ``flap``: healthy for 3 h, then down 2 min / up 3 min for 2 h. Lead time of the first
  outage, and trend changes per hour while it flaps (what the log and the alert see).
- ``noisy``: healthy but noisy (sigma 0.35) with rare spikes (0.5 % of calls 10-30x slower)
  and 1 % of calls failing, 24 h. Figure: false alarms per hour (entries into ``degrading``; and those lasting 5 min,
  what the alert's ``for: 5m`` lets through).

Then the cost: microseconds per update (an observed call, bucket closes included), median of
``--repeat`` runs, and bytes of state per module (tracemalloc over 1,000 modules).
Every figure is the median over ``--seeds`` seeds. Windows other than the default can be
compared with ``--windows``.

    .venv/bin/python -m bench.prediction [--seeds 5] [--windows 600,1800,7200]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time
import tracemalloc
from dataclasses import dataclass, field
from typing import Callable

from edgelink.gateway import prediction
from edgelink.gateway.breaker import Breaker
from edgelink.gateway.prediction import CALL, CHECK, DEGRADING, HealthPredictor

TIMEOUT = 15.0  # seconds, the chat route's
PROBE_EVERY = 30.0
ALERT_FOR = 300.0  # the alert's `for:`
HOUR = 3600.0

# A trace: t (seconds) -> (call latency in ms or None for a failure, module reachable for probes)
Trace = Callable[[float], "tuple[float | None, bool]"]


@dataclass
class Outcome:
    first_degrading: float | None = None  # after the truth starts
    breaker_open: float | None = None
    entries: list[float] = field(default_factory=list)  # times trend entered degrading
    left: list[float] = field(default_factory=list)  # times it left
    changes: int = 0

    def lead(self) -> float | None:
        if self.first_degrading is None or self.breaker_open is None:
            return None
        return self.breaker_open - self.first_degrading

    def long_alarms(self, end: float) -> int:
        """Degrading episodes lasting the alert's `for:` (an open one counts to ``end``)."""
        ends = self.left + [end] * (len(self.entries) - len(self.left))
        return sum(1 for a, b in zip(self.entries, ends) if b - a >= ALERT_FOR)


def replay(trace: Trace, duration: float, truth: float, rate: float, window: float) -> Outcome:
    """Run ``trace`` for ``duration`` simulated seconds; ``truth`` is when the trouble starts."""
    clock = [0.0]
    out = Outcome()

    def changed(module: str, before: str, after: str, score: float) -> None:
        out.changes += 1
        if after == DEGRADING:
            out.entries.append(clock[0])
            if out.first_degrading is None and clock[0] >= truth:
                out.first_degrading = clock[0]
        elif before == DEGRADING:
            out.left.append(clock[0])

    p = HealthPredictor(["m"], window, on_change=changed)
    breaker = Breaker(3, 60.0, now=lambda: clock[0], wall=lambda: clock[0])
    gap = 1 / rate
    next_probe = 0.0
    t = 0.0
    while t < duration:
        clock[0] = t
        if t >= next_probe:
            _, up = trace(t)
            p.observe("m", CHECK, t, 2.0 if up else None)
            next_probe += PROBE_EVERY
        ticket = breaker.allow()
        if ticket is not None:
            latency, _ = trace(t)
            if latency is None or latency > TIMEOUT * 1000:
                breaker.record_failure(ticket)
                p.observe("m", CALL, t, None)
            else:
                breaker.record_success(ticket)
                p.observe("m", CALL, t, latency)
            if breaker.state == "open" and out.breaker_open is None and t >= truth:
                out.breaker_open = t
        t += gap
    return out


def creep(seed: int, per_minute: float, start: float) -> Trace:
    rng = random.Random(seed)
    growth = math.log(1 + per_minute) / 60

    def trace(t: float) -> tuple[float | None, bool]:
        slow = math.exp(growth * max(t - start, 0.0))
        return 40.0 * math.exp(rng.gauss(0, 0.25)) * slow, True
    return trace


def errors(seed: int, start: float, ramp: float = 1800.0) -> Trace:
    rng = random.Random(seed)

    def trace(t: float) -> tuple[float | None, bool]:
        p = 0.01 + 0.99 * min(max(t - start, 0.0) / ramp, 1.0)
        return (None if rng.random() < p else 40.0 * math.exp(rng.gauss(0, 0.25))), True
    return trace


def flap(seed: int, start: float, down: float = 120.0, up: float = 180.0) -> Trace:
    rng = random.Random(seed)

    def trace(t: float) -> tuple[float | None, bool]:
        if t >= start and (t - start) % (down + up) < down:
            return None, False
        return 40.0 * math.exp(rng.gauss(0, 0.25)), True
    return trace


def noisy(seed: int) -> Trace:
    rng = random.Random(seed)

    def trace(t: float) -> tuple[float | None, bool]:
        if rng.random() < 0.01:
            return None, True
        spike = rng.uniform(10, 30) if rng.random() < 0.005 else 1.0
        return 40.0 * math.exp(rng.gauss(0, 0.35)) * spike, True
    return trace


def _median(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "never"
    missed = len(values) - len(known)
    return f"{statistics.median(known) / 60:.1f} min" + (f" ({missed} of {len(values)} never)" if missed else "")


def evaluate(window: float, seeds: list[int], rate: float) -> list[tuple[str, str]]:
    learn = max(3 * HOUR, 1.5 * window)
    rows = []
    for per_minute in (0.01, 0.03, 0.05):
        # until the calls time out, plus some
        until = learn + math.log(TIMEOUT * 1000 / 40) / math.log(1 + per_minute) * 60 + 600
        leads = [replay(creep(s, per_minute, learn), until, learn, rate, window).lead() for s in seeds]
        rows.append((f"creep +{per_minute:.0%}/min: lead time", _median(leads)))
    leads = [replay(errors(s, learn), learn + 2400, learn, rate, window).lead() for s in seeds]
    rows.append(("errors 1% -> 100% in 30 min: lead time", _median(leads)))
    flaps = [replay(flap(s, learn), learn + 2 * HOUR, learn, rate, window) for s in seeds]
    rows.append(("flap 2 min down / 3 min up: lead time", _median([o.lead() for o in flaps])))
    rows.append(("flap: trend changes per hour while flapping",
                 f"{statistics.median((o.changes - 1) / 2 for o in flaps):.1f}"))
    quiet = [replay(noisy(s), 24 * HOUR, 0.0, rate, window) for s in seeds]
    learnt = [[e for e in o.entries if e >= window] for o in quiet]  # once the baseline is full
    rows.append(("noisy healthy: false alarms per hour",
                 f"{statistics.median(len(e) / (24 * HOUR - window) * HOUR for e in learnt):.3f}"))
    rows.append(("noisy healthy: alarms lasting 5 min per hour",
                 f"{statistics.median(o.long_alarms(24 * HOUR) / 24 for o in quiet):.3f}"))
    return rows


def cost(repeat: int, rate: float) -> list[tuple[str, str]]:
    rng = random.Random(1)
    samples = [40.0 * math.exp(rng.gauss(0, 0.3)) for _ in range(10_000)]
    n = 200_000
    per_update = []
    for _ in range(repeat):
        p = HealthPredictor(["m"])
        t, gap = 0.0, 1 / rate
        started = time.perf_counter_ns()
        for i in range(n):
            p.observe("m", CALL, t, samples[i % 10_000])
            t += gap
        per_update.append((time.perf_counter_ns() - started) / n / 1000)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    modules = [f"m{i}" for i in range(1000)]
    p = HealthPredictor(modules)
    for i in range(20):  # the arrays are allocated whole up front; samples only fill them
        for name in modules:
            p.observe(name, CALL, i * p.bucket, 40.0)
            p.observe(name, CHECK, i * p.bucket, 2.0)
    per_module = (tracemalloc.get_traced_memory()[0] - before) / len(modules)
    tracemalloc.stop()
    return [(f"CPU per update at {rate:g} calls/s (median of {repeat})", f"{statistics.median(per_update):.2f} µs"),
            ("bytes per module (tracemalloc, 1,000 modules)", f"{per_module:,.0f} B")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--windows", default=str(prediction.DEFAULT_WINDOW), help="seconds, comma separated")
    ap.add_argument("--rate", type=float, default=1.0, help="calls a second")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--enter", type=float, default=prediction.ENTER,
                    help="score that enters degrading (leaving: half of it), to compare thresholds")
    args = ap.parse_args()
    prediction.ENTER, prediction.LEAVE = args.enter, args.enter / 2
    seeds = list(range(1, args.seeds + 1))
    for window in (float(w) for w in args.windows.split(",")):
        print(f"\nwindow {window:g} s, enter at {args.enter:g}, {args.rate:g} calls/s, {len(seeds)} seeds (medians)")
        for name, value in evaluate(window, seeds, args.rate):
            print(f"  {name:<50} {value}")
    print()
    for name, value in cost(args.repeat, 100.0) + cost(args.repeat, args.rate)[:1]:
        print(f"  {name:<50} {value}")


if __name__ == "__main__":
    main()
