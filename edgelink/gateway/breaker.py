"""Circuit breaker: one per module, a small pure state machine driven by a clock.

Rules it keeps (API.md §2):

1. **closed** lets every call through and counts consecutive failures; a success resets
   the count. The failure that brings the count to the threshold opens the breaker.
2. **open** refuses every call at once. Once the recovery time has passed since it
   opened, it is half-open.
3. **half_open** lets exactly one trial call through at a time. The trial's success
   closes the breaker (count reset); its failure opens it again and restarts the timer.
   A trial that ends with no verdict (its caller was cancelled) frees the slot for the
   next caller.

Theory of operation
-------------------

Internally half-open is two states: ``HALF_OPEN`` (waiting for a trial) and ``TRIAL``
(the trial is in flight, everyone else is refused); both are reported as ``half_open``.
So "one trial at a time" is not a flag to keep in sync: only ``HALF_OPEN`` admits, and
admitting moves it to ``TRIAL``.

Every transition lives in ``TRANSITIONS`` (state × event -> state). Guards that need
numbers (has the threshold been reached? has the recovery time passed?) only choose
which event to fire; they never set the state themselves.

``allow()`` returns a ticket, the breaker's epoch, which is bumped on every change of
state. A verdict reported with an older ticket belongs to a call admitted before the
breaker changed its mind (say, a slow call started while closed that fails after the
breaker opened) and is ignored: it must neither count twice nor pass for the trial.

Two clocks: ``now`` (monotonic) times the recovery, so that a wall-clock step (NTP
setting the time on a board without an RTC) cannot open or close anything; ``wall``
only stamps ``last_failure`` for the status page.
"""

from __future__ import annotations

import time
from typing import Any, Callable

# States. TRIAL is half-open with its one trial call in flight.
CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"
TRIAL = "trial"

# Events.
ADMIT = "admit"  # a call is let through
SUCCESS = "success"  # an admitted call worked
FAILURE = "failure"  # an admitted call failed, below the threshold
TRIP = "trip"  # an admitted call failed and consecutive failures reached the threshold
COOLED = "cooled"  # the recovery time has passed since the breaker opened
ABANDON = "abandon"  # an admitted call ended without a verdict

TRANSITIONS: dict[tuple[str, str], str] = {
    (CLOSED, ADMIT): CLOSED,
    (CLOSED, SUCCESS): CLOSED,
    (CLOSED, FAILURE): CLOSED,
    (CLOSED, TRIP): OPEN,
    (CLOSED, ABANDON): CLOSED,
    (OPEN, COOLED): HALF_OPEN,
    (HALF_OPEN, ADMIT): TRIAL,
    (TRIAL, SUCCESS): CLOSED,
    # The count only resets on closing, so a trial's failure is always past the threshold.
    (TRIAL, TRIP): OPEN,
    (TRIAL, ABANDON): HALF_OPEN,
}

ADMITTING = frozenset({CLOSED, HALF_OPEN})

# What the status page calls each state.
REPORTED = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half_open", TRIAL: "half_open"}


class Breaker:
    """``ticket = allow()``; ``None`` means refused. Report the call's outcome with
    ``record_success(ticket)``, ``record_failure(ticket)``, or ``release(ticket)`` when it
    ended without a verdict."""

    __slots__ = ("threshold", "recovery", "_now", "_wall", "_state", "_epoch",
                 "_failures", "_opened_at", "_last_failure", "_on_change")

    def __init__(self, threshold: int, recovery: float, *,
                 now: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 on_change: Callable[[str, str], None] | None = None):
        """``on_change(old, new)``, if given, is told every change of the reported state."""
        self.threshold = threshold
        self.recovery = recovery
        self._now = now
        self._wall = wall
        self._on_change = on_change
        self._state = CLOSED
        self._epoch = 0
        self._failures = 0
        self._opened_at = 0.0
        self._last_failure: float | None = None

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half_open``."""
        self._cool()
        return REPORTED[self._state]

    def allow(self) -> int | None:
        """A ticket if the call may go ahead, else ``None`` (fail fast)."""
        self._cool()
        if self._state not in ADMITTING:
            return None
        self._fire(ADMIT)
        return self._epoch

    def record_success(self, ticket: int) -> None:
        if ticket != self._epoch:
            return
        self._failures = 0
        self._fire(SUCCESS)

    def record_failure(self, ticket: int) -> None:
        if ticket != self._epoch:
            return
        self._failures += 1
        self._last_failure = self._wall()
        self._fire(TRIP if self._failures >= self.threshold else FAILURE)

    def release(self, ticket: int) -> None:
        if ticket == self._epoch:
            self._fire(ABANDON)

    def snapshot(self) -> dict[str, Any]:
        """``{"state", "failure_count", "last_failure"}`` (epoch seconds or ``None``)."""
        return {"state": self.state, "failure_count": self._failures, "last_failure": self._last_failure}

    def _cool(self) -> None:
        if self._state == OPEN and self._now() - self._opened_at >= self.recovery:
            self._fire(COOLED)

    def _fire(self, event: str) -> None:
        old, new = self._state, TRANSITIONS[self._state, event]
        if new != old:
            self._state = new
            self._epoch += 1
            if new == OPEN:
                self._opened_at = self._now()
            if self._on_change is not None and REPORTED[new] != REPORTED[old]:
                self._on_change(REPORTED[old], REPORTED[new])
