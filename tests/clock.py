"""The clock unit tests hand to code that takes ``now``: it moves only when told to."""

from __future__ import annotations

T0 = 1_700_000_000.0  # seconds: a plausible Unix time


class Clock:
    """``clock()`` reads it, ``advance(s)`` or ``clock.t = ...`` moves it; ``wall()`` is a
    wall clock ``wall_offset`` ahead of it, for code that takes a monotonic and a wall clock."""

    def __init__(self, t: float = T0, wall_offset: float = 0.0) -> None:
        self.t = t
        self.wall_offset = wall_offset

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds

    def wall(self) -> float:
        return self.wall_offset + self.t
