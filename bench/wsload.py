"""WebSocket figures: an ``Audience`` of ``/ws`` clients counting broadcast frames, the fan-out
rate to 200 clients, and the hold of 1,000 clients while events flow.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from . import BenchError
from .events import Poster
from .plan import Plan
from .proc import RssSampler
from .wsclient import CountingClient


class Audience:
    """Clients connected to one ``/ws`` URL; ``received`` counts frames after the control frame."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._clients: list[CountingClient] = []
        self._target: float = math.inf
        self._reached = asyncio.Event()
        self.received = 0

    @property
    def lost(self) -> int:
        """Clients whose connection ended before we closed it."""
        return sum(client.lost for client in self._clients)

    async def __aenter__(self) -> Audience:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(client.close() for client in self._clients))

    def _count(self) -> None:
        self.received += 1
        if self.received >= self._target:
            self._reached.set()

    async def connect(self, count: int, concurrency: int) -> None:
        """Open ``count`` clients, at most ``concurrency`` handshakes at a time; each must get
        the ``connected`` control frame first."""
        gate = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with gate:
                client, first = await CountingClient.connect(self._url, self._count)
                self._clients.append(client)
                if first.get("channel") != "control" or first.get("type") != "connected":
                    raise BenchError(f"first /ws frame is not the control frame: {first}")

        # Let every handshake finish before failing, so that __aexit__ closes all opened clients.
        outcomes = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def wait_for(self, total: int, timeout: float) -> bool:
        """Wait until ``received`` reaches ``total``; False if ``timeout`` passes first."""
        self._target = total
        if self.received >= total:
            return True
        self._reached.clear()
        try:
            await asyncio.wait_for(self._reached.wait(), timeout)
        except TimeoutError:
            return False
        return True


async def fanout(ws_url: str, poster: Poster, plan: Plan) -> dict[str, Any]:
    """Frames delivered per second: ``fanout_events`` broadcasts to ``fanout_clients`` clients,
    timed from the first POST until every client has every frame."""
    clients, events = plan.fanout_clients, plan.fanout_events
    async with Audience(ws_url) as audience:
        await audience.connect(clients, plan.connect_concurrency)
        started = time.perf_counter()
        delivery = asyncio.create_task(audience.wait_for(clients * events, plan.delivery_timeout))
        try:
            await poster.post_many(events)
            posted = time.perf_counter() - started
            complete = await delivery
        finally:
            delivery.cancel()  # only matters when a POST failed
        seconds = time.perf_counter() - started
    return {"clients": clients, "events": events, "expected_frames": clients * events,
            "frames": audience.received, "post_seconds": posted, "seconds": seconds,
            "frames_per_s": audience.received / seconds,
            "complete": complete, "lost_clients": audience.lost}


async def hold(ws_url: str, poster: Poster, sampler: RssSampler, plan: Plan) -> dict[str, Any]:
    """Peak RSS from before the first of ``hold_clients`` clients connects until every broadcast
    (``hold_rate`` events/s for ``duration`` seconds) has reached them all."""
    clients = plan.hold_clients
    since = time.monotonic()  # the window opens before the first client connects
    async with Audience(ws_url) as audience:
        await audience.connect(clients, plan.connect_concurrency)
        posted = await poster.post_paced(plan.hold_rate, plan.duration)
        complete = await audience.wait_for(clients * posted, plan.delivery_timeout)
        rss = sampler.peak(since)
    return {"clients": clients, "events": posted, "expected_frames": clients * posted,
            "frames": audience.received, "complete": complete, "lost_clients": audience.lost,
            "rss_peak_bytes": rss}
