"""Health prediction (API.md §11), the pure estimator on generated series: the clock is a
parameter, so hours of samples take milliseconds and nothing sleeps."""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import Gateway, log_records, module_env, start_gateway
from edgelink.gateway.prediction import (
    CALL,
    CHECK,
    DEFAULT_WINDOW,
    DEGRADING,
    LEAVE,
    MIN_BASELINE,
    RECOVERING,
    STABLE,
    UNKNOWN,
    HealthPredictor,
)
from fakemodule import HEALTHY, FakeModule

WINDOW = 1200.0  # 10 s steps, buckets of 0.83 s
GAP = 0.5  # seconds between calls


class Run:
    """A predictor for module ``m`` that records every change of trend."""

    def __init__(self, window: float = WINDOW):
        self.changes: list[tuple[str, str, float]] = []
        self.p = HealthPredictor(["m"], window, on_change=lambda name, before, after, score:
                                 self.changes.append((before, after, score)))
        self.t = 0.0

    def feed(self, seconds: float, latency, channel: int = CALL, gap: float = GAP) -> None:
        """Samples every ``gap`` s for ``seconds``; ``latency(t)`` gives ms, or None for a failure."""
        end = self.t + seconds
        while self.t < end:
            self.p.observe("m", channel, self.t, latency(self.t))
            self.t += gap

    def entered(self) -> list[float]:
        return [score for before, after, score in self.changes if after == DEGRADING and before != DEGRADING]


def noisy(seed: int, base: float = 40.0, sigma: float = 0.25):
    rng = random.Random(seed)
    return lambda t: base * math.exp(rng.gauss(0, sigma))


def test_unknown_until_enough_samples_then_stable() -> None:
    run = Run()
    assert run.p.trend("m") == UNKNOWN and run.p.score("m") == 0
    run.feed(run.p.step * (MIN_BASELINE - 2), noisy(1))
    assert run.p.trend("m") == UNKNOWN
    run.feed(WINDOW, noisy(2))
    assert run.p.trend("m") == STABLE
    assert 0 <= run.p.score("m") < 2
    assert run.changes == [(UNKNOWN, STABLE, run.changes[0][2])]
    assert run.p.trend("other") == UNKNOWN  # not a module: nothing, no error
    run.p.observe("other", CALL, run.t, 1.0)


def test_latency_creeping_up_is_degrading_long_before_it_times_out() -> None:
    run = Run(DEFAULT_WINDOW)  # a short window moves with a slow creep (bench/README.md)
    healthy = noisy(3)
    run.feed(DEFAULT_WINDOW, healthy)
    assert run.p.trend("m") == STABLE
    start = run.t
    rate = 0.03 / 60  # +3 % a minute, compounding

    def creeping(t: float) -> float:
        return healthy(t) * math.exp(rate * (t - start))

    # 40 ms growing 3 %/min reaches a 2 s timeout after ln(50)/ln(1.03) = 132 minutes
    while run.p.trend("m") != DEGRADING and run.t - start < 132 * 60:
        run.feed(10, creeping)
    took = run.t - start
    assert run.p.trend("m") == DEGRADING
    assert took < 60 * 60, f"degrading only after {took / 60:.0f} min"
    assert len(run.entered()) == 1 and run.entered()[0] >= 4


def test_noisy_healthy_module_with_rare_spikes_stays_quiet() -> None:
    run = Run()
    rng = random.Random(4)
    base = noisy(5, sigma=0.35)

    def spiky(t: float) -> float:
        return base(t) * (30 if rng.random() < 0.005 else 1)

    run.feed(6 * 3600, spiky)  # six hours, 43,200 calls
    assert run.p.trend("m") == STABLE
    assert run.entered() == []


def test_error_rate_rising_is_degrading() -> None:
    run = Run()
    rng = random.Random(6)
    healthy = noisy(7)
    # ten calls a second, 1 % of them failing, then up to 60 % over ten minutes
    run.feed(WINDOW, lambda t: None if rng.random() < 0.01 else healthy(t), gap=0.1)
    assert run.p.trend("m") == STABLE
    start = run.t
    run.feed(600, lambda t: None if rng.random() < 0.01 + 0.6 * (t - start) / 600 else healthy(t), gap=0.1)
    assert run.p.trend("m") == DEGRADING


def test_recovery_is_reported_once_each_way() -> None:
    run = Run()
    run.feed(WINDOW, noisy(8))
    run.feed(120, noisy(9, base=400))  # ten times slower for two minutes
    assert run.p.trend("m") == DEGRADING
    run.feed(4, noisy(10))
    assert run.p.trend("m") == RECOVERING
    run.feed(120, noisy(11))
    assert run.p.trend("m") == STABLE
    assert [(b, a) for b, a, _ in run.changes] == [(UNKNOWN, STABLE), (STABLE, DEGRADING),
                                                  (DEGRADING, RECOVERING), (RECOVERING, STABLE)]


def test_probes_alone_judge_a_module_and_failing_probes_degrade_it() -> None:
    run = Run()
    run.feed(WINDOW, noisy(12, base=2), channel=CHECK, gap=5)
    assert run.p.trend("m") == STABLE
    run.feed(60, lambda t: None, channel=CHECK, gap=5)
    assert run.p.trend("m") == DEGRADING


def test_a_lasting_change_is_learned_within_the_window() -> None:
    run = Run()
    run.feed(WINDOW, noisy(13))
    run.feed(WINDOW, noisy(14, base=120))  # the module moved to a slower box for good
    assert run.p.trend("m") == STABLE
    assert run.entered() != []


