"""Monitoring (API.md §7): the new metrics of a live gateway, `promtool check metrics` on its
/metrics, the alert rules (`promtool check rules`, `promtool test rules`) and the Grafana
dashboard, tied to the metric names the gateway really exposes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

import edgelink
from conftest import module_env, start_gateway, wait_until
from fakemodule import FakeModule

REPO = Path(edgelink.__file__).resolve().parent.parent
RULES = REPO / "deploy" / "prometheus" / "edgelink.rules.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "edgelink.rules.test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "edgelink-dashboard.json"
# Metrics that exist only while forwarding is configured (API.md §9): the dashboard and the
# alerts use them by these names; tests/test_forward*.py read them from a forwarding gateway.
ELSEWHERE = {"edgelink_forward_backlog", "edgelink_forward_state", "edgelink_forward_forwarded_total",
             "edgelink_forward_acked_total", "edgelink_forward_resent_total", "edgelink_forward_dropped_total",
             "edgelink_forward_reconnects_total", "edgelink_forward_ack_latency_seconds",
             "edgelink_forward_lag_seconds", "edgelink_forward_ack_age_seconds",
             "edgelink_forward_dead_letters_total"}  # forwarding on only
OPERATIONS = REPO / "docs" / "operations.md"

ALERT = {"system.alert": {"alert_id": "a", "severity": "low", "message": "m", "timestamp": 1}}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI") == "true":  # .ci/run installs it: missing there is a failure
            pytest.fail("promtool is not installed (apt-get install prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return path


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families: dict, family: str, suffix: str = "", **labels: str) -> float | None:
    for s in families[family].samples:
        if s.name == family + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


@pytest.fixture(scope="module")
def scraped(tmp_path_factory) -> tuple[str, dict, object]:
    """A gateway that recorded probe rounds, stored events, served a WebSocket client."""
    tmp = tmp_path_factory.mktemp("monitoring")
    with FakeModule("madre") as madre:
        gw = start_gateway(tmp, {**module_env({"madre": madre}), "EDGELINK_PROBE_INTERVAL": "0.2",
                                 "EDGELINK_MAX_CONNECTIONS": "321"})
        try:
            for _ in range(3):
                assert gw.post("/events/ingest", {"source": "t", "type": "system.alert",
                                                  "payload": ALERT["system.alert"]}).status == 201
            wait_until(lambda: 'edgelink_module_up{module="madre"} 1' in gw.get("/metrics", token=False).body.decode(),
                       why="madre probed up")

            async def with_client() -> str:
                async with websockets.connect(f"ws://127.0.0.1:{gw.port}/ws?token={gw.token}") as ws:
                    await ws.recv()
                    return await asyncio.to_thread(lambda: gw.get("/metrics", token=False).body.decode())

            text = asyncio.run(with_client())
            status = Path(f"/proc/{gw.proc.pid}/status").read_text()
            db_bytes = sum(os.path.getsize(p) for p in (gw.db, Path(f"{gw.db}-wal")) if p.exists())
        finally:
            gw.stop()
    return text, _families(text), {"status": status, "db_bytes": db_bytes, "pid": gw.proc.pid}


def test_new_metrics_carry_true_values(scraped):
    text, families, facts = scraped
    assert _value(families, "edgelink_build_info", version=edgelink.__version__) == 1
    rss_kib = int(re.search(r"VmRSS:\s+(\d+) kB", facts["status"])[1])
    assert abs(_value(families, "process_resident_memory_bytes") - rss_kib * 1024) < 16 * 1024 * 1024
    assert _value(families, "process_virtual_memory_bytes") > _value(families, "process_resident_memory_bytes")
    assert 0 < _value(families, "process_cpu_seconds", "_total") < 600
    assert 5 < _value(families, "process_open_fds") < _value(families, "process_max_fds")
    assert time.time() - 300 < _value(families, "process_start_time_seconds") <= time.time()
    # the recorded probe rounds: madre is up, the others' ports are closed
    assert _value(families, "edgelink_module_up", module="madre") == 1
    assert _value(families, "edgelink_module_up", module="switch") == 0
    assert _value(families, "edgelink_module_up", module="shubniggurath") is None  # disabled
    assert 0 < _value(families, "edgelink_module_probe_duration_seconds", module="madre") < 2
    # health prediction (API.md §11): every enabled module from the start, 0 with no baseline yet
    for module in ("madre", "switch"):
        assert _value(families, "edgelink_module_anomaly_score", module=module) == 0
        assert _value(families, "edgelink_module_degrading", module=module) == 0
    assert _value(families, "edgelink_module_degrading", module="shubniggurath") is None  # disabled
    assert _value(families, "edgelink_http_connections") >= 2  # the WebSocket and the scrape
    assert _value(families, "edgelink_http_connections_limit") == 321
    assert _value(families, "edgelink_ledger_events") == 3
    assert 0 < _value(families, "edgelink_ledger_database_bytes") <= facts["db_bytes"] + 1024 * 1024
    assert _value(families, "edgelink_ledger_max_bytes") == 1024 ** 3
    # every append and every health round is a write in some commit
    commits = _value(families, "edgelink_ledger_commit_duration_seconds", "_count")
    assert commits >= 2
    assert _value(families, "edgelink_ledger_commit_batch_size", "_count") == commits
    assert _value(families, "edgelink_ledger_commit_batch_size", "_sum") >= 3 + 1
    assert _value(families, "edgelink_ws_queued_bytes") == 0
    assert _value(families, "edgelink_ws_clients") == 1


def test_promtool_check_metrics_on_live_metrics(scraped, promtool):
    text, _, _ = scraped
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stdout + proc.stderr

    # and the check can fail: a counter without _total is a lint problem
    bad = text + "# HELP edgelink_bad A counter\n# TYPE edgelink_bad counter\nedgelink_bad 1\n"
    proc = subprocess.run([promtool, "check", "metrics"], input=bad, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "edgelink_bad" in proc.stdout + proc.stderr


def test_alert_rules_pass_promtool_check(promtool):
    proc = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    alerts = re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.M)
    assert f"SUCCESS: {len(alerts)} rules found" in proc.stdout


def test_alert_rules_unit_tests(promtool):
    proc = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True,
                          timeout=120, cwd=RULE_TESTS.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_unit_test_that_fires_it():
    alerts = re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.M)
    assert {"EdgelinkLedgerWriteFailures", "EdgelinkDown", "EdgelinkConnectionsNearLimit",
            "EdgelinkFileDescriptorsNearLimit"} <= set(alerts)
    tests = RULE_TESTS.read_text()
    for alert in alerts:
        assert re.search(rf"alertname: {alert}\n\s+exp_alerts:\n\s+- exp_labels:", tests), alert
        assert re.search(rf"alertname: {alert}\n\s+exp_alerts: \[\]", tests), f"{alert}: no case where it stays quiet"


def _metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b((?:edgelink|process)_[a-z0-9_]+)", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", n) if n.endswith(("_bucket", "_sum", "_count")) else n
            for n in names}


def _exposed(families: dict) -> set[str]:
    """The names as written in PromQL (counters with _total, histograms by base name)."""
    names = set()
    for f in families.values():
        names.add(f.name + "_total" if f.type == "counter" else f.name)
    return names


def _used() -> set[str]:
    """The metric names the dashboard's queries and the alert rules use."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [t["query"]["query"] for t in dashboard["templating"]["list"] if t["type"] == "query"]
    exprs += re.findall(r"expr: (.+)", RULES.read_text())
    exprs += re.findall(r"expr: \|\n((?:\s{10,}.+\n)+)", RULES.read_text())
    return set().union(*(_metric_names(e) for e in exprs))


