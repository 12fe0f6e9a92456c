"""Metrics at 0 from the start, module changes logged once, reloads that say what changed
(API.md §7, the lines on counters and logs), over the real ``edgelink`` process."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from conftest import log_records, module_env, start_gateway, wait_for_log, wait_until
from edgelink.config import MODULE_DEFAULTS
from edgelink.gateway.events import SCHEMAS
from edgelink.gateway.metrics import BUDGETS
from fakemodule import ERROR_500, HEALTHY, FakeModule

ENABLED = [name for name, _, _ in MODULE_DEFAULTS if name != "shubniggurath"]  # shub is off by default


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample as (name, sorted labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def value(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def breaker_state(gw, module: str) -> str:
    return gw.get("/vx11/circuit-breaker/status").json()["breakers"][module]["state"]


def test_counters_known_at_start_are_exported_at_zero(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, module_env())
    try:
        found = samples(gw.get("/metrics", token=False).body.decode())
    finally:
        gw.stop()
    assert value(found, "edgelink_ws_slow_consumer_closes_total") == 0
    assert value(found, "edgelink_ledger_write_failures_total") == 0
    for budget in BUDGETS:
        assert value(found, "edgelink_budget_refusals_total", budget=budget) == 0, budget
    for module in ENABLED:
        for to in ("open", "half_open", "closed"):
            assert value(found, "edgelink_breaker_transitions_total", module=module, to=to) == 0, (module, to)
    assert value(found, "edgelink_breaker_transitions_total", module="shubniggurath", to="open") is None
    for event_type in SCHEMAS:
        for outcome in ("accepted", "rejected"):
            assert value(found, "edgelink_events_total", type=event_type, outcome=outcome) == 0
    assert value(found, "edgelink_events_total", type="invalid", outcome="rejected") == 0
    for reason in ("count", "age", "bytes"):
        assert value(found, "edgelink_ledger_pruned_events_total", reason=reason) == 0


def _events(gw: Any, event: str, module: str) -> list[dict[str, Any]]:
    return [r for r in log_records(gw.log_path) if r["event"] == event and r.get("module") == module]


def test_breaker_changes_are_counted_and_a_module_down_is_logged_once(tmp_path: Path) -> None:
    with FakeModule("hermes") as hermes:
        hermes.behave("/hermes/resources", ERROR_500)
        gw = start_gateway(tmp_path, {**module_env({"hermes": hermes}), "EDGELINK_BREAKER_FAILURES": "2",
                                      "EDGELINK_BREAKER_RECOVERY": "0.5"})
        try:
            assert gw.get("/resources").status == 500  # the module's own 5xx, passed on
            assert gw.get("/resources").status == 500  # the second failure opens it
            for _ in range(3):
                assert gw.get("/resources").status == 503  # refused at once, nothing new to log
            wait_until(lambda: breaker_state(gw, "hermes") == "half_open", why="the recovery time passed")
            assert gw.get("/resources").status == 500  # the trial fails: open again, still down
            assert gw.get("/resources").status == 503
            hermes.behave("/hermes/resources", HEALTHY)
            wait_until(lambda: breaker_state(gw, "hermes") == "half_open", why="the recovery time passed")
            assert gw.get("/resources").status == 200  # the trial works: closed
            found = samples(gw.get("/metrics", token=False).body.decode())
            down = _events(gw, "module_down", "hermes")
            up = _events(gw, "module_up", "hermes")
        finally:
            gw.stop()
    assert value(found, "edgelink_breaker_transitions_total", module="hermes", to="open") == 2
    assert value(found, "edgelink_breaker_transitions_total", module="hermes", to="half_open") == 2
    assert value(found, "edgelink_breaker_transitions_total", module="hermes", to="closed") == 1
    assert value(found, "edgelink_breaker_transitions_total", module="madre", to="open") == 0
    assert [(r["level"], r["by"]) for r in down] == [("warning", "breaker")]
    assert [(r["level"], r["by"]) for r in up] == [("info", "breaker")]


def test_probe_status_changes_are_logged_once_per_change(tmp_path: Path) -> None:
    with FakeModule("madre") as madre:
        gw = start_gateway(tmp_path, {**module_env({"madre": madre}), "EDGELINK_PROBE_INTERVAL": "0.1"})
        try:
            rounds = lambda n: lambda: len([r for r in madre.requests if r.path == "/health"]) >= n  # noqa: E731
            wait_until(rounds(3))
            madre.behave("/health", ERROR_500)
            wait_until(lambda: _events(gw, "module_down", "madre"))
            wait_until(rounds(len(madre.requests) + 3))
            madre.behave("/health", HEALTHY)
            wait_until(lambda: _events(gw, "module_up", "madre"))
            wait_until(rounds(len(madre.requests) + 3))
            records = log_records(gw.log_path)
        finally:
            gw.stop()
    changes = [(r["event"], r["by"]) for r in records if r.get("module") == "madre" and r["event"].startswith("module_")]
    assert changes == [("module_down", "probe"), ("module_up", "probe")]
    down = next(r for r in records if r["event"] == "module_down" and r["module"] == "madre")
    assert down["status"] == "error" and down["detail"] == "HTTP 500"
    # a module down from the first round is logged once, however many rounds follow
    switch = [r for r in records if r.get("module") == "switch" and r["event"].startswith("module_")]
    assert [r["event"] for r in switch] == ["module_down"]


def test_reloaded_names_the_settings_it_changed(tmp_path: Path) -> None:
    with FakeModule("hermes-a") as first, FakeModule("hermes-b") as second:
        config = tmp_path / "edgelink.toml"
        config.write_text(f'[modules.hermes]\nurl = "{first.url}"\n')
        envfile = tmp_path / "edgelink.env"
        envfile.write_text("EDGELINK_BREAKER_FAILURES=3\n")
        gw = start_gateway(tmp_path, {"EDGELINK_ENV_FILE": str(envfile)}, args=["--config", str(config)])
        try:
            seen = len(log_records(gw.log_path))
            gw.proc.send_signal(signal.SIGHUP)
            assert wait_for_log(gw.log_path, "reloaded", gw.proc, 20, seen)["changed"] == []

            config.write_text(f'[modules.hermes]\nurl = "{second.url}"\n')
            envfile.write_text("EDGELINK_BREAKER_FAILURES=5\nEDGELINK_ACCESS_LOG=true\n")
            seen = len(log_records(gw.log_path))
            gw.proc.send_signal(signal.SIGHUP)
            reloaded = wait_for_log(gw.log_path, "reloaded", gw.proc, 20, seen)
        finally:
            gw.stop()
    assert sorted(reloaded["changed"]) == ["EDGELINK_ACCESS_LOG", "EDGELINK_BREAKER_FAILURES", "modules"]


def test_demo_reloads_on_sighup(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, {"EDGELINK_LOG_LEVEL": "info"}, command="demo")
    try:
        seen = len(log_records(gw.log_path))
        gw.proc.send_signal(signal.SIGHUP)
        assert wait_for_log(gw.log_path, "reloaded", gw.proc, 20, seen)["changed"] == []
        assert gw.proc.poll() is None
        # the simulated modules are still the ones it routes to
        assert gw.post("/operator/chat", {"message": "still here"}).status == 200
    finally:
        assert gw.stop() == 0
