"""A Tentáculo Link v7-era client against the real ``edgelink demo`` (issue 22).

``V7Client`` is written the way the VX11 modules and the operator UI call Tentáculo Link:
madre ingests events with ``X-VX11-Token`` and checks for ``"status": "received"``; the UI
chats with ``{"message", "session_id", "metadata"}`` and reads ``response``, polls
``/vx11/status`` without a token, reads ``snapshot.state.<module>.status``, and opens ``/ws``
with ``?token=`` (a browser cannot set headers), reading the control frame, the echo of
what it sends and the broadcast frames. Nothing in it knows edgelink: what it needed to
change from v7 is what docs/migrating-from-v7.md says (the token on ``/ws``, 201 on ingest).
"""

from __future__ import annotations

import asyncio
import http.client
from typing import Any

import orjson
import websockets

from conftest import TOKEN, start_gateway, wait_until

TS = 1_700_000_000_000


class V7Client:
    def __init__(self, port: int, token: str):
        self.port = port
        self.token = token

    def _call(self, method: str, path: str, body: Any = None, auth: bool = True) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"X-VX11-Token": self.token} if auth else {}
        data = None
        if body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, orjson.loads(raw) if raw else None
        finally:
            conn.close()

    # madre, spawner, ...: events into the gateway
    def ingest(self, source: str, event_type: str, payload: dict[str, Any], broadcast: bool = False) -> bool:
        status, body = self._call("POST", "/events/ingest", {"source": source, "type": event_type,
                                                             "payload": payload, "broadcast": broadcast})
        return 200 <= status < 300 and body.get("status") == "received"

    # the operator UI
    def chat(self, message: str, session_id: str | None = None, metadata: dict | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"message": message}
        if session_id:
            body["session_id"] = session_id
        if metadata is not None:
            body["metadata"] = metadata
        status, answer = self._call("POST", "/operator/chat", body)
        assert status == 200, (status, answer)
        return answer

    def status(self) -> dict[str, Any]:
        return self._call("GET", "/vx11/status", auth=False)[1]

    def get(self, path: str) -> Any:
        return self._call("GET", path)[1]

    def post(self, path: str, body: Any = None) -> Any:
        return self._call("POST", path, body)[1]

    def ws(self, client_id: str):
        return websockets.connect(f"ws://127.0.0.1:{self.port}/ws?channel=event&client_id={client_id}"
                                  f"&token={self.token}")


def _frame(raw: str | bytes) -> dict[str, Any]:
    return orjson.loads(raw)


def test_a_v7_client_against_edgelink_demo(tmp_path) -> None:
    gw = start_gateway(tmp_path, {"EDGELINK_PROBE_INTERVAL": "0.5"}, command="demo", name="demo")
    try:
        client = V7Client(gw.port, TOKEN)

        # status polling, as the UI's dashboard does
        status = wait_until(lambda: (s := client.status())["summary"]["all_healthy"] and s, 30,
                            "every module healthy", every=0.2)
        assert status["ok"] is True and status["module"] == "tentaculo_link" and status["version"] == "7.0"
        assert status["modules"]["madre"]["status"] == "ok" and status["modules"]["madre"]["module"] == "madre"
        assert status["summary"]["total_modules"] == status["summary"]["healthy_modules"] == 9

        # chat as the UI sends it, and the session it reads back
        answer = client.chat("Hola, ¿cómo estás?", "session-001", {"source": "ui"})
        assert answer["session_id"] == "session-001" and "Hola" in answer["response"]
        assert answer["tokens"] == 3  # switch's own field, passed through
        session = client.get("/operator/session/session-001")
        assert session["user_id"] == "local" and session["summary"].startswith("user: Hola, ¿cómo estás?")
        assert client.get("/vx11/context-7/sessions")["total"] == 1
        assert client.post("/vx11/context-7/cleanup") == {"status": "ok", "removed": 0, "total": 1}
        assert client.get("/shub/dashboard") == {"status": "ok", "tracks": 0}

        state = wait_until(lambda: "madre" in (s := client.get("/operator/snapshot")["state"]) and s, 30,
                           "madre in the snapshot", every=0.2)
        assert state["madre"]["status"] == "ok"

        async def events() -> None:
            async with client.ws("operator-ui") as ui, client.ws("operator-ui-2") as other:
                for ws, name in ((ui, "operator-ui"), (other, "operator-ui-2")):
                    control = _frame(await asyncio.wait_for(ws.recv(), 10))
                    assert (control["channel"], control["type"], control["client_id"]) == \
                        ("control", "connected", name)
                # madre ingests a canonical event for the UI
                alert = {"alert_id": "a-1", "severity": "L3", "message": "disk almost full", "timestamp": TS}
                assert await asyncio.to_thread(client.ingest, "madre", "system.alert", alert, True)
                for ws in (ui, other):
                    frame = _frame(await asyncio.wait_for(ws.recv(), 10))
                    assert (frame["channel"], frame["type"], frame["source"], frame["payload"]) == \
                        ("event", "system.alert", "madre", alert)
                # a non-canonical event is stored, not broadcast
                assert await asyncio.to_thread(client.ingest, "spawner", "spawner.note", {"n": 1}, True)
                # the UI sends a flat canonical event: its echo, then the broadcast to everyone
                narration = {"type": "shub.action.narrated", "action": "fade", "reason": "end of cue",
                             "next_step": "stop", "timestamp": TS}
                text = orjson.dumps(narration).decode()
                await ui.send(text)
                assert await asyncio.wait_for(ui.recv(), 10) == text
                for ws in (ui, other):
                    frame = _frame(await asyncio.wait_for(ws.recv(), 10))
                    assert frame["type"] == "shub.action.narrated" and frame["action"] == "fade"
                    assert frame["payload"]["next_step"] == "stop"
        asyncio.run(asyncio.wait_for(events(), 60))
    finally:
        gw.stop()