def test_tick_closes_the_bucket_of_a_module_that_went_quiet() -> None:
    run = Run()
    run.feed(WINDOW, noisy(15))
    start = (run.t // run.p.bucket + 1.1) * run.p.bucket  # well inside the next bucket
    run.p.observe("m", CALL, start, None)  # closes the last healthy bucket, opens that one
    healthy = run.p.score("m")
    for i in range(1, 10):  # ten failures in that bucket, then nothing more
        run.p.observe("m", CALL, last := start + i / 1000, None)
    assert run.p.score("m") == healthy  # the bucket is still open
    run.p.tick(last + run.p.bucket / 100)  # not over yet
    assert run.p.score("m") == healthy
    run.p.tick(last + run.p.bucket)
    assert run.p.score("m") >= 4 and run.p.trend("m") == DEGRADING


def test_retain_follows_a_new_module_list() -> None:
    run = Run()
    run.feed(WINDOW, noisy(18))
    run.p.retain(["m", "new"])
    assert (run.p.trend("m"), run.p.trend("new")) == (STABLE, UNKNOWN)  # what m learnt is kept
    run.p.retain(["new"])
    assert run.p.modules() == ["new"] and run.p.trend("m") == UNKNOWN


def _state_bytes(p: HealthPredictor) -> int:
    total = 0
    for m in p._modules.values():
        for c in m.channels:
            total += sum(sys.getsizeof(getattr(c, name)) for name in c.__slots__)
    return total


@pytest.mark.parametrize("calls", [1_000, 50_000])
def test_state_is_bounded_in_bytes(calls: int) -> None:
    run = Run()
    before = _state_bytes(run.p)
    run.feed(calls * 0.05, noisy(17), gap=0.05)
    assert _state_bytes(run.p) == before


# --- over the real process ---------------------------------------------------------------


def _status(gw: Gateway, module: str) -> dict:
    return gw.get("/vx11/status", token=False).json()["modules"][module]


def call_until(gw: Gateway, module: str, wanted: set[str], limit: float = 120) -> dict:
    """Call the ``task`` intent (madre) until the module's trend is one of ``wanted``."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        for _ in range(5):
            assert gw.post("/vx11/intent/task", {"task": "x"}).status == 200
        health = _status(gw, module)
        if health["trend"] in wanted:
            return health
    raise AssertionError(f"{module} never became {wanted}: {health}")


def _trend_lines(gw: Gateway) -> list[tuple[str, str]]:
    return [(r["before"], r["after"]) for r in log_records(gw.log_path) if r.get("event") == "module_trend_changed"]


def creep_until_degrading(gw: Gateway, madre: FakeModule) -> dict:
    """Slow madre's task calls down a little more every few calls until the gateway calls it
    degrading; its ModuleHealth then."""
    delay = 0.001
    deadline = time.monotonic() + 120
    while (health := _status(gw, "madre"))["trend"] != "degrading":
        assert time.monotonic() < deadline, health
        madre.behave("/madre/task", HEALTHY, delay=delay)
        for _ in range(3):
            assert gw.post("/vx11/intent/task", {"task": "x"}).status == 200
        delay = min(delay * 1.2, 1.0)  # creeping; the route's timeout is 30 s
    return health


def start_predicting(tmp_path: Path, madre: FakeModule) -> Gateway:
    """A gateway in front of ``madre`` whose baseline spans 2 min instead of 2 h, so a test can
    watch it learn and judge (a channel that saw nothing for 4 s, 4 steps, no longer counts)."""
    return start_gateway(tmp_path, {**module_env({"madre": madre}), "EDGELINK_PREDICTION_WINDOW": "120",
                                    "EDGELINK_PROBE_INTERVAL": "0.5"})


def test_a_module_whose_latency_creeps_up_is_degrading_before_its_breaker_opens(tmp_path: Path) -> None:
    with FakeModule("madre") as madre:
        gw = start_predicting(tmp_path, madre)
        try:
            health = _status(gw, "madre")
            assert (health["trend"], health["anomaly_score"]) == ("unknown", 0)
            call_until(gw, "madre", {"stable"})
            assert _trend_lines(gw) == []  # unknown -> stable is not news

            health = creep_until_degrading(gw, madre)
            assert health["anomaly_score"] >= LEAVE  # entered at ENTER; it stays degrading down to LEAVE
            breaker = gw.get("/vx11/circuit-breaker/status").json()["breakers"]["madre"]
            assert breaker["state"] == "closed" and breaker["failure_count"] == 0  # warned before any failure
            families = {f.name: f for f in text_string_to_metric_families(gw.get("/metrics").body.decode())}
            degrading = {s.labels["module"]: s.value for s in families["edgelink_module_degrading"].samples}
            assert degrading["madre"] == 1 and degrading["switch"] == 0
            scores = {s.labels["module"]: s.value for s in families["edgelink_module_anomaly_score"].samples}
            assert scores["madre"] >= LEAVE
            assert gw.get("/vx11/overview").json()["modules_health"]["madre"]["trend"] == "degrading"

            madre.behave("/madre/task", HEALTHY)  # fast again
            call_until(gw, "madre", {"recovering", "stable"})
            lines = _trend_lines(gw)
            assert lines[0] == ("stable", "degrading") and lines.count(("stable", "degrading")) == 1
            assert [after for before, after in lines if before == "degrading"] in (["recovering"], ["stable"])
        finally:
            gw.stop()
