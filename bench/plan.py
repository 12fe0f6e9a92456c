"""How long and how hard each figure is measured: the full run, the ``--smoke`` run, ``--duration``."""

from __future__ import annotations

from dataclasses import dataclass, replace

FULL_DURATION = 10.0
SMOKE_DURATION = 3.0


@dataclass(frozen=True)
class Plan:
    duration: float                    # seconds of wrk load per HTTP figure, and of the 1,000-client phase
    passes: int = 3                    # each HTTP figure is the median of this many runs (interleaved)
    connections: int = 50              # wrk connections for GET /health and POST /events/ingest
    status_connections: int = 10       # wrk connections for GET /vx11/status (each call fans out to 9 modules)
    # Paced runs: the same 50 connections, each waiting a random think time (exponential, mean
    # connections / rate) after every answer, so that about `rate` requests per second are
    # offered in all instead of as many as the server can take (see bench/README.md).
    health_paced_rate: float = 2000.0  # requests/s offered to GET /health
    ingest_paced_rate: float = 1000.0  # events/s offered to POST /events/ingest
    settle: float = 1.0                # seconds of quiet after start-up before RSS idle is read
    fanout_clients: int = 200
    fanout_events_per_second: int = 200  # events posted for the fan-out, per second of `duration`
    hold_clients: int = 1000
    hold_rate: float = 20.0            # broadcast events per second while the 1,000 clients are connected
    post_concurrency: int = 32         # parallel POSTs feeding the fan-out
    connect_concurrency: int = 50      # WebSocket handshakes in flight at once
    delivery_timeout: float = 30.0     # seconds to wait for every broadcast frame to arrive

    @property
    def fanout_events(self) -> int:
        return max(1, round(self.fanout_events_per_second * self.duration))

    def think_ms(self, rate: float) -> float:
        """Mean think time per connection for ``rate`` requests/s offered over ``connections``."""
        return self.connections * 1000.0 / rate

    @classmethod
    def make(cls, *, smoke: bool, duration: float | None, passes: int | None = None) -> Plan:
        plan = cls(duration=SMOKE_DURATION if smoke else FULL_DURATION)
        if duration is not None:
            plan = replace(plan, duration=duration)
        return plan if passes is None else replace(plan, passes=passes)


def rate_label(rate: float) -> str:
    """``1000.0`` -> ``"1k/s"``, ``2500.0`` -> ``"2.5k/s"``, ``300.0`` -> ``"300/s"``."""
    return f"{rate / 1000:g}k/s" if rate >= 1000 else f"{rate:g}/s"
