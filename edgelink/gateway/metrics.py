"""Counters, gauges and histograms with labels, rendered in the Prometheus text format.

Deliberately tiny: a metric is a dict from a label tuple to a number (or bucket counts),
updated in O(1) on the hot path; rendering walks them when /metrics is scraped.
"""

from __future__ import annotations

import bisect
from typing import Callable, Iterable

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
    """A count kept here, or read from a callback at scrape time (one kept elsewhere)."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = (),
                 read: Callable[[], dict[tuple[str, ...], float]] | None = None):
        self.name, self.help, self.label_names = name, help_text, labels
        self.values: dict[tuple[str, ...], float] = {}
        self.read = read

    def inc(self, *labels: str, amount: float = 1) -> None:
        self.values[labels] = self.values.get(labels, 0) + amount

    def samples(self) -> Iterable[str]:
        if self.read is not None:
            self.values = self.read()
        for labels, value in self.values.items():
            yield f"{self.name}{_labels(self.label_names, labels)} {_num(value)}"


class Gauge(Counter):
    """A value set from outside, or read from a callback at scrape time."""

    kind = "gauge"

    def set(self, *labels: str, value: float) -> None:
        self.values[labels] = value


class Histogram:
    kind = "histogram"

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = (),
                 buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.help, self.label_names, self.buckets = name, help_text, labels, buckets
        # labels -> [count per bucket (+Inf last), sum]
        self.values: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def observe(self, value: float, *labels: str) -> None:
        entry = self.values.get(labels)
        if entry is None:
            entry = self.values[labels] = ([0] * (len(self.buckets) + 1), [0.0])
        entry[0][bisect.bisect_left(self.buckets, value)] += 1
        entry[1][0] += value

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


class Registry:
    """The gateway's metrics, created in one place so /metrics always lists the same set."""

    def __init__(self) -> None:
        self.metrics: list[Metric] = []
        self.requests = self.add(Counter(
            "edgelink_http_requests_total", "HTTP requests by route template, method and status",
            ("route", "method", "status")))
        self.latency = self.add(Histogram(
            "edgelink_http_request_duration_seconds", "HTTP request latency by route template", ("route",)))
        self.events = self.add(Counter(
            "edgelink_events_total", "Events by type and outcome (accepted, rejected)", ("type", "outcome")))
        self.ws_drops = self.add(Counter(
            "edgelink_ws_slow_consumer_closes_total", "WebSocket clients closed with 1013 for not keeping up"))
        self.upstream_latency = self.add(Histogram(
            "edgelink_upstream_request_duration_seconds", "Upstream module call latency", ("module", "outcome")))

    def add(self, metric: Metric) -> Metric:
        self.metrics.append(metric)
        return metric

    def render(self) -> bytes:
        lines: list[str] = []
        for metric in self.metrics:
            lines.append(f"# HELP {metric.name} {metric.help}")
            lines.append(f"# TYPE {metric.name} {metric.kind}")
            lines.extend(metric.samples())
        return ("\n".join(lines) + "\n").encode()
