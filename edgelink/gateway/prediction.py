"""Health prediction (API.md §11): per module, a robust baseline of latency and error rate,
an anomaly score and a trend. Pure: samples and the clock come in, values go out; no task,
no I/O, and a fixed number of bytes per module.

Theory of operation
-------------------
Each module has two channels, its health checks and the live calls the gateway forwards
to it (a ``/health`` and a chat call have different latencies: one baseline for both would
be wide and blind). A channel gathers samples into **buckets** of ``bucket`` seconds: a
count, a failure count and the newest ``BUCKET_SAMPLES`` latencies. When a bucket closes it
becomes one value, the log of its median latency (latency is multiplicative: +20 % is the
same step at 5 ms and at 5 s), pushed into the **recent** ring (the last ``RECENT`` buckets
that saw a sample). A bucket leaving the recent ring enters the **baseline** ring
(``BASELINE`` entries), at most one every ``step`` seconds, so the baseline spans the whole
prediction window (``EDGELINK_PREDICTION_WINDOW``, 2 h by default) however busy the module
is. Its failures feed an error rate that decays with a time constant of the window.

Scores, in standard deviations of the baseline (0 = as usual; never negative: faster or
cleaner than usual is no anomaly):

- latency: ``(median(recent) - median(baseline)) / spread``, where ``spread`` is the noise
  of the baseline from one entry to the next (the median of their successive differences,
  scaled to a standard deviation), at least ``MIN_SPREAD`` (a 15 % step) so a very steady
  module is not flagged for a few percent. Not the MAD around the median: a creep across
  the window would widen it and hide itself (bench/README.md, "Health prediction");
- errors: the recent failure rate against the baseline's, in binomial standard errors plus
  ``ERROR_SLACK`` (so hundreds of calls a second do not make 1 % more failures an alarm).

A channel's score is the larger of the two; the module's ``anomaly_score`` is the larger
of its channels' (a channel that saw nothing for ``STALE_STEPS`` steps does not count).
Why a window of hours and not minutes: a slow creep (a few % a minute) moves a short
baseline along with it, so it never looks unusual; a baseline half the window behind
sees it (bench/prediction.py measures the lead time and the false alarms; bench/README.md).

Trend, per module, re-judged whenever one of its buckets closes:
``unknown`` until a channel has ``MIN_BASELINE`` baseline entries; ``degrading`` once the
score reaches ``ENTER``; from degrading, ``recovering`` once it falls under ``LEAVE``;
``stable`` after ``RECENT`` judgements in a row under ``LEAVE`` (back to degrading at
``ENTER``). ``on_change(module, before, after, score)`` is told of every change of trend.
"""

from __future__ import annotations

import math
from array import array
from typing import Callable

STABLE, DEGRADING, RECOVERING, UNKNOWN = "stable", "degrading", "recovering", "unknown"
TRENDS = (STABLE, DEGRADING, RECOVERING, UNKNOWN)

CHECK, CALL = 0, 1  # channels: recorded health checks, forwarded calls
DEFAULT_WINDOW = 7200.0  # seconds the baseline spans
BASELINE = 120  # baseline entries: one per step (window / BASELINE)
BUCKETS_PER_STEP = 12  # bucket = step / 12 (5 s with the default window)
BUCKET_SAMPLES = 16  # latencies a bucket keeps (the newest) for its median
RECENT = 6  # buckets the recent level is the median of
MIN_BASELINE = 8  # baseline entries before a verdict
STALE_STEPS = 4  # a channel silent this many steps does not count
ENTER = 4.0  # score that enters degrading
LEAVE = 2.0  # score under which degrading ends
MIN_SPREAD = math.log(1.15)  # the smallest latency spread (log): a 15 % step
ERROR_SLACK = 0.05  # added to the error rate's standard error
ERROR_FLOOR = 0.01  # the baseline error rate assumed at least, for the standard error
DIFF_SCALE = 1 / (0.6745 * math.sqrt(2))  # median |x[i+1] - x[i]| -> standard deviation, normal noise
NAN = float("nan")


def _median(values: list[float]) -> float:
    values.sort()
    n = len(values)
    mid = n // 2
    return values[mid] if n % 2 else (values[mid - 1] + values[mid]) / 2


