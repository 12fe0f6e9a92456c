"""API.md §7: a client generated from the live /openapi.json with openapi-python-client (a
mainstream generator) keeps every schema and can call ingest, a chat and a status."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import module_env
from fakemodule import FakeModule

GENERATOR = Path(sys.executable).with_name("openapi-python-client")
PACKAGE = "edgelink_generated_client"


@pytest.fixture
def generated(tmp_path, gateway_factory):
    """(the generated package, a gateway whose switch module is a fake, that fake)."""
    with FakeModule("switch") as switch:
        switch.reply("/switch/route-v5", {"response": "hello from switch", "model_used": "m1"})
        gw = gateway_factory(module_env({"switch": switch}))
        spec = tmp_path / "openapi.json"
        reply = gw.get("/openapi.json", token=False)
        assert reply.status == 200
        spec.write_bytes(reply.body)
        config = tmp_path / "generator.yml"
        config.write_text("post_hooks: []\n")  # no formatter run: ruff is not a dependency
        proc = subprocess.run([str(GENERATOR), "generate", "--path", str(spec), "--meta", "none",
                               "--output-path", str(tmp_path / PACKAGE), "--config", str(config)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # A dropped schema is only a warning for the generator; for us it is the bug.
        output = proc.stdout + proc.stderr
        assert "Warning" not in output and "Unable to process" not in output, output
        sys.path.insert(0, str(tmp_path))
        try:
            yield importlib.import_module(PACKAGE), gw, switch
        finally:
            sys.path.remove(str(tmp_path))
            for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
                del sys.modules[name]


def _module(package, name: str):
    return importlib.import_module(f"{package.__name__}.{name}")


# the generator's code is unformatted without ruff (`503and`): its warning is not ours
@pytest.mark.filterwarnings("ignore::SyntaxWarning")
def test_generated_client_ingests_chats_and_reads_status(generated):
    package, gw, switch = generated
    models = _module(package, "models")
    client = _module(package, "client").AuthenticatedClient(
        base_url=gw.base_url, token=gw.token, prefix="", auth_header_name="X-VX11-Token")

    ingest = _module(package, "api.events.post_events_ingest")
    alert = models.IngestSystemAlert(
        source="generated-client", type_="system.alert", broadcast=True,
        payload=models.SystemAlertPayload(alert_id="a1", severity="high", message="disk", timestamp=1))
    accepted = ingest.sync(client=client, body=alert)
    assert isinstance(accepted, models.IngestAccepted), accepted
    assert accepted.source == "generated-client" and accepted.canonical and accepted.seq >= 1

    # related_events is a list: the payload model keeps it
    correlation = models.IngestSystemCorrelationUpdated(
        source="generated-client", type_="system.correlation.updated",
        payload=models.SystemCorrelationUpdatedPayload(correlation_id="c1", related_events=[accepted.event_id],
                                                       strength=0.5, timestamp=2))
    assert isinstance(ingest.sync(client=client, body=correlation), models.IngestAccepted)
    other = models.IngestOtherEvent(source="generated-client", type_="custom.thing",
                                    payload=models.IngestOtherEventPayload.from_dict({"k": 1}))
    stored = ingest.sync(client=client, body=other)
    assert isinstance(stored, models.IngestAccepted) and stored.canonical is False
    # a schema failure comes back as the documented 422 model
    bad = models.IngestSystemAlert(source="generated-client", type_="system.alert",
                                   payload=models.SystemAlertPayload(alert_id="a2", severity="low", message="m",
                                                                     timestamp=1.5))  # not an integer
    rejected = ingest.sync_detailed(client=client, body=bad)
    assert rejected.status_code == 422

    chat = _module(package, "api.chat.post_operator_chat")
    answer = chat.sync(client=client, body=models.ChatRequest(message="hi there"))
    assert isinstance(answer, models.ChatResponse), answer
    assert answer.response == "hello from switch" and answer.provider == "switch" and answer.degraded is False
    assert [r.json["message"] for r in switch.requests if r.path == "/switch/route-v5"] == ["hi there"]

    status = _module(package, "api.modules.get_vx11_status")
    public = _module(package, "client").Client(base_url=gw.base_url)
    report = status.sync(client=public)
    assert isinstance(report, models.Status), report
    assert report.modules.additional_properties["switch"].status == "ok"
    assert report.ports.additional_properties["gateway"] == gw.port


def test_every_array_schema_names_its_items():
    """Generators drop an array schema without ``items`` (and every schema holding it)."""
    from edgelink import openapi
    from edgelink.app import build_router

    missing = []

    def walk(node, where):
        if isinstance(node, dict):
            kinds = node.get("type")
            if (kinds == "array" or (isinstance(kinds, list) and "array" in kinds)) and "items" not in node \
                    and "prefixItems" not in node:
                missing.append(where)
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    walk(openapi.document(build_router()), "#")
    assert missing == []
