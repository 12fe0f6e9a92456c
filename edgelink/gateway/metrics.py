"""Counters, gauges and histograms with labels, rendered in the Prometheus text format.

Deliberately tiny: a metric is a dict from a label tuple to a number (or bucket counts),
updated in O(1) on the hot path; rendering walks them when /metrics is scraped.
"""

from __future__ import annotations

import bisect
from typing import Callable, Iterable, NamedTuple, TypeVar

# Budget names of edgelink_budget_refusals_total (docs/operations.md, API.md §1): each is
# exported at 0 from the start.
BUDGETS = ("connections", "request_line", "header_block", "request_time", "body", "bodies", "write_buffer",
           "ledger", "ws_queue", "file_descriptors", "module_reply", "json_cost")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Counter:
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = (),
                 known: Iterable[tuple[str, ...]] = ()):
        self.name, self.help, self.label_names = name, help_text, labels
        self.values: dict[tuple[str, ...], float] = {}
        # Series known at start are exported at 0 (API.md §7), so rate() sees the first one.
        self.known(*(known if labels else [()]))

    def known(self, *series: tuple[str, ...]) -> None:
        """Export these label tuples (at 0 until counted) if not already there."""
        for labels in series:
            self.values.setdefault(labels, 0)

    def inc(self, *labels: str, amount: float = 1) -> None:
        self.values[labels] = self.values.get(labels, 0) + amount

    def samples(self) -> Iterable[str]:
        for labels, value in self.values.items():
            yield f"{self.name}{_labels(self.label_names, labels)} {_num(value)}"