class _Channel:
    """One stream of samples (health checks or calls) of one module: fixed-size arrays only."""

    __slots__ = ("bucket_end", "n", "errors", "lat", "lat_n", "recent", "recent_n", "recent_err", "recent_len",
                 "recent_pos", "base", "base_len", "base_pos", "last_admit", "base_calls", "base_errors",
                 "last_seen", "score")

    def __init__(self) -> None:
        self.bucket_end = -math.inf  # the open bucket ends here; -inf: none open
        self.n = self.errors = 0  # samples and failures in the open bucket
        self.lat = array("d", bytes(8 * BUCKET_SAMPLES))  # its newest latencies (ring)
        self.lat_n = 0  # latencies it got (the ring holds the newest BUCKET_SAMPLES)
        self.recent = array("d", bytes(8 * RECENT))  # log median latency per closed bucket (NaN: none)
        self.recent_n = array("d", bytes(8 * RECENT))  # samples per closed bucket
        self.recent_err = array("d", bytes(8 * RECENT))  # failures per closed bucket
        self.recent_len = self.recent_pos = 0
        self.base = array("d", bytes(8 * BASELINE))  # log median latencies admitted to the baseline
        self.base_len = self.base_pos = 0
        self.last_admit = -math.inf
        self.base_calls = self.base_errors = 0.0  # decayed sample and failure counts
        self.last_seen = -math.inf
        self.score = 0.0

    def add(self, latency_ms: float | None) -> None:
        self.n += 1
        if latency_ms is None:
            self.errors += 1
        else:
            self.lat[self.lat_n % BUCKET_SAMPLES] = latency_ms
            self.lat_n += 1

    def close(self, now: float, step: float, decay: float) -> None:
        """Fold the open bucket into the recent ring (and the oldest recent one into the baseline)."""
        kept = min(self.lat_n, BUCKET_SAMPLES)
        level = math.log(max(_median(list(self.lat[:kept])), 1e-3)) if kept else NAN
        i = self.recent_pos
        if self.recent_len == RECENT:  # the oldest recent bucket leaves for the baseline
            self.base_calls = self.base_calls * decay + self.recent_n[i]
            self.base_errors = self.base_errors * decay + self.recent_err[i]
            old = self.recent[i]
            if old == old and now - self.last_admit >= step:  # not NaN, and one per step
                self.base[self.base_pos] = old
                self.base_pos = (self.base_pos + 1) % BASELINE
                self.base_len = min(self.base_len + 1, BASELINE)
                self.last_admit = now
        else:
            self.recent_len += 1
        self.recent[i], self.recent_n[i], self.recent_err[i] = level, self.n, self.errors
        self.recent_pos = (i + 1) % RECENT
        self.n = self.errors = self.lat_n = 0
        self.last_seen = now
        self.score = self._score()

    def _score(self) -> float:
        if self.base_len < MIN_BASELINE:
            return 0.0
        base = list(self.base[:self.base_len])
        if self.base_len == BASELINE:  # oldest first
            base = base[self.base_pos:] + base[:self.base_pos]
        # the noise from one entry to the next: a slow trend across the window does not widen it
        spread = max(DIFF_SCALE * _median([abs(b - a) for a, b in zip(base, base[1:])]), MIN_SPREAD)
        centre = _median(base)
        levels = [v for v in self.recent[:self.recent_len] if v == v]
        latency = (_median(levels) - centre) / spread if levels else 0.0
        n = sum(self.recent_n[:self.recent_len])
        rate = self.base_errors / self.base_calls if self.base_calls else 0.0
        p0 = max(rate, ERROR_FLOOR)
        errors = (sum(self.recent_err[:self.recent_len]) / n - rate) / (math.sqrt(p0 * (1 - p0) / n) + ERROR_SLACK) \
            if n else 0.0
        return max(latency, errors, 0.0)

    @property
    def known(self) -> bool:
        return self.base_len >= MIN_BASELINE


class _Module:
    __slots__ = ("channels", "trend", "score", "calm")

    def __init__(self) -> None:
        self.channels = (_Channel(), _Channel())
        self.trend = UNKNOWN
        self.score = 0.0
        self.calm = 0  # judgements in a row under LEAVE while recovering


class HealthPredictor:
    """``observe(module, channel, now, latency_ms)`` (``None`` for a failure), ``tick(now)``
    to close buckets that are due, ``trend(module)`` and ``score(module)`` to read."""

    def __init__(self, modules: list[str] | tuple[str, ...], window: float = DEFAULT_WINDOW,
                 on_change: Callable[[str, str, str, float], None] | None = None):
        self.step = window / BASELINE
        self.bucket = self.step / BUCKETS_PER_STEP
        self._decay = math.exp(-self.bucket / window)
        self._on_change = on_change
        self._modules = {name: _Module() for name in modules}

    def observe(self, module: str, channel: int, now: float, latency_ms: float | None) -> None:
        m = self._modules.get(module)
        if m is None:
            return
        c = m.channels[channel]
        if now >= c.bucket_end:
            if c.n:
                self._close(module, m, c, c.bucket_end)
            c.bucket_end = (now // self.bucket + 1) * self.bucket
        c.add(latency_ms)

    def tick(self, now: float) -> None:
        """Close every bucket whose time is over (a module that went quiet is judged too)."""
        for name, m in self._modules.items():
            for c in m.channels:
                if c.n and now >= c.bucket_end:
                    self._close(name, m, c, c.bucket_end)

    def trend(self, module: str) -> str:
        m = self._modules.get(module)
        return UNKNOWN if m is None else m.trend

    def score(self, module: str) -> float:
        m = self._modules.get(module)
        return 0.0 if m is None else round(m.score, 2)

    def modules(self) -> list[str]:
        return list(self._modules)

    def retain(self, modules: list[str] | tuple[str, ...]) -> None:
        """Follow exactly ``modules`` (after a reload): new ones start unknown, the others keep
        what they learnt, gone ones are forgotten."""
        self._modules = {name: self._modules.get(name) or _Module() for name in modules}

    def _close(self, name: str, m: _Module, c: _Channel, at: float) -> None:
        c.close(at, self.step, self._decay)
        live = [ch for ch in m.channels if ch.known and at - ch.last_seen < STALE_STEPS * self.step]
        if not live:  # nothing to judge by now: the last verdict stands
            return
        m.score = max(ch.score for ch in live)
        before = m.trend
        if m.score >= ENTER:
            after = DEGRADING
        elif before == DEGRADING:
            after = RECOVERING if m.score < LEAVE else DEGRADING
        elif before == RECOVERING:
            m.calm = m.calm + 1 if m.score < LEAVE else 0
            after = STABLE if m.calm >= RECENT else RECOVERING
        else:
            after = STABLE
        if after != RECOVERING:
            m.calm = 0
        if after != before:
            m.trend = after
            if self._on_change is not None:
                self._on_change(name, before, after, round(m.score, 2))
