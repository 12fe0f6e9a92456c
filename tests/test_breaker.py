"""The circuit breaker as a pure state machine, driven by a fake clock."""

from __future__ import annotations

import pytest

from clock import Clock
from edgelink.gateway import breaker as br
from edgelink.gateway.breaker import Breaker

WALL_START = 1_700_000_000.0


@pytest.fixture
def clock() -> Clock:
    return Clock(100.0, wall_offset=WALL_START)


def make(clock: Clock, threshold: int = 3, recovery: float = 60.0) -> Breaker:
    return Breaker(threshold, recovery, now=clock, wall=clock.wall)


def fail(b: Breaker, times: int) -> None:
    for _ in range(times):
        ticket = b.allow()
        assert ticket is not None
        b.record_failure(ticket)


def trip(b: Breaker) -> None:
    fail(b, b.threshold)
    assert b.state == "open"


def test_starts_closed_and_admits_everyone(clock: Clock) -> None:
    b = make(clock)
    assert b.snapshot() == {"state": "closed", "failure_count": 0, "last_failure": None}
    assert all(b.allow() is not None for _ in range(100))


def test_failures_below_threshold_stay_closed_and_success_resets(clock: Clock) -> None:
    b = make(clock)
    fail(b, 2)
    assert b.snapshot()["state"] == "closed"
    assert b.snapshot()["failure_count"] == 2
    b.record_success(b.allow())
    assert b.snapshot()["failure_count"] == 0
    fail(b, 2)  # not consecutive with the first two: still closed
    assert b.state == "closed"


def test_threshold_consecutive_failures_open_and_refuse(clock: Clock) -> None:
    b = make(clock)
    fail(b, 2)
    clock.advance(5)
    fail(b, 1)
    snap = b.snapshot()
    assert snap == {"state": "open", "failure_count": 3, "last_failure": WALL_START + 105.0}
    assert b.allow() is None
    assert b.allow() is None


def test_threshold_is_settable(clock: Clock) -> None:
    b = make(clock, threshold=1)
    fail(b, 1)
    assert b.state == "open"


def test_open_until_recovery_time_then_half_open(clock: Clock) -> None:
    b = make(clock, recovery=60)
    trip(b)
    clock.advance(59.9)
    assert b.allow() is None
    assert b.state == "open"
    clock.advance(0.1)
    assert b.state == "half_open"  # reported even before anyone asks to go through


def test_half_open_admits_exactly_one_trial(clock: Clock) -> None:
    b = make(clock)
    trip(b)
    clock.advance(60)
    trial = b.allow()
    assert trial is not None
    assert [b.allow() for _ in range(10)] == [None] * 10
    assert b.state == "half_open"
    clock.advance(1000)  # time alone does not admit a second trial while one is in flight
    assert b.allow() is None


def test_trial_success_closes_and_resets_count(clock: Clock) -> None:
    b = make(clock)
    trip(b)
    clock.advance(60)
    b.record_success(b.allow())
    assert b.snapshot()["state"] == "closed"
    assert b.snapshot()["failure_count"] == 0
    assert b.allow() is not None and b.allow() is not None
    fail(b, 2)
    assert b.state == "closed"  # a fresh count: two failures are not enough


def test_trial_failure_reopens_and_restarts_timer(clock: Clock) -> None:
    b = make(clock, recovery=60)
    trip(b)
    clock.advance(60)
    trial = b.allow()
    clock.advance(10)
    b.record_failure(trial)
    snap = b.snapshot()
    assert snap["state"] == "open"
    assert snap["failure_count"] == 4
    assert snap["last_failure"] == WALL_START + 100 + 70
    clock.advance(59)
    assert b.allow() is None  # 69 s after the first opening, but only 59 s after the trial failed
    clock.advance(1)
    assert b.allow() is not None


def test_released_trial_frees_the_slot(clock: Clock) -> None:
    b = make(clock)
    trip(b)
    clock.advance(60)
    first = b.allow()
    assert b.allow() is None
    b.release(first)  # e.g. the caller was cancelled: no verdict
    assert b.state == "half_open"
    second = b.allow()
    assert second is not None
    b.record_success(second)
    assert b.state == "closed"


def test_release_while_closed_changes_nothing(clock: Clock) -> None:
    b = make(clock)
    fail(b, 2)
    b.release(b.allow())
    assert b.snapshot()["failure_count"] == 2
    assert b.state == "closed"


def test_stale_verdicts_are_ignored(clock: Clock) -> None:
    b = make(clock)
    slow = b.allow()  # admitted while closed, still running when the breaker opens
    trip(b)
    b.record_success(slow)
    assert b.state == "open"
    clock.advance(60)
    trial = b.allow()
    b.record_success(slow)  # must not pass for the trial
    b.record_failure(slow)
    assert b.state == "half_open"
    assert b.allow() is None
    b.record_success(trial)
    assert b.state == "closed"
    b.record_failure(slow)  # nor count against the closed breaker
    assert b.snapshot()["failure_count"] == 0


def test_late_failures_do_not_restart_the_timer(clock: Clock) -> None:
    b = make(clock, recovery=60)
    slow = [b.allow() for _ in range(3)]
    trip(b)
    clock.advance(30)
    for ticket in slow:
        b.record_failure(ticket)
    clock.advance(30)
    assert b.state == "half_open"


def test_every_transition_is_in_the_table() -> None:
    states = {br.CLOSED, br.OPEN, br.HALF_OPEN, br.TRIAL}
    assert {s for s, _ in br.TRANSITIONS} <= states
    assert set(br.TRANSITIONS.values()) <= states
    assert set(br.REPORTED) == states
    # the only ways out of OPEN and into TRIAL
    assert [k for k, v in br.TRANSITIONS.items() if k[0] == br.OPEN] == [(br.OPEN, br.COOLED)]
    assert [k for k, v in br.TRANSITIONS.items() if v == br.TRIAL] == [(br.HALF_OPEN, br.ADMIT)]
