"""Runtime truth and metrics (API.md §7): /metrics, background health recording, the
snapshot's module view, and the `edgelink probe` command, all against real processes."""

from __future__ import annotations

import sqlite3
import subprocess
import time

import orjson
from prometheus_client.parser import text_string_to_metric_families

from conftest import EDGELINK, TOKEN, URL_ENV, module_env, wait_until
from fakemodule import ERROR_500, HANG, FakeModule


def test_metrics_parse_and_count(gateway):
    gateway.get("/health")
    gateway.get("/nope")
    gateway.post("/events/ingest", {"source": "t", "type": "system.alert", "payload": {
        "alert_id": "a", "severity": "low", "message": "m", "timestamp": 1}})
    gateway.post("/events/ingest", {"source": "t", "type": "system.alert", "payload": {}})
    r = gateway.get("/metrics", token=False)
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.body.decode())}
    for name in ("edgelink_http_requests", "edgelink_http_request_duration_seconds", "edgelink_events",
                 "edgelink_ws_clients", "edgelink_ws_slow_consumer_closes", "edgelink_breaker_state",
                 "edgelink_upstream_request_duration_seconds"):
        assert name in families, name

    def value(family: str, suffix: str = "", **labels: str) -> float:
        for s in families[family].samples:
            if s.name == family + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
        return 0.0

    assert value("edgelink_http_requests", "_total", route="/health", status="200") == 1
    assert value("edgelink_http_requests", "_total", route="unmatched", status="404") == 1
    assert value("edgelink_events", "_total", type="system.alert", outcome="accepted") == 1
    assert value("edgelink_events", "_total", type="system.alert", outcome="rejected") == 1
    assert value("edgelink_http_request_duration_seconds", "_count", route="/health") == 1
    assert value("edgelink_breaker_state", module="madre") == 0


def test_background_health_recording_feeds_snapshot(gateway_factory, tmp_path):
    with FakeModule("madre") as madre:
        before = int(time.time() * 1000)
        gw = gateway_factory({**module_env({"madre": madre}), "EDGELINK_PROBE_INTERVAL": "0.2"})
        def recorded() -> list:
            with sqlite3.connect(f"file:{gw.db}?mode=ro", uri=True) as conn:
                rows = conn.execute("SELECT service_name, port, status, http_code, latency_ms, endpoint_ok, "
                                    "snippet, checked_at FROM copilot_runtime_services").fetchall()
            return rows if len(rows) >= 10 else []
        rows = wait_until(recorded, why="a round of ten services recorded", every=0.2)
        by_name = {r[0]: r for r in rows}
        assert by_name["madre"][2] == "ok" and by_name["madre"][3] == 200 and by_name["madre"][5] == 1
        assert orjson.loads(by_name["madre"][6])["status"] == "ok"
        assert by_name["switch"][2] == "unreachable" and by_name["switch"][5] == 0
        assert by_name["shubniggurath"][2] == "disabled"
        assert by_name["tentaculo_link"][2] == "ok" and by_name["tentaculo_link"][1] == gw.port
        with sqlite3.connect(f"file:{gw.db}?mode=ro", uri=True) as conn:
            history = conn.execute("SELECT count(*) FROM copilot_runtime_services_history").fetchone()[0]
        assert history >= 9
        snap = gw.get("/operator/snapshot").json()
        assert snap["modules"]["madre"]["status"] == "ok" and snap["modules"]["madre"]["checked_at"] >= before
        assert gw.get(f"/operator/snapshot?t={before - 60_000}").json()["modules"] == {}


def test_probe_command_report_and_exit_codes(tmp_path):
    with FakeModule("madre") as madre, FakeModule("switch") as switch:
        env = {"PATH": "/usr/bin:/bin", **module_env({"madre": madre, "switch": switch}),
               "VX11_GATEWAY_TOKEN": TOKEN, "EDGELINK_HEALTH_TIMEOUT": "0.5"}
        report = tmp_path / "report.md"
        db = tmp_path / "probe.db"
        proc = subprocess.run([EDGELINK, "probe", "--db", str(db), "--report", str(report)], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1  # seven modules are down
        # Ten services: the gateway (not running here) and nine modules, seven of them down.
        assert proc.stdout.strip().splitlines()[-1].startswith("2/10 ok (tentaculo_link unreachable, ")
        assert "shubniggurath disabled" in proc.stdout
        text = report.read_text()
        assert "| service | port | status | HTTP code | latency (ms) | checked at |" in text
        assert "| madre |" in text and "| switch |" in text
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT count(*) FROM copilot_runtime_services").fetchone()[0] == 10
        assert madre.requests[0].headers["x-vx11-token"] == TOKEN

        # Every module up, and the gateway's own address answering too.
        everyone = {env_name: madre.url for env_name in URL_ENV.values()}
        everyone["TENTACULO_LINK_PORT"] = str(switch.port)
        proc = subprocess.run([EDGELINK, "probe", "--db", str(db)], env={**env, **everyone},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.strip() == "9/10 ok (shubniggurath disabled)"

        madre.behave("/health", ERROR_500)
        proc = subprocess.run([EDGELINK, "probe", "--db", str(db)], env={**env, **everyone},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and "madre error" in proc.stdout


def test_probe_on_a_terminal_prints_a_line_per_service_as_it_answers(tmp_path):
    import os
    import pty

    with FakeModule("madre") as madre, FakeModule("hermes") as hermes:
        hermes.behave("/health", HANG)
        env = {"PATH": "/usr/bin:/bin", **module_env({"madre": madre, "hermes": hermes}),
               "VX11_GATEWAY_TOKEN": TOKEN, "EDGELINK_HEALTH_TIMEOUT": "1"}
        master, slave = pty.openpty()
        proc = subprocess.Popen([EDGELINK, "probe", "--db", str(tmp_path / "p.db")], env=env,
                                stdout=slave, stderr=subprocess.DEVNULL)
        os.close(slave)
        output = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the pty closes when the child exits
                break
            if not chunk:
                break
            output += chunk
        os.close(master)
        assert proc.wait(30) == 1
    lines = output.decode().splitlines()
    assert lines[0].startswith("probing 10 services")
    names = [line.split()[0] for line in lines[1:-1]]
    assert sorted(names) == sorted(["tentaculo_link", *URL_ENV])
    # the hanging module answers last, at the health timeout, after the fast ones
    assert names[-1] == "hermes" and names.index("madre") < names.index("hermes")
    assert lines[-1].startswith("1/10 ok (")
