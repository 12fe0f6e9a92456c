"""The forwarder: the ledger, after its cursor, in seq order, to a broker (API.md §9).

Rules it keeps
--------------
* At most ``window`` events are past the STORED cursor at any time (in flight, or acked
  but not yet written), so a crash, a lost connection or a lost ack makes at most
  ``window`` events go out twice, and none is skipped.
* At most ``window_bytes`` of events are in flight (unacked) at once, but always at least
  one: a window of large events cannot hold tens of megabytes in the engine's buffers
  while a broker stalls (the process's memory budget, API.md §1).
* The cursor moves only forward, only over a contiguous prefix of acks, and is written to
  the ledger while sending goes on, by at most CURSOR_WRITES writes queued at once (in
  order: the acks that come during one write are queued behind it, not held until it ends).
* Memory is O(window): the ledger is read in pages bounded by count and bytes (the next
  one read ahead once at most a window of rows and a page's bytes are left), whatever the
  backlog; a backlog and live events are one ordered stream.
* Any error (connect, publish, a failed or missing ack) drops the engine; a new one
  connects after a jittered exponential backoff (0.1 s to 30 s) and resumes after the
  cursor, which first takes the acks that connection collected. Ingest never waits on
  any of this: ``wake`` only sets a number and a future.
* A broker that stops reading cannot hold the pump: an engine's ``send`` only buffers
  (at most the window's messages), so the wait for acks, bounded by the ack timeout
  from the oldest unacked burst, is the only wait while events are in flight.
* No event stops forwarding for good: a refusal of one message for itself (too large at
  once; an ACL or an invalid message after DEAD_LETTER_AFTER refusals of the same seq)
  makes it a dead letter, recorded with the cursor's move past it in one transaction.
  The refused message is always the first wanted event after the stored cursor: acks
  count only up to a refusal, and the cursor takes every ack before it.
* A rewind sets the stored cursor back, while no pump runs: the events after it go out
  again (counted as resent) and retention keeps them again.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from ..config import KNOB
from ..gateway.metrics import Registry
from ..log import log
from .engine import DEAD_LETTER_KINDS, Engine, EngineError, Message, message

if TYPE_CHECKING:
    from ..ledger import Ledger

PAGE_EVENTS = 512  # rows per ledger read
PAGE_BYTES = 1 << 20  # payload+metadata bytes per ledger read: the buffer's bound
IDLE_POLL = 5.0  # seconds idle before re-reading the ledger anyway (a wake-up is the rule)
BACKOFF_MIN, BACKOFF_MAX = 0.1, 30.0
STATES = ("disabled", "connecting", "connected", "backoff")
WINDOW_BYTES = KNOB["forward_window_bytes"].default
DEAD_LETTER_AFTER = 3  # refusals of the same seq (acl, invalid) before it becomes a dead letter
# Connections the broker closed, without an ack, while the same event led what was in flight
# before it is sent alone, and then alone before it is a dead letter (``too_large``): an MQTT
# 3.1.1 broker cannot say why it refuses a message, it closes the connection (mosquitto's
# max_packet_size), and a box would send that event again for good.
ISOLATE_AFTER = 2
CLOSED_ALONE = 2
CURSOR_WRITES = 4  # cursor writes queued at once (acked events hold their window slots until written)


def type_filter(patterns: tuple[str, ...]) -> Callable[[str], bool] | None:
    """EDGELINK_FORWARD_TYPES: exact types or ``prefix.*``; empty = every type (None)."""
    if not patterns:
        return None
    exact = frozenset(p for p in patterns if not p.endswith(".*"))
    prefixes = tuple(p[:-1] for p in patterns if p.endswith(".*"))
    return lambda t: t in exact or t.startswith(prefixes)


def _row_bytes(row: tuple) -> int:
    """What a ledger row weighs in flight: its payload and metadata JSON."""
    return len(row[5]) + len(row[6] or b"")


def backoff(failures: int, rng: Callable[[], float]) -> float:
    """Seconds to wait after ``failures`` consecutive failed connections: doubling from
    0.1 s up to 30 s, each drawn in [half, whole] so a fleet does not reconnect in step."""
    ceiling = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** max(0, failures - 1))
    return ceiling * (0.5 + rng() / 2)


class Forwarder:
    def __init__(self, ledger: "Ledger", make_engine: Callable[[], Engine], metrics: Registry, *,
                 engine: str, url: str, edge_id: str, window: int, ack_timeout: float,
                 window_bytes: int = WINDOW_BYTES,
                 types: tuple[str, ...] = (), clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, rng: Callable[[], float] = random.random,
                 idle_poll: float = IDLE_POLL):
        self.ledger = ledger
        self.make_engine = make_engine
        self.engine_name, self.url, self.edge_id = engine, url, edge_id
        self.window, self.window_bytes, self.ack_timeout = window, window_bytes, ack_timeout
        self.wanted = type_filter(types)
        self.clock, self.wall, self.rng, self.idle_poll = clock, wall, rng, idle_poll
        self.state = "connecting"
        self.acked_seq = 0  # the stored cursor
        self.last_seq = 0  # the newest seq in the ledger, as far as we heard
        self.in_flight = 0
        self.last_error: str | None = None
        self.last_error_at: int | None = None
        self.last_ack_at: int | None = None
        self.dead_letter_count = 0  # this epoch's recorded dead letters (read at start)
        self.lag_seconds = 0.0  # age of the oldest event still to forward (refresh_lag)
        self._refused = (0, 0)  # (seq, consecutive refusals) of the message refused last
        self._closed_on = (0, 0)  # (seq, connections closed without an ack with it first in flight)
        self._lost_head: int | None = None  # the first seq sent on the connection that just ended
        self._high_sent = 0  # highest seq sent (kept with the cursor across restarts): a lower one is a resend
        self._wakeup: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self.forwarded = metrics.counter("edgelink_forward_forwarded_total")
        self.acked = metrics.counter("edgelink_forward_acked_total")
        self.resent = metrics.counter("edgelink_forward_resent_total")
        self.reconnects = metrics.counter("edgelink_forward_reconnects_total")
        self.ack_latency = metrics.histogram("edgelink_forward_ack_latency_seconds")
        self.dropped = metrics.counter("edgelink_forward_dropped_total")
        self.dead_letters = metrics.counter("edgelink_forward_dead_letters_total")
        self.rewinds = metrics.counter("edgelink_forward_rewinds_total")
        metrics.gauge("edgelink_forward_lag_seconds", read=lambda: {(): self.lag_seconds})
        metrics.gauge("edgelink_forward_ack_age_seconds", read=lambda: {(): self.ack_age()})
        metrics.gauge("edgelink_forward_backlog", read=lambda: {(): self.backlog})
        metrics.gauge("edgelink_forward_state", read=lambda: {(s,): float(s == self.state) for s in STATES})
        self._skips: set[asyncio.Task[int]] = set()  # cursor writes past dropped events
        for counter in (self.forwarded, self.acked, self.resent, self.reconnects, self.dropped, self.rewinds):
            counter.inc(amount=0)  # the series exist from the start
        for reason in DEAD_LETTER_KINDS:
            self.dead_letters.inc(reason, amount=0)
        self._since = self.wall()  # for the ack age before the first ack

    @property
    def backlog(self) -> int:
        return max(0, self.last_seq - self.acked_seq)

    # --- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        self.ledger.forwarding = True  # retention keeps what the stored cursor has not passed
        self.acked_seq = await self.ledger.forward_cursor()
        # what an earlier run had sent (as of its last cursor write) goes again as a resend
        self._high_sent = await self.ledger.forward_sent_seq()
        self.ledger.on_forced_drop = self._forced_drop
        self.last_seq = await self.ledger.last_seq()
        self.dead_letter_count = (await self.ledger.dead_letters(0))[1]
        self.dropped.inc(amount=await self.ledger.forward_dropped())  # this epoch's, across restarts
        await self.refresh_lag()
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
                "last_error": self.last_error, "last_error_at": self.last_error_at, "last_ack_at": self.last_ack_at,
                "dropped": int(self.dropped.values.get((), 0)), "dead_letters": self.dead_letter_count,
                "lag_seconds": self.lag_seconds}

    async def refresh_lag(self) -> float:
        """Read the age of the oldest event not yet forwarded (one indexed row) into
        ``lag_seconds``; the status and /metrics handlers call it before answering."""
        oldest = await self.ledger.forward_oldest(self.acked_seq) if self.backlog else None
        self.lag_seconds = 0.0 if oldest is None else round(max(0.0, self.wall() - oldest[1] / 1000), 3)
        return self.lag_seconds

    def ack_age(self) -> float:
        if not self.backlog:
            return 0.0
        since = self.last_ack_at / 1000 if self.last_ack_at is not None else self._since
        return round(max(0.0, self.wall() - since), 3)

    def _error(self, text: str) -> None:
        self.last_error, self.last_error_at = text, int(self.wall() * 1000)

    async def rewind(self, from_seq: int | None) -> dict[str, int]:
        """Forward again from ``from_seq`` (None: the oldest stored event; below it: from
        it): the running connection is dropped, the stored cursor set to ``from_seq - 1``,
        and forwarding starts again. Resends are counted in ``resent``."""
        oldest = await self.ledger.forward_oldest(0)
        first = oldest[0] if oldest is not None else self.last_seq + 1
        start = first if from_seq is None else max(from_seq, first)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            self.acked_seq = await self.ledger.rewind_forward_cursor(start - 1)
        finally:
            self.in_flight = 0
            self._task = asyncio.create_task(self._run(), name="forwarder")
        self.rewinds.inc()
        log.warning("forward_rewound", from_seq=start, asked=from_seq, acked_seq=self.acked_seq,
                    backlog=self.backlog, resend_up_to=self._high_sent)
        return {"from_seq": start, "acked_seq": self.acked_seq, "backlog": self.backlog}

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
                self._error(str(exc))
                log.warning("forward_error", kind=exc.kind, error=str(exc), url=self.url, acked_seq=self.acked_seq)
                closed = self._closed_without_ack(exc, progressed)
                if closed is not None:
                    exc = closed
                if exc.kind in DEAD_LETTER_KINDS:
                    try:
                        progressed = await self._refused_message(exc) or progressed
                    except Exception as failure:  # the ledger: the refusal is seen again next time
                        log.error("forward_dead_letter_failed", error=repr(failure), acked_seq=self.acked_seq)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a ledger error: log it and retry like a broker error
                self._error(repr(exc))
                log.error("forward_failed", error=repr(exc), acked_seq=self.acked_seq)
            finally:
                self.in_flight = 0
                await engine.close()
            failures = 1 if progressed else failures + 1
            delay = backoff(failures, self.rng)
            self.state = "backoff"
            log.info("forward_backoff", seconds=round(delay, 3), failures=failures)
            await asyncio.sleep(delay)

    def _closed_without_ack(self, exc: EngineError, progressed: bool) -> EngineError | None:
        """Count a connection the broker closed while the same event led what was in flight
        and nothing was acked; once it was closed CLOSED_ALONE times with that event sent
        alone (``isolating``), the refusal that makes it a dead letter."""
        head, self._lost_head = self._lost_head, None
        if exc.kind != "disconnected" or progressed or head is None:
            self._closed_on = (0, 0)
            return None
        count = self._closed_on[1] + 1 if self._closed_on[0] == head else 1
        self._closed_on = (head, count)
        if count < ISOLATE_AFTER + CLOSED_ALONE:
            return None
        self._closed_on = (0, 0)
        return EngineError("too_large", f"seq {head}: the broker closed the connection each time it was sent, "
                                        f"{CLOSED_ALONE} times alone (it gives no reason: MQTT 3.1.1; a broker "
                                        "maximum packet size below it is the usual cause)")

    @property
    def isolating(self) -> bool:
        """The event leading the window is sent alone (see ISOLATE_AFTER)."""
        return self._closed_on[1] >= ISOLATE_AFTER

    async def _refused_message(self, exc: EngineError) -> bool:
        """The broker refused the first wanted event after the cursor for itself: count
        the refusal, and make it a dead letter when it is too large or refused again
        DEAD_LETTER_AFTER times. True when the cursor moved past it."""
        row = None
        after = self.acked_seq
        while row is None:
            rows = await self.ledger.forward_page(after, PAGE_EVENTS, PAGE_BYTES)
            if not rows:
                return False
            row = next((r for r in rows if self.wanted is None or self.wanted(r[2])), None)
            after = rows[-1][0]
        seq = row[0]
        count = self._refused[1] + 1 if self._refused[0] == seq else 1
        self._refused = (seq, count)
        if exc.kind != "too_large" and count < DEAD_LETTER_AFTER:
            return False
        self.acked_seq = await self.ledger.dead_letter(seq, row[1], row[2], exc.kind, str(exc),
                                                       int(self.wall() * 1000))
        self.dead_letter_count += 1
        self.dead_letters.inc(exc.kind)
        self._refused = (0, 0)
        log.warning("forward_dead_letter", seq=seq, event_id=row[1], type=row[2], reason=exc.kind, error=str(exc),
                    refusals=count, acked_seq=self.acked_seq)
        return True

    async def _pump(self, engine: Engine) -> None:
        """Send and collect acks until an error; raises EngineError."""
        pump = _Pump(self, engine)
        try:
            while True:
                pump.take_page()
                pump.read_ahead()
                await pump.send_burst()
                pump.take_acks()
                pump.raise_due_error()
                self.in_flight = len(pump.inflight)
                pump.take_stored_cursor()
                pump.store_cursor()
                if pump.can_send_now():
                    continue
                await pump.wait()
        except EngineError:
            await pump.keep_acks()  # a reconnect resends only after them
            self._lost_head = pump.first_sent
            raise
        finally:
            pump.cancel_tasks()


class _Pump:
    """One connection's pump, in the steps ``Forwarder._pump`` runs in a loop: take a read
    page, read the next one ahead, send a burst, count acks, store the cursor, wait.

    Sends and wake-ups go in bursts of a quarter window, not one per ack: fewer loop
    rounds, socket writes and ledger reads per event; the clock, the counters and the
    histogram are touched once per burst or round, not per event."""

    def __init__(self, fw: Forwarder, engine: Engine):
        self.fw, self.engine, self.acks = fw, engine, engine.acks
        self.loop = asyncio.get_running_loop()
        self.acked = fw.acked_seq  # highest contiguous acked (or skipped) seq
        self.scanned = self.acked  # highest seq read from the ledger
        self.unstored = 0  # acked events not yet in the stored cursor
        # per message in flight, in send order: the cursor after its ack (message
        # ``counted`` is the first); per burst: (messages sent up to its end, sent at)
        self.inflight: deque[int] = deque()
        self.sizes: deque[int] = deque()  # the payload bytes of each message in flight, in send order
        self.held = 0  # their sum: bounded by window_bytes (with at least one message in flight)
        self.bursts: deque[tuple[int, float]] = deque()
        self.counted = 0  # messages of this connection whose ack is collected
        self.page: deque[tuple] = deque()
        self.paged = 0  # the payload bytes of the rows in ``page``
        # the running cursor writes, oldest first (they settle in that order), each with
        # the acks it covers that the ones before it do not
        self.stores: deque[tuple[asyncio.Future[int], int]] = deque()
        self.storing = 0  # the acks they cover, of the unstored ones
        self.requested = self.acked  # the seq the newest cursor write stores
        self.reading: asyncio.Task[list[tuple]] | None = None  # the next page, read ahead
        self.read_up_to = self.scanned  # fw.last_seq when that read started
        self.window = 1 if fw.isolating else fw.window
        self.burst = max(1, self.window // 4)
        self.first_sent: int | None = None  # the first seq this connection sent

    def room(self) -> int:
        """Events the window has room for: in flight and acked-but-unstored count."""
        return self.window - len(self.inflight) - self.unstored

    def burst_room(self) -> int:
        """The room to send into now: 0 while a nearly full window waits for a burst of acks."""
        room = self.room()
        return room if room >= self.burst or (room > 0 and not self.inflight) else 0

    def take_page(self) -> None:
        """Add the page read ahead, once read, to the rows to send."""
        reading = self.reading
        if reading is None or not reading.done():
            return
        rows = reading.result()
        self.reading = None
        if rows:
            self.scanned = rows[-1][0]
            self.page.extend(rows)
            self.paged += sum(_row_bytes(r) for r in rows)
        else:  # the newest events are gone (retention): nothing to read up to there
            self.scanned = max(self.scanned, self.read_up_to)

    def read_ahead(self) -> None:
        """Start reading the next page while this one goes out and acks come in: once at
        most a window of rows and a page's bytes are left, and there is more to read."""
        fw = self.fw
        if (self.reading is None and len(self.page) <= fw.window and self.paged <= PAGE_BYTES
                and self.scanned < fw.last_seq):
            self.read_up_to = fw.last_seq
            self.reading = self.loop.create_task(fw.ledger.forward_page(self.scanned, PAGE_EVENTS, PAGE_BYTES))

    async def send_burst(self) -> None:
        """Send the next rows, as many as the window's room and its bytes allow; rows the
        type filter leaves out are passed by the cursor with the ack before them."""
        room = self.burst_room()
        page = self.page
        if not page or room <= 0:
            return
        fw, inflight, sizes = self.fw, self.inflight, self.sizes
        wanted, edge_id, epoch, window_bytes = fw.wanted, fw.edge_id, fw.ledger.epoch, fw.window_bytes
        batch: list[Message] = []
        resent = 0
        high = fw._high_sent
        while page and len(batch) < room:
            size = _row_bytes(page[0])
            if inflight and self.held + size > window_bytes:
                break  # the bytes in flight are at their bound: wait for acks
            row = page.popleft()
            self.paged -= size
            seq = row[0]
            if wanted is not None and not wanted(row[2]):
                # not forwarded: the cursor passes it with the ack before it
                if inflight:
                    inflight[-1] = seq
                else:
                    self.acked = seq
                continue
            batch.append(message(edge_id, epoch, row))
            inflight.append(seq)
            sizes.append(size)
            self.held += size
            if seq <= high:
                resent += 1
            else:
                high = seq
        if not batch:
            return
        if self.first_sent is None:
            self.first_sent = batch[0].seq
        await self.engine.send(batch)  # never blocks on the socket (Engine.send)
        fw._high_sent = high
        self.bursts.append((self.acks.sent, fw.clock()))
        fw.forwarded.inc(amount=len(batch))
        if resent:
            fw.resent.inc(amount=resent)

    def take_acks(self) -> None:
        """Count the acks collected since the last round: they free their window slots and
        bytes, move the acked seq, and give each its latency by the burst it went out in."""
        acks, fw = self.acks, self.fw
        if acks.acked <= self.counted:
            return
        inflight, sizes = self.inflight, self.sizes
        n, now = acks.acked - self.counted, fw.clock()
        for _ in range(n - 1):
            inflight.popleft()
            self.held -= sizes.popleft()
        self.held -= sizes.popleft()
        self.acked = max(self.acked, inflight.popleft())  # a drop at the byte bound may have moved it on
        self.unstored += n
        fw.acked.inc(amount=n)
        bursts = self.bursts
        while self.counted < acks.acked:
            end, sent_at = bursts[0]
            upto = min(end, acks.acked)
            fw.ack_latency.observe(now - sent_at, count=upto - self.counted)
            self.counted = upto
            if end == upto:
                bursts.popleft()
        fw.last_ack_at = int(fw.wall() * 1000)
        if fw.last_error is not None:  # an ack after the error: it is over
            fw.last_error = fw.last_error_at = None

    def raise_due_error(self) -> None:
        """Raise the engine's error once every ack before it is counted."""
        error = self.acks.error
        if error is not None:
            raise error

    def take_stored_cursor(self) -> None:
        """Take the finished cursor writes: their acks no longer hold window slots."""
        stores = self.stores
        while stores and stores[0][0].done():
            store, covered = stores.popleft()
            self.unstored -= covered
            self.storing -= covered
            self._stored(store.result())

    def _stored(self, stored: int) -> None:
        self.fw.acked_seq = stored
        if stored > self.acked:  # the byte bound dropped events past us
            self.acked = self.requested = stored
            self.scanned = max(self.scanned, stored)

    def store_cursor(self) -> None:
        """Store the acked seq as the cursor: at once when no write is queued and the
        database's write lock is free (Ledger.write_forward_cursor_now), else queued for
        the writer thread, at most CURSOR_WRITES at a time (the acks that come while one
        is written need not wait for it to end before theirs starts)."""
        fw = self.fw
        if self.acked > self.requested and self.acked > fw.acked_seq:
            if not self.stores:
                stored = fw.ledger.write_forward_cursor_now(self.acked, fw._high_sent)
                if stored is not None:
                    self.unstored = 0
                    self.requested = self.acked
                    self._stored(stored)
                    return
            if len(self.stores) < CURSOR_WRITES:
                store = fw.ledger.queue_forward_cursor(self.acked, fw._high_sent)
                self.stores.append((store, self.unstored - self.storing))
                self.storing = self.unstored
                self.requested = self.acked
        elif not self.stores and self.acked <= fw.acked_seq:
            self.unstored = 0  # every ack is at or below the stored cursor already

    def sendable(self) -> bool:
        """The window has room for a burst, and the bytes in flight for the next row."""
        page = self.page
        return self.burst_room() > 0 and (
            not self.inflight or not page or self.held + _row_bytes(page[0]) <= self.fw.window_bytes)

    def can_send_now(self) -> bool:
        return bool(self.page) and self.sendable()

    async def wait(self) -> None:
        """Wait for what lets the pump go on: a burst of acks (bounded by the ack timeout
        from the oldest unacked burst), the cursor write, the page read ahead, or a new
        event; idle, re-read the newest seq after IDLE_POLL anyway."""
        fw, inflight = self.fw, self.inflight
        waits: set[asyncio.Future[Any]] = set()
        timeout = fw.idle_poll
        if inflight:
            # the acks that free a burst
            waits.add(self.acks.wait(self.counted + min(len(inflight), max(1, self.burst - self.room()))))
            timeout = self.bursts[0][1] + fw.ack_timeout - fw.clock()
            if timeout <= 0:
                raise EngineError("ack_timeout", f"no ack within {fw.ack_timeout:g} s for the "
                                                 f"event after seq {self.acked}")
        waits.update(store for store, _ in self.stores)
        if self.reading is not None:
            waits.add(self.reading)
        if self.sendable():
            fw._wakeup = self.loop.create_future()
            waits.add(fw._wakeup)
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        fw._wakeup = None
        if not done and not inflight:  # the idle fallback: events that came another way
            fw.last_seq = max(fw.last_seq, await fw.ledger.last_seq())

    async def keep_acks(self) -> None:
        """On an error: store the acks this connection collected."""
        fw = self.fw
        while self.stores:
            fw.acked_seq = await self.stores[0][0]
            self.stores.popleft()
        if self.acked > fw.acked_seq:
            fw.acked_seq = await fw.ledger.store_forward_cursor(self.acked, fw._high_sent)

    def cancel_tasks(self) -> None:
        for store, _ in self.stores:
            store.cancel()  # the write itself still lands; only the wait ends
        reading = self.reading
        if reading is not None and reading.done() and not reading.cancelled():
            reading.exception()  # retrieved: no "never retrieved" warning
        elif reading is not None:
            reading.cancel()