def test_dashboard_and_alerts_use_metrics_the_gateway_exposes(scraped):
    _, families, _ = scraped
    exposed = _exposed(families) | ELSEWHERE
    dashboard = json.loads(DASHBOARD.read_text())
    used = _used()
    assert used - exposed == set()
    # what the issue asks the dashboard to show
    for name in ("edgelink_http_requests_total", "edgelink_http_request_duration_seconds", "edgelink_events_total",
                 "edgelink_module_up", "edgelink_module_probe_duration_seconds", "edgelink_breaker_state",
                 "edgelink_ws_clients", "edgelink_ws_slow_consumer_closes_total", "edgelink_ledger_commit_duration_seconds",
                 "edgelink_ledger_database_bytes", "process_resident_memory_bytes"):
        assert name in used, name
    memory = next(p for p in dashboard["panels"] if p["title"].startswith("Resident memory"))
    steps = memory["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[-1]["value"] == 80 * 1024 * 1024  # the budget line
    assert {p["id"] for p in dashboard["panels"]} == set(range(1, len(dashboard["panels"]) + 1))


def test_dashboard_is_per_box_and_provisionable():
    """A datasource variable (no import-time input, so a provisioning file from git works),
    an instance variable, every query per box (no sum over boxes), the current schema, and
    the forwarder's panels saying why they are empty on a gateway that does not forward."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert "__inputs" not in dashboard
    assert dashboard["schemaVersion"] >= 42  # the classic model's last version (Grafana 12)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["datasource"]["uid"] == "${datasource}"
    assert variables["instance"]["multi"] and "edgelink_build_info" in variables["instance"]["definition"]
    queries = [p for p in dashboard["panels"] if p["type"] != "row"]
    for panel in queries:
        for where in (panel, *panel["targets"]):
            assert where["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert 'instance=~"$instance"' in expr, (panel["title"], expr)
            for grouping in re.findall(r"\b(?:sum|max|min|avg|count)\b\s*(by \([^)]*\))?\s*\(", expr):
                assert "instance" in grouping, (panel["title"], expr)  # never added up across boxes
        if any("edgelink_forward_" in t["expr"] for t in panel["targets"]):
            assert panel["fieldConfig"]["defaults"]["noValue"] == "no forwarder configured", panel["title"]


def test_every_exported_metric_is_on_the_dashboard_or_an_alert_or_explained(scraped):
    """A family neither shown nor alerted on is listed, with why it exists, in the
    operations guide's section on the metrics left off the dashboard."""
    _, families, _ = scraped
    exposed = _exposed(families) | ELSEWHERE
    section = OPERATIONS.read_text().partition("## Metrics not on the dashboard")[2].partition("\n## ")[0]
    explained = set(re.findall(r"^\| `((?:edgelink|process)_[a-z0-9_]+)", section, re.M))
    assert exposed - _used() - explained == set()
    assert explained & _used() == set()  # the list names only what is really left off


def test_ws_queued_bytes_counts_send_queues_and_held_frames():
    from edgelink.gateway.metrics import Registry
    from edgelink.hub import Hub

    class Queued:  # stands for a WebSocket with this many bytes waiting
        def __init__(self, n: int):
            self.n = n

        def waiting_bytes(self) -> int:
            return self.n

    hub = Hub(Registry(), hold_limit=10, hold_bytes=1 << 20)
    live = hub.add(Queued(100), "live", None)
    live.held = None  # went live
    replaying = hub.add(Queued(5), "replaying", None)
    replaying.held_bytes = 8  # two held frames of 4 bytes
    assert hub.queued_bytes() == 100 + 5 + 8
    hub.remove(live)
    assert hub.queued_bytes() == 13


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", markdown, re.M)}


def test_every_alert_has_a_runbook_section():
    rules = RULES.read_text()
    blocks = re.split(r"^\s+- alert: ", rules, flags=re.M)[1:]
    assert blocks
    for block in blocks:
        alert = block.split("\n", 1)[0]
        runbook = re.search(r'^\s+runbook: "(docs/[\w-]+\.md)#([\w-]+)"$', block, re.M)
        assert runbook, f"{alert}: no runbook annotation"
        doc = REPO / runbook[1]
        assert doc.is_file(), runbook[1]
        assert runbook[2] in _anchors(doc.read_text()), f"{alert}: no section {runbook[2]} in {runbook[1]}"
