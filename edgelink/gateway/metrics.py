"""Counters, gauges and histograms with labels, rendered in the Prometheus text format.

Deliberately tiny: a metric is a dict from a label tuple to a number (or bucket counts),
updated in O(1) on the hot path; rendering walks them when /metrics is scraped.
"""

from __future__ import annotations

import bisect
from typing import Callable, Iterable, TypeVar

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


Metric = Counter | Gauge | Histogram
M = TypeVar("M", Counter, Gauge, Histogram)


class Registry:
    """The gateway's metrics, created in one place so /metrics always lists the same set."""

    def __init__(self, process: Callable[[], dict[str, float]] | None = None) -> None:
        """``process`` reads the process_* figures (``procfs.process_stats``) once per
        scrape; without it (a piece tested alone) they are not exported."""
        self.metrics: list[Metric] = []
        self._read_process = process
        self.requests = self.add(Counter(
            "edgelink_http_requests_total", "HTTP requests by route template, method and status",
            ("route", "method", "status")))
        self.latency = self.add(Histogram(
            "edgelink_http_request_duration_seconds", "HTTP request latency by route template", ("route",)))
        self.events = self.add(Counter(
            "edgelink_events_total", "Events by type and outcome (accepted, rejected)", ("type", "outcome")))
        self.ws_drops = self.add(Counter(
            "edgelink_ws_slow_consumer_closes_total", "WebSocket clients closed with 1013 for not keeping up"))
        self.budget_refusals = self.add(Counter(
            "edgelink_budget_refusals_total", "Requests, replies and clients refused because a budget was reached",
            ("budget",), known=[(b,) for b in BUDGETS]))
        self.breaker_transitions = self.add(Counter(
            "edgelink_breaker_transitions_total", "Circuit breaker changes of state, by module and the state entered",
            ("module", "to")))
        self.upstream_latency = self.add(Histogram(
            "edgelink_upstream_request_duration_seconds", "Upstream module call latency", ("module", "outcome")))
        self.streams_open = self.add(Gauge(
            "edgelink_streams_open", "Streamed responses being sent, by route template", ("route",)))
        self.stream_bytes = self.add(Counter(
            "edgelink_stream_bytes_total", "Body bytes of streamed responses, by route template", ("route",)))
        self.stream_first_byte = self.add(Histogram(
            "edgelink_stream_first_byte_seconds", "Time from request to the first body byte of a stream",
            ("route",)))
        from .. import __version__

        self.add(Gauge("edgelink_build_info", "The running edgelink version (always 1)", ("version",),
                       read=lambda: {(__version__,): 1}))
        self._process: dict[str, float] = {}
        for key, name, kind, help_text in () if process is None else (
                ("rss", "process_resident_memory_bytes", "gauge", "Resident memory size in bytes"),
                ("vsize", "process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes"),
                ("cpu", "process_cpu_seconds_total", "counter", "User and system CPU time spent in seconds"),
                ("open_fds", "process_open_fds", "gauge", "Open file descriptors"),
                ("max_fds", "process_max_fds", "gauge", "Maximum number of open file descriptors"),
                ("start", "process_start_time_seconds", "gauge", "Start time of the process since the epoch")):
            self.add(Gauge(name, help_text, read=self._process_reader(key), kind=kind))
        self.module_up = self.add(Gauge(
            "edgelink_module_up", "1 if the module answered its last recorded health probe with 2xx, else 0",
            ("module",)))
        self.module_check_duration = self.add(Gauge(
            "edgelink_module_probe_duration_seconds", "Duration of the module's last recorded health probe",
            ("module",)))
        self.ledger_commit = self.add(Histogram(
            "edgelink_ledger_commit_duration_seconds", "Ledger write transaction latency (BEGIN to COMMIT)"))
        self.ledger_batch = self.add(Histogram(
            "edgelink_ledger_commit_batch_size", "Writes (events, health rounds) per ledger commit",
            buckets=BATCH_BUCKETS))
        self.ledger_events = self.add(Gauge("edgelink_ledger_events", "Events stored in the ledger"))
        self.ledger_bytes = self.add(Gauge(
            "edgelink_ledger_database_bytes", "Size of the ledger database file and its WAL in bytes"))
        self.ledger_max_bytes = self.add(Gauge(
            "edgelink_ledger_max_bytes", "The ledger's byte bound (EDGELINK_LEDGER_MAX_BYTES)"))

    def _process_reader(self, key: str) -> Callable[[], dict[tuple[str, ...], float]]:
        return lambda: {(): self._process[key]}

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
