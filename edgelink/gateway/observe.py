"""What the debug endpoints show about the event stream (API.md §5), as pure pieces.

``CardinalityCounter`` answers ``GET /debug/events/cardinality`` and ``CorrelationGraph``
answers ``GET /debug/events/correlations``. Both are fed each accepted event once, take
the clock as a parameter (Unix seconds) and keep bounded memory whatever the event rate:
the counter holds one bucket of per-type counts per second of its window, the graph at
most ``max_nodes`` events.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable

from .events import SCHEMAS, Event

WINDOW_SECONDS = 60  # API.md §5: the cardinality window
MAX_NODES = 50  # API.md §5: correlation graph nodes ...
MAX_AGE_SECONDS = 300  # ... none older than this

# Types are chosen by clients; past this many distinct types in one window, new ones are
# counted together under OVERFLOW_TYPE so a flood of made-up names cannot grow memory.
MAX_TYPES = 1000
OVERFLOW_TYPE = "_other"


class CardinalityCounter:
    """Accepted events per type over a sliding window, at one-second resolution.

    An event recorded at time ``t`` is counted while ``floor(t) > now - window``: for the
    window less at most one second, never longer.
    """

    def __init__(self, now: Callable[[], float], window_seconds: float = WINDOW_SECONDS,
                 max_types: int = MAX_TYPES):
        self.now = now
        self.window_seconds = window_seconds
        self.max_types = max_types
        self._buckets: deque[tuple[int, Counter[str]]] = deque()  # (second, counts), oldest first
        self._totals: Counter[str] = Counter()  # the sum of the buckets, kept as they come and go

    def record(self, event_type: str) -> None:
        now = self.now()
        self._expire(now)
        second = math.floor(now)
        if self._buckets and second <= self._buckets[-1][0]:
            # same second, or the clock stepped back: the newest bucket keeps the order intact
            counts = self._buckets[-1][1]
        else:
            counts = Counter()
            self._buckets.append((second, counts))
        if event_type not in self._totals and len(self._totals) >= self.max_types:
            event_type = OVERFLOW_TYPE
        counts[event_type] += 1
        self._totals[event_type] += 1

    def snapshot(self) -> dict[str, Any]:
        """The body of ``GET /debug/events/cardinality``."""
        now = self.now()
        self._expire(now)
        per_minute = 60 / self.window_seconds
        return {
            "status": "ok",
            "timestamp": int(now * 1000),
            "window_seconds": self.window_seconds,
            "events": {t: {"count": c, "rate_per_min": round(c * per_minute, 3)} for t, c in self._totals.items()},
            "total_events": sum(self._totals.values()),
        }

    def _expire(self, now: float) -> None:
        while self._buckets and self._buckets[0][0] <= now - self.window_seconds:
            _, counts = self._buckets.popleft()
            self._totals.subtract(counts)
            for event_type in counts:
                if self._totals[event_type] <= 0:
                    del self._totals[event_type]


@dataclass(frozen=True, slots=True)
class _Node:
    id: str
    type: str
    timestamp: int  # ms
    severity: str | None
    nature: str
    correlation_ids: frozenset[str]
    related: tuple[str, ...]  # ids named by a system.correlation.updated event
    strength: float | None

    def body(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "timestamp": self.timestamp, "severity": self.severity,
                "nature": self.nature}


# Events sharing a correlation id belong to the same flow: the link is certain.
SHARED_ID_STRENGTH = 1.0


class CorrelationGraph:
    """The recent canonical events and the links between them.

    Edges: two nodes sharing a ``correlation_id`` (from payload or metadata) are joined
    with ``SHARED_ID_STRENGTH``; a ``system.correlation.updated`` node is joined to each id
    of its ``related_events`` that is a node, with its own ``strength`` (this explicit
    edge wins when both rules join the same pair).
    """

    def __init__(self, now: Callable[[], float], max_nodes: int = MAX_NODES,
                 max_age_seconds: float = MAX_AGE_SECONDS):
        self.now = now
        self.max_age_ms = max_age_seconds * 1000
        self._nodes: deque[_Node] = deque(maxlen=max_nodes)  # arrival order; the oldest fall out

    def add(self, event: Event) -> None:
        """Take an accepted event; non-canonical events are not nodes."""
        schema = SCHEMAS.get(event.type)
        if schema is None:
            return
        payload, metadata = event.payload, event.metadata or {}
        ids = frozenset(c for c in (payload.get("correlation_id"), metadata.get("correlation_id"))
                        if isinstance(c, str))
        related: tuple[str, ...] = ()
        strength = None
        if event.type == "system.correlation.updated":
            related = tuple(r for r in payload["related_events"] if isinstance(r, str))
            strength = payload["strength"]
        severity = payload.get("severity")
        self._nodes.append(_Node(event.event_id, event.type, event.timestamp,
                                 severity if isinstance(severity, str) else None, schema.nature,
                                 ids, related, strength))
        self._expire(self.now() * 1000 - self.max_age_ms)

    def snapshot(self) -> dict[str, Any]:
        """The body of ``GET /debug/events/correlations``."""
        now = self.now()
        oldest = now * 1000 - self.max_age_ms
        self._expire(oldest)
        # a node stamped earlier than one that arrived before it is not trimmed by _expire
        nodes = [n for n in self._nodes if n.timestamp >= oldest]
        edges: dict[frozenset[str], dict[str, Any]] = {}
        by_id: dict[str, list[_Node]] = {}
        for node in nodes:
            for correlation_id in node.correlation_ids:
                for other in by_id.setdefault(correlation_id, []):
                    edges.setdefault(frozenset((other.id, node.id)),
                                     {"source": other.id, "target": node.id, "strength": SHARED_ID_STRENGTH})
                by_id[correlation_id].append(node)
        present = {n.id for n in nodes}
        for node in nodes:
            for target in node.related:
                if target in present and target != node.id:
                    edges[frozenset((node.id, target))] = {"source": node.id, "target": target,
                                                           "strength": node.strength}
        return {
            "status": "ok",
            "timestamp": int(now * 1000),
            "graph": {"nodes": [n.body() for n in nodes], "edges": list(edges.values()),
                      "total_nodes": len(nodes), "total_edges": len(edges)},
        }

    def _expire(self, oldest: float) -> None:
        while self._nodes and self._nodes[0].timestamp < oldest:
            self._nodes.popleft()