class Gauge(Counter):
    """A value set from outside, or read from a callback at scrape time. ``kind`` is
    "counter" for a total kept elsewhere (the kernel's CPU seconds) and read at scrape."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = (),
                 read: Callable[[], dict[tuple[str, ...], float]] | None = None, kind: str = "gauge"):
        # no series at start: a gauge has no value until it is set or read
        self.name, self.help, self.label_names = name, help_text, labels
        self.values: dict[tuple[str, ...], float] = {}
        self.read = read
        self.kind = kind

    def set(self, *labels: str, value: float) -> None:
        self.values[labels] = value

    def samples(self) -> Iterable[str]:
        if self.read is not None:
            self.values = self.read()
        return super().samples()


class Histogram:
    kind = "histogram"

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = (),
                 buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.help, self.label_names, self.buckets = name, help_text, labels, buckets
        # labels -> [count per bucket (+Inf last), sum]
        self.values: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}
        if not labels:
            # The one series exists from the start: an observation from another thread
            # (the ledger writer) then never adds a key while a scrape iterates.
            self.values[()] = ([0] * (len(buckets) + 1), [0.0])

    def observe(self, value: float, *labels: str, count: int = 1) -> None:
        """``count`` observations of ``value`` (a batch measured together)."""
        entry = self.values.get(labels)
        if entry is None:
            entry = self.values[labels] = ([0] * (len(self.buckets) + 1), [0.0])
        entry[0][bisect.bisect_left(self.buckets, value)] += count
        entry[1][0] += value * count

    def samples(self) -> Iterable[str]:
        for labels, (counts, total) in self.values.items():
            running = 0
            for bound, count in zip(self.buckets, counts):
                running += count
                le = _labels(self.label_names, labels, 'le="%s"' % bound)
                yield f"{self.name}_bucket{le} {running}"
            running += counts[-1]
            le = _labels(self.label_names, labels, 'le="+Inf"')
            yield f"{self.name}_bucket{le} {running}"
            yield f"{self.name}_sum{_labels(self.label_names, labels)} {_num(total[0])}"
            yield f"{self.name}_count{_labels(self.label_names, labels)} {running}"


class Family(NamedTuple):
    """One metric family: what ``# TYPE`` says (a gauge read from a total kept elsewhere says
    "counter"), its help and its label names."""

    type: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = LATENCY_BUCKETS  # histograms only


# Every family /metrics can show, declared here and nowhere else; the piece that owns the
# numbers asks the Registry for its family by name (``counter``, ``gauge``, ``histogram``).
FAMILIES: dict[str, Family] = {
    # the transport, modules, streams, the ledger (gateway/metrics.py Registry)
    "edgelink_http_requests_total": Family(
        "counter", "HTTP requests by route template, method and status", ("route", "method", "status")),
    "edgelink_http_request_duration_seconds": Family("histogram", "HTTP request latency by route template", ("route",)),
    "edgelink_events_total": Family("counter", "Events by type and outcome (accepted, rejected)", ("type", "outcome")),
    "edgelink_ws_slow_consumer_closes_total": Family(
        "counter", "WebSocket clients closed with 1013 for not keeping up"),
    "edgelink_budget_refusals_total": Family(
        "counter", "Requests, replies and clients refused because a budget was reached", ("budget",)),
    "edgelink_breaker_transitions_total": Family(
        "counter", "Circuit breaker changes of state, by module and the state entered", ("module", "to")),
    "edgelink_upstream_request_duration_seconds": Family(
        "histogram", "Upstream module call latency", ("module", "outcome")),
    "edgelink_streams_open": Family("gauge", "Streamed responses being sent, by route template", ("route",)),
    "edgelink_stream_bytes_total": Family("counter", "Body bytes of streamed responses, by route template", ("route",)),
    "edgelink_stream_first_byte_seconds": Family(
        "histogram", "Time from request to the first body byte of a stream", ("route",)),
    "edgelink_build_info": Family("gauge", "The running edgelink version (always 1)", ("version",)),
    "edgelink_module_up": Family(
        "gauge", "1 if the module answered its last recorded health probe with 2xx, else 0", ("module",)),
    "edgelink_module_probe_duration_seconds": Family(
        "gauge", "Duration of the module's last recorded health probe", ("module",)),
    "edgelink_ledger_commit_duration_seconds": Family(
        "histogram", "Ledger write transaction latency (BEGIN to COMMIT)"),
    "edgelink_ledger_commit_batch_size": Family(
        "histogram", "Writes (events, health rounds) per ledger commit", buckets=BATCH_BUCKETS),
    "edgelink_ledger_events": Family("gauge", "Events stored in the ledger"),
    "edgelink_ledger_database_bytes": Family("gauge", "Size of the ledger database file and its WAL in bytes"),
    "edgelink_ledger_max_bytes": Family("gauge", "The ledger's byte bound (EDGELINK_LEDGER_MAX_BYTES)"),
    # the process, as the Prometheus client libraries name it (procfs.py)
    "process_resident_memory_bytes": Family("gauge", "Resident memory size in bytes"),
    "process_virtual_memory_bytes": Family("gauge", "Virtual memory size in bytes"),
    "process_cpu_seconds_total": Family("counter", "User and system CPU time spent in seconds"),
    "process_open_fds": Family("gauge", "Open file descriptors"),
    "process_max_fds": Family("gauge", "Maximum number of open file descriptors"),
    "process_start_time_seconds": Family("gauge", "Start time of the process since the epoch"),
    # read from the runtime's pieces at scrape (runtime.py)
    "edgelink_budget_bytes": Family("gauge", "Bytes held now in the memory account, by piece", ("piece",)),
    "edgelink_budget_limit_bytes": Family("gauge", "The memory account's size (EDGELINK_MEMORY_BUDGET)"),
    "edgelink_ws_clients": Family("gauge", "Connected WebSocket clients"),
    "edgelink_ws_queued_bytes": Family("gauge", "Bytes waiting in WebSocket send queues"),
    "edgelink_breaker_state": Family("gauge", "Circuit breaker state (0 closed, 1 half-open, 2 open)", ("module",)),
    "edgelink_context7_sessions": Family("gauge", "Live Context-7 sessions"),
    "edgelink_ledger_pruned_events_total": Family(
        "counter", "Events deleted from the ledger, by rule (count, age, bytes)", ("reason",)),
    "edgelink_ledger_write_failures_total": Family(
        "counter", "Ledger write transactions the disk refused (answered 503)"),
    "edgelink_module_anomaly_score": Family(
        "gauge", "How far the module's recent latency and error rate are from its baseline, in standard "
                 "deviations (0 = as usual; API.md §11)", ("module",)),
    "edgelink_module_degrading": Family(
        "gauge", "1 while the module's trend is degrading (its latency or errors growing past its baseline), "
                 "else 0", ("module",)),
    # the listener (serve.py)
    "edgelink_http_connections": Family("gauge", "Open client connections (HTTP and WebSocket)"),
    "edgelink_http_connections_limit": Family("gauge", "The connection limit (EDGELINK_MAX_CONNECTIONS)"),
    # the overload manager (overload.py)
    "edgelink_overload_actions_total": Family(
        "counter", "Overload manager actions taken (API.md §1), by action", ("action",)),
    # the forwarder, when one is configured (forward/forwarder.py)
    "edgelink_forward_forwarded_total": Family("counter", "Events published to the broker"),
    "edgelink_forward_acked_total": Family("counter", "Events the broker acknowledged"),
    "edgelink_forward_resent_total": Family("counter", "Events published again after a loss"),
    "edgelink_forward_reconnects_total": Family("counter", "Broker connections lost"),
    "edgelink_forward_ack_latency_seconds": Family("histogram", "Time from publish to the broker's ack"),
    "edgelink_forward_dropped_total": Family("counter", "Unforwarded events pruned at the ledger byte bound"),
    "edgelink_forward_dead_letters_total": Family(
        "counter", "Events the broker refused for themselves, passed by the cursor", ("reason",)),
    "edgelink_forward_rewinds_total": Family("counter", "Rewinds asked for"),
    "edgelink_forward_lag_seconds": Family("gauge", "Age of the oldest event not yet forwarded (0: none)"),
    "edgelink_forward_ack_age_seconds": Family(
        "gauge", "Seconds since the broker's last ack while events wait to be forwarded (0: none wait)"),
    "edgelink_forward_backlog": Family("gauge", "Events not yet acknowledged by the broker"),
    "edgelink_forward_state": Family("gauge", "Forwarder state (1 for the current one)", ("state",)),
}


Metric = Counter | Gauge | Histogram
M = TypeVar("M", Counter, Gauge, Histogram)


def _family(name: str, *types: str) -> Family:
    family = FAMILIES[name]  # KeyError: a family not declared in FAMILIES
    if family.type not in types:
        raise TypeError(f"{name} is declared a {family.type}")
    return family


class Registry:
    """The gateway's metrics: the families of ``FAMILIES``, each created once, so /metrics always
    lists the same set."""

    def __init__(self, process: Callable[[], dict[str, float]] | None = None) -> None:
        """``process`` reads the process_* figures (``procfs.process_stats``) once per
        scrape; without it (a piece tested alone) they are not exported."""
        self.metrics: list[Metric] = []
        self._read_process = process
        self.requests = self.counter("edgelink_http_requests_total")
        self.latency = self.histogram("edgelink_http_request_duration_seconds")
        self.events = self.counter("edgelink_events_total")
        self.ws_drops = self.counter("edgelink_ws_slow_consumer_closes_total")
        self.budget_refusals = self.counter("edgelink_budget_refusals_total", known=[(b,) for b in BUDGETS])
        self.breaker_transitions = self.counter("edgelink_breaker_transitions_total")
        self.upstream_latency = self.histogram("edgelink_upstream_request_duration_seconds")
        self.streams_open = self.gauge("edgelink_streams_open")
        self.stream_bytes = self.counter("edgelink_stream_bytes_total")
        self.stream_first_byte = self.histogram("edgelink_stream_first_byte_seconds")
        from .. import __version__

        self.gauge("edgelink_build_info", read=lambda: {(__version__,): 1})
        self._process: dict[str, float] = {}
        for key, name in () if process is None else (
                ("rss", "process_resident_memory_bytes"), ("vsize", "process_virtual_memory_bytes"),
                ("cpu", "process_cpu_seconds_total"), ("open_fds", "process_open_fds"),
                ("max_fds", "process_max_fds"), ("start", "process_start_time_seconds")):
            self.gauge(name, read=self._process_reader(key))
        self.module_up = self.gauge("edgelink_module_up")
        self.module_check_duration = self.gauge("edgelink_module_probe_duration_seconds")
        self.ledger_commit = self.histogram("edgelink_ledger_commit_duration_seconds")
        self.ledger_batch = self.histogram("edgelink_ledger_commit_batch_size")
        self.ledger_events = self.gauge("edgelink_ledger_events")
        self.ledger_bytes = self.gauge("edgelink_ledger_database_bytes")
        self.ledger_max_bytes = self.gauge("edgelink_ledger_max_bytes")

    def _process_reader(self, key: str) -> Callable[[], dict[tuple[str, ...], float]]:
        return lambda: {(): self._process[key]}

    def counter(self, name: str, known: Iterable[tuple[str, ...]] = ()) -> Counter:
        """The counter ``name`` declared in ``FAMILIES``, exported from now on."""
        family = _family(name, "counter")
        return self.add(Counter(name, family.help, family.labels, known=known))

    def gauge(self, name: str, read: Callable[[], dict[tuple[str, ...], float]] | None = None) -> Gauge:
        """The gauge ``name`` declared in ``FAMILIES`` (set, or ``read`` at each scrape)."""
        family = _family(name, "gauge", "counter")
        return self.add(Gauge(name, family.help, family.labels, read=read, kind=family.type))

    def histogram(self, name: str) -> Histogram:
        """The histogram ``name`` declared in ``FAMILIES``, with its buckets."""
        family = _family(name, "histogram")
        return self.add(Histogram(name, family.help, family.labels, buckets=family.buckets))

    def add(self, metric: M) -> M:
        self.metrics.append(metric)
        return metric

    def render(self) -> bytes:
        if self._read_process is not None:
            self._process = self._read_process()  # one read of /proc per scrape for all process_* metrics
        lines: list[str] = []
        for metric in self.metrics:
            lines.append(f"# HELP {metric.name} {metric.help}")
            lines.append(f"# TYPE {metric.name} {metric.kind}")
            lines.extend(metric.samples())
        return ("\n".join(lines) + "\n").encode()
