"""The forwarder: the ledger, after its cursor, in seq order, to a broker (API.md §9).

Rules it keeps
--------------
* At most ``window`` events are past the STORED cursor at any time (in flight, or acked
  but not yet written), so a crash, a lost connection or a lost ack makes at most
  ``window`` events go out twice, and none is skipped.
* The cursor moves only forward, only over a contiguous prefix of acks, and is written to
  the ledger by one write at a time while sending goes on.
* Memory is O(window): the ledger is read in pages bounded by count and bytes (the next
  one read ahead once at most a window of rows is left), whatever the backlog; a backlog
  and live events are one ordered stream.
* Any error (connect, publish, a failed or missing ack) drops the engine; a new one
  connects after a jittered exponential backoff (0.1 s to 30 s) and resumes after the
  cursor, which first takes the acks that connection collected. Ingest never waits on
  any of this: ``wake`` only sets a number and a future.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from ..gateway.metrics import Counter, Gauge, Histogram, Registry
from ..log import log
from .engine import Engine, EngineError, Message, message

if TYPE_CHECKING:
    from ..ledger import Ledger

PAGE_EVENTS = 512  # rows per ledger read
PAGE_BYTES = 1 << 20  # payload+metadata bytes per ledger read: the buffer's bound
IDLE_POLL = 5.0  # seconds idle before re-reading the ledger anyway (a wake-up is the rule)
BACKOFF_MIN, BACKOFF_MAX = 0.1, 30.0
STATES = ("disabled", "connecting", "connected", "backoff")


def type_filter(patterns: tuple[str, ...]) -> Callable[[str], bool] | None:
    """EDGELINK_FORWARD_TYPES: exact types or ``prefix.*``; empty = every type (None)."""
    if not patterns:
        return None
    exact = frozenset(p for p in patterns if not p.endswith(".*"))
    prefixes = tuple(p[:-1] for p in patterns if p.endswith(".*"))
    return lambda t: t in exact or t.startswith(prefixes)


def backoff(failures: int, rng: Callable[[], float]) -> float:
    """Seconds to wait after ``failures`` consecutive failed connections: doubling from
    0.1 s up to 30 s, each drawn in [half, whole] so a fleet does not reconnect in step."""
    ceiling = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** max(0, failures - 1))
    return ceiling * (0.5 + rng() / 2)


class Forwarder:
    def __init__(self, ledger: "Ledger", make_engine: Callable[[], Engine], metrics: Registry, *,
                 engine: str, url: str, edge_id: str, window: int, ack_timeout: float,
                 types: tuple[str, ...] = (), clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, rng: Callable[[], float] = random.random,
                 idle_poll: float = IDLE_POLL):
        self.ledger = ledger
        self.make_engine = make_engine
        self.engine_name, self.url, self.edge_id = engine, url, edge_id
        self.window, self.ack_timeout = window, ack_timeout
        self.wanted = type_filter(types)
        self.clock, self.wall, self.rng, self.idle_poll = clock, wall, rng, idle_poll
        self.state = "connecting"
        self.acked_seq = 0  # the stored cursor
        self.last_seq = 0  # the newest seq in the ledger, as far as we heard
        self.in_flight = 0
        self.last_error: str | None = None
        self.last_ack_at: int | None = None
        self._high_sent = 0  # highest seq sent by this process: a lower one is a resend
        self._wakeup: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self.forwarded = metrics.add(Counter("edgelink_forward_forwarded_total", "Events published to the broker"))
        self.acked = metrics.add(Counter("edgelink_forward_acked_total", "Events the broker acknowledged"))
        self.resent = metrics.add(Counter("edgelink_forward_resent_total", "Events published again after a loss"))
        self.reconnects = metrics.add(Counter("edgelink_forward_reconnects_total", "Broker connections lost"))
        self.ack_latency = metrics.add(Histogram("edgelink_forward_ack_latency_seconds",
                                                 "Time from publish to the broker's ack"))
        self.dropped = metrics.add(Counter("edgelink_forward_dropped_total",
                                           "Unforwarded events pruned at the ledger byte bound"))
        metrics.add(Gauge("edgelink_forward_backlog", "Events not yet acknowledged by the broker",
                          read=lambda: {(): self.backlog}))
        metrics.add(Gauge("edgelink_forward_state", "Forwarder state (1 for the current one)", ("state",),
                          read=lambda: {(s,): float(s == self.state) for s in STATES}))
        self._skips: set[asyncio.Task[int]] = set()  # cursor writes past dropped events
        for counter in (self.forwarded, self.acked, self.resent, self.reconnects, self.dropped):
            counter.inc(amount=0)  # the series exist from the start

    @property
    def backlog(self) -> int:
        return max(0, self.last_seq - self.acked_seq)

    # --- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        self.ledger.forwarding = True  # retention keeps what the stored cursor has not passed
        self.acked_seq = await self.ledger.forward_cursor()
        self.ledger.on_forced_drop = self._forced_drop
        self.last_seq = await self.ledger.last_seq()
        self._task = asyncio.create_task(self._run(), name="forwarder")
        log.info("forward_started", engine=self.engine_name, url=self.url, edge_id=self.edge_id,
                 epoch=self.ledger.epoch, acked_seq=self.acked_seq, last_seq=self.last_seq, window=self.window)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await asyncio.gather(*self._skips, return_exceptions=True)
        self.ledger.on_forced_drop = None

    def _forced_drop(self, dropped: int, unforwarded: int, last_seq: int) -> None:
        """The ledger's byte bound (drop_oldest) deleted ``unforwarded`` events not yet
        forwarded, up to ``last_seq``: they are lost to the broker, so the cursor moves past
        them (the pump takes the stored value at its next cursor write)."""
        if not unforwarded:
            return
        self.dropped.inc(amount=unforwarded)
        task = asyncio.get_running_loop().create_task(self.ledger.store_forward_cursor(last_seq))
        self._skips.add(task)
        task.add_done_callback(self._skip_done)

    def _skip_done(self, task: asyncio.Task[int]) -> None:
        self._skips.discard(task)
        if task.cancelled():
            return
        if task.exception() is not None:
            log.error("forward_cursor_write_failed", error=repr(task.exception()))
        else:  # dropped events are no backlog, also while no connection runs a pump
            self.acked_seq = max(self.acked_seq, task.result())

    def wake(self, seq: int) -> None:
        """A new event was committed (called on the ingest path: O(1), never waits)."""
        if seq > self.last_seq:
            self.last_seq = seq
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def status(self) -> dict[str, Any]:
        return {"enabled": True, "engine": self.engine_name, "url": self.url, "edge_id": self.edge_id,
                "epoch": self.ledger.epoch, "state": self.state, "acked_seq": self.acked_seq,
                "last_seq": self.last_seq, "backlog": self.backlog, "in_flight": self.in_flight,
                "last_error": self.last_error, "last_ack_at": self.last_ack_at,
                "dropped": int(self.dropped.values.get((), 0))}

    # --- the loop ---------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        connected_before = False
        while True:
            engine = self.make_engine()
            self.state = "connecting"
            progressed = False
            try:
                await engine.connect(self.edge_id, self.ack_timeout)
                self.state = "connected"
                log.info("forward_connected", engine=self.engine_name, url=self.url, acked_seq=self.acked_seq)
                if connected_before:
                    self.reconnects.inc()
                connected_before = True
                before = self.acked_seq
                try:
                    await self._pump(engine)
                finally:
                    progressed = self.acked_seq > before
            except EngineError as exc:
                self.last_error = str(exc)
                log.warning("forward_error", kind=exc.kind, error=str(exc), url=self.url, acked_seq=self.acked_seq)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a ledger error: log it and retry like a broker error
                self.last_error = repr(exc)
                log.error("forward_failed", error=repr(exc), acked_seq=self.acked_seq)
            finally:
                self.in_flight = 0
                await engine.close()
            failures = 1 if progressed else failures + 1
            delay = backoff(failures, self.rng)
            self.state = "backoff"
            log.info("forward_backoff", seconds=round(delay, 3), failures=failures)
            await asyncio.sleep(delay)

    async def _pump(self, engine: Engine) -> None:
        """Send and collect acks until an error; raises EngineError."""
        loop = asyncio.get_running_loop()
        acks = engine.acks
        acked = self.acked_seq  # highest contiguous acked (or skipped) seq
        scanned = acked  # highest seq read from the ledger
        unstored = 0  # acked events not yet in the stored cursor
        storing = 0  # of them, those the running cursor write covers
        # per message in flight, in send order: the cursor after its ack (message
        # ``counted`` is the first); per burst: [messages sent up to its end, sent at]
        inflight: deque[int] = deque()
        bursts: deque[tuple[int, float]] = deque()
        counted = 0  # messages of this connection whose ack is collected
        page: deque[tuple] = deque()
        store: asyncio.Task[int] | None = None
        reading: asyncio.Task[list[tuple]] | None = None  # the next page, read ahead
        read_up_to = scanned  # self.last_seq when that read started
        epoch, edge_id, wanted = self.ledger.epoch, self.edge_id, self.wanted
        # sends and wake-ups go in bursts of a quarter window, not one per ack: fewer
        # loop rounds, socket writes and ledger reads per event; the clock, the counters
        # and the histogram are touched once per burst or round, not per event
        burst = max(1, self.window // 4)
        try:
            while True:
                room = self.window - len(inflight) - unstored
                if room >= burst or (room > 0 and not inflight):
                    room_to_send = room
                else:
                    room_to_send = 0  # a nearly full window: wait for a burst of acks
                if reading is not None and reading.done():
                    rows = reading.result()
                    reading = None
                    if rows:
                        scanned = rows[-1][0]
                        page.extend(rows)
                    else:  # the newest events are gone (retention): nothing to read up to there
                        scanned = max(scanned, read_up_to)
                if reading is None and len(page) <= self.window and scanned < self.last_seq:
                    # the next page is read while this one goes out and acks come in
                    read_up_to = self.last_seq
                    reading = loop.create_task(self.ledger.forward_page(scanned, PAGE_EVENTS, PAGE_BYTES))
                if page and room_to_send > 0:
                    batch: list[Message] = []
                    resent = 0
                    high = self._high_sent
                    while page and len(batch) < room_to_send:
                        row = page.popleft()
                        seq = row[0]
                        if wanted is not None and not wanted(row[2]):
                            # not forwarded: the cursor passes it with the ack before it
                            if inflight:
                                inflight[-1] = seq
                            else:
                                acked = seq
                            continue
                        batch.append(message(edge_id, epoch, row))
                        inflight.append(seq)
                        if seq <= high:
                            resent += 1
                        else:
                            high = seq
                    if batch:
                        await engine.send(batch)
                        self._high_sent = high
                        bursts.append((acks.sent, self.clock()))
                        self.forwarded.inc(amount=len(batch))
                        if resent:
                            self.resent.inc(amount=resent)
                if acks.acked > counted:
                    n, now = acks.acked - counted, self.clock()
                    for _ in range(n - 1):
                        inflight.popleft()
                    acked = max(acked, inflight.popleft())  # a drop at the byte bound may have moved it on
                    unstored += n
                    self.acked.inc(amount=n)
                    while counted < acks.acked:  # each ack's latency, by the burst it went out in
                        end, sent_at = bursts[0]
                        upto = min(end, acks.acked)
                        self.ack_latency.observe(now - sent_at, count=upto - counted)
                        counted = upto
                        if end == upto:
                            bursts.popleft()
                    self.last_ack_at = int(self.wall() * 1000)
                error = acks.error
                if error is not None:
                    raise error
                self.in_flight = len(inflight)
                if store is not None and store.done():
                    stored = store.result()
                    store = None
                    unstored -= storing
                    self.acked_seq = stored
                    if stored > acked:  # the byte bound dropped events past us
                        acked = stored
                        scanned = max(scanned, stored)
                if store is None and acked > self.acked_seq:
                    store = loop.create_task(self.ledger.store_forward_cursor(acked))
                    storing = unstored
                elif store is None:
                    unstored = 0  # every ack is at or below the stored cursor already
                room = self.window - len(inflight) - unstored
                sendable = room >= burst or (room > 0 and not inflight)
                if sendable and page:
                    continue  # more to send right away
                waits: set[asyncio.Future[Any]] = set()
                timeout = self.idle_poll
                if inflight:
                    # the acks that free a burst
                    waits.add(acks.wait(counted + min(len(inflight), max(1, burst - room))))
                    timeout = bursts[0][1] + self.ack_timeout - self.clock()
                    if timeout <= 0:
                        raise EngineError("timeout", f"no ack within {self.ack_timeout:g} s for the "
                                                     f"event after seq {acked}")
                if store is not None:
                    waits.add(store)
                if reading is not None:
                    waits.add(reading)
                if sendable:
                    self._wakeup = loop.create_future()
                    waits.add(self._wakeup)
                done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                self._wakeup = None
                if not done and not inflight:  # the idle fallback: events that came another way
                    self.last_seq = max(self.last_seq, await self.ledger.last_seq())
        except EngineError:
            # the acks this connection collected are kept: a reconnect resends only after them
            if store is not None:
                self.acked_seq, store = await store, None
            if acked > self.acked_seq:
                self.acked_seq = await self.ledger.store_forward_cursor(acked)
            raise
        finally:
            if store is not None:
                store.cancel()  # the write itself still lands; only the wait ends
            if reading is not None and reading.done() and not reading.cancelled():
                reading.exception()  # retrieved: no "never retrieved" warning
            elif reading is not None:
                reading.cancel()
