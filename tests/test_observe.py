"""The cardinality counter and the correlation graph (gateway/observe.py), on a fake clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clock import T0, Clock
from edgelink.gateway.events import build_event
from edgelink.gateway.observe import OVERFLOW_TYPE, CardinalityCounter, CorrelationGraph

# --- cardinality ---------------------------------------------------------------------------


def counts(counter: CardinalityCounter) -> dict[str, int]:
    return {t: v["count"] for t, v in counter.snapshot()["events"].items()}


def test_cardinality_shape():
    clock = Clock()
    counter = CardinalityCounter(clock)
    for t in ["system.alert", "system.alert", "custom"]:
        counter.record(t)
    assert counter.snapshot() == {
        "status": "ok", "timestamp": int(T0 * 1000), "window_seconds": 60,
        "events": {"system.alert": {"count": 2, "rate_per_min": 2.0}, "custom": {"count": 1, "rate_per_min": 1.0}},
        "total_events": 3,
    }


def test_each_event_is_counted_once_however_often_it_is_read():
    counter = CardinalityCounter(Clock())
    counter.record("a")
    for _ in range(3):
        assert counter.snapshot()["total_events"] == 1


def test_window_slides():
    clock = Clock()
    counter = CardinalityCounter(clock)
    counter.record("a")  # at T0
    clock.t += 30
    counter.record("a")
    counter.record("b")  # at T0 + 30
    assert counts(counter) == {"a": 2, "b": 1}
    clock.t = T0 + 59.9
    assert counts(counter) == {"a": 2, "b": 1}
    clock.t = T0 + 60  # the first event is 60 s old: out
    assert counts(counter) == {"a": 1, "b": 1}
    clock.t = T0 + 90
    assert counts(counter) == {} and counter.snapshot()["total_events"] == 0


def test_never_counted_past_the_window_and_at_most_a_second_less():
    clock = Clock(T0 + 0.75)
    counter = CardinalityCounter(clock)
    counter.record("a")
    clock.t = T0 + 59.7  # 58.95 s old: still in
    assert counts(counter) == {"a": 1}
    clock.t = T0 + 60.0  # 59.25 s old: its second has left the window
    assert counts(counter) == {}


def test_rate_per_min_scales_with_the_window():
    counter = CardinalityCounter(Clock(), window_seconds=30)
    for _ in range(3):
        counter.record("a")
    assert counter.snapshot()["events"]["a"] == {"count": 3, "rate_per_min": 6.0}


def test_clock_stepping_back_is_harmless():
    clock = Clock()
    counter = CardinalityCounter(clock)
    counter.record("a")
    clock.t -= 5
    counter.record("a")
    clock.t = T0 + 30
    assert counts(counter) == {"a": 2}
    clock.t = T0 + 61
    assert counts(counter) == {}


def test_memory_is_bounded_by_seconds_and_types():
    clock = Clock()
    counter = CardinalityCounter(clock, max_types=3)
    for i in range(1000):
        clock.t = T0 + i * 0.5
        counter.record(f"type-{i % 7}")
    assert len(counter._buckets) <= 61
    snapshot = counter.snapshot()
    assert len(snapshot["events"]) == 4 and OVERFLOW_TYPE in snapshot["events"]
    assert snapshot["total_events"] == 120  # two per second for the 60 seconds in the window


@given(st.lists(st.tuples(st.floats(0, 200), st.sampled_from("abc")), max_size=60))
def test_counter_agrees_with_a_naive_count(steps):
    clock = Clock()
    counter = CardinalityCounter(clock)
    seen = []
    for dt, t in sorted(steps):
        clock.t = T0 + dt
        counter.record(t)
        seen.append((clock.t, t))
    expected: dict[str, int] = {}
    for at, t in seen:
        if int(at) > clock.t - 60:
            expected[t] = expected.get(t, 0) + 1
    assert counts(counter) == expected


# --- correlations -------------------------------------------------------------------------


def alert(clock: Clock, correlation_id: str | None = None, meta_correlation: str | None = None,
          severity: str = "high"):
    payload = {"alert_id": "a", "severity": severity, "message": "m", "timestamp": 1}
    if correlation_id:
        payload["correlation_id"] = correlation_id
    metadata = {"correlation_id": meta_correlation} if meta_correlation else None
    return build_event("system.alert", "test", payload, metadata, True, int(clock.t * 1000))


def correlation(clock: Clock, related: list, strength: float, correlation_id: str = "corr"):
    payload = {"correlation_id": correlation_id, "related_events": related, "strength": strength, "timestamp": 1}
    return build_event("system.correlation.updated", "test", payload, None, True, int(clock.t * 1000))


def graph_of(graph: CorrelationGraph) -> dict:
    return graph.snapshot()["graph"]


def test_graph_shape_and_node_fields():
    clock = Clock()
    graph = CorrelationGraph(clock)
    a = alert(clock, severity="critical")
    graph.add(a)
    tension = build_event("switch.tension.updated", "switch", {"value": 3, "components": {}, "timestamp": 1},
                          None, False, int(clock.t * 1000))
    graph.add(tension)
    assert graph.snapshot() == {
        "status": "ok", "timestamp": int(T0 * 1000),
        "graph": {"nodes": [
            {"id": a.event_id, "type": "system.alert", "timestamp": a.timestamp, "severity": "critical",
             "nature": "incident"},
            {"id": tension.event_id, "type": "switch.tension.updated", "timestamp": tension.timestamp,
             "severity": None, "nature": "state"},
        ], "edges": [], "total_nodes": 2, "total_edges": 0},
    }


def test_non_canonical_events_are_not_nodes():
    graph = CorrelationGraph(Clock())
    graph.add(build_event("custom", "x", {"correlation_id": "c"}, None, False, int(T0 * 1000)))
    assert graph_of(graph)["total_nodes"] == 0


def test_node_cap_keeps_the_newest():
    clock = Clock()
    graph = CorrelationGraph(clock)
    events = [alert(clock) for _ in range(60)]
    for e in events:
        graph.add(e)
    nodes = graph_of(graph)["nodes"]
    assert len(nodes) == 50 and [n["id"] for n in nodes] == [e.event_id for e in events[10:]]


def test_nodes_older_than_300_seconds_leave():
    clock = Clock()
    graph = CorrelationGraph(clock)
    old = alert(clock)
    graph.add(old)
    clock.t += 200
    new = alert(clock)
    graph.add(new)
    clock.t = T0 + 300
    assert [n["id"] for n in graph_of(graph)["nodes"]] == [old.event_id, new.event_id]
    clock.t = T0 + 300.001
    assert [n["id"] for n in graph_of(graph)["nodes"]] == [new.event_id]


def test_a_late_stamped_node_is_aged_out_too():
    clock = Clock()
    graph = CorrelationGraph(clock)
    fresh = alert(clock)
    stale = alert(Clock(T0 - 250))  # arrived after `fresh` but stamped earlier
    graph.add(fresh)
    graph.add(stale)
    clock.t += 60
    assert [n["id"] for n in graph_of(graph)["nodes"]] == [fresh.event_id]


def test_shared_correlation_id_joins_nodes_from_payload_or_metadata():
    clock = Clock()
    graph = CorrelationGraph(clock)
    a, b, c, d = alert(clock, "x"), alert(clock, meta_correlation="x"), alert(clock, "y"), alert(clock, "x")
    for e in (a, b, c, d):
        graph.add(e)
    g = graph_of(graph)
    pairs = {frozenset((e["source"], e["target"])) for e in g["edges"]}
    assert pairs == {frozenset((a.event_id, b.event_id)), frozenset((a.event_id, d.event_id)),
                     frozenset((b.event_id, d.event_id))}
    assert g["total_edges"] == 3 and all(e["strength"] == 1.0 for e in g["edges"])


def test_correlation_update_joins_related_nodes_with_its_strength():
    clock = Clock()
    graph = CorrelationGraph(clock)
    a, b = alert(clock), alert(clock)
    graph.add(a)
    graph.add(b)
    update = correlation(clock, [a.event_id, "not-a-node", b.event_id, 17, a.event_id], 0.8)
    graph.add(update)
    g = graph_of(graph)
    assert sorted(g["edges"], key=lambda e: e["target"]) == sorted([
        {"source": update.event_id, "target": a.event_id, "strength": 0.8},
        {"source": update.event_id, "target": b.event_id, "strength": 0.8},
    ], key=lambda e: e["target"])


def test_explicit_strength_wins_over_a_shared_id():
    clock = Clock()
    graph = CorrelationGraph(clock)
    a = alert(clock, "corr")
    graph.add(a)
    update = correlation(clock, [a.event_id], 0.25, correlation_id="corr")
    graph.add(update)
    assert graph_of(graph)["edges"] == [{"source": update.event_id, "target": a.event_id, "strength": 0.25}]


def test_edges_to_expired_nodes_disappear():
    clock = Clock()
    graph = CorrelationGraph(clock)
    a = alert(clock, "x")
    graph.add(a)
    clock.t += 200
    graph.add(alert(clock, "x"))
    graph.add(correlation(clock, [a.event_id], 0.5))
    assert graph_of(graph)["total_edges"] == 2
    clock.t = T0 + 301
    g = graph_of(graph)
    assert g["total_nodes"] == 2 and g["total_edges"] == 0


@pytest.mark.parametrize("n", [1, 50, 200])
def test_graph_memory_is_bounded(n):
    clock = Clock()
    graph = CorrelationGraph(clock, max_nodes=50)
    for _ in range(n):
        graph.add(alert(clock, "same"))
    g = graph_of(graph)
    k = min(n, 50)
    assert g["total_nodes"] == k and g["total_edges"] == k * (k - 1) // 2
