"""The demo modules answer bad bodies as the gateway does: 400 for bytes that are not JSON,
422 for JSON that is not an object, never a 500. What ``edgelink demo`` prints is what a
newcomer runs: each line of its banner is tried against the running demo."""

from __future__ import annotations

import asyncio
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets

from conftest import EDGELINK, clean_env, start_gateway, wait_until
from edgelink.demo import DemoModule
from edgelink.http.messages import Request


def answer(module: str, path: str, body: bytes) -> tuple[int, dict]:
    req = Request("POST", path, {"content-type": "application/json"}, body)
    resp = asyncio.run(DemoModule(module).handle(req))
    return resp.status, orjson.loads(resp.body) if resp.body else {}


@pytest.mark.parametrize("module,path", [("madre", "/madre/chat"), ("switch", "/switch/route-v5"),
                                         ("switch", "/switch/stream")])
@pytest.mark.parametrize("body,status,error", [(b"[1, 2]", 422, "validation_error"), (b'"hi"', 422, "validation_error"),
                                               (b"{nope", 400, "invalid_json")])
def test_a_bad_body_is_refused_by_status_and_code(module, path, body, status, error):
    got_status, got = answer(module, path, body)
    assert (got_status, got["error"], got["module"]) == (status, error, module)


def test_an_empty_body_is_an_empty_message():
    status, got = answer("madre", "/madre/chat", b"")
    assert status == 200 and got["response"] == "[madre] you said: "
    status, got = answer("madre", "/madre/chat", b'{"message": "hola"}')
    assert status == 200 and got["response"] == "[madre] you said: hola"


def test_demo_help_tells_the_true_default_host() -> None:
    out = subprocess.run([EDGELINK, "demo", "--help"], capture_output=True, text=True, timeout=60).stdout
    host_help = " ".join(re.search(r"^\s+--host HOST\s+(.*?)^\s+--port", out, re.M | re.S)[1].split())
    assert "127.0.0.1" in host_help and "0.0.0.0" not in host_help


def arrives_live(gw: Any, ws_url: str, body: dict) -> dict:
    """Ingest ``body`` while a WebSocket client is connected to ``ws_url``; the frame it gets."""
    async def live() -> dict:
        async with websockets.connect(ws_url) as ws:
            assert orjson.loads(await ws.recv())["type"] == "connected"
            reply = await asyncio.to_thread(gw.post, "/events/ingest", body)
            assert reply.status == 201
            return orjson.loads(await asyncio.wait_for(ws.recv(), 20))

    return asyncio.run(live())


def test_readme_first_five_minutes(tmp_path: Path) -> None:
    """The README's own lines, against a demo (on its own port instead of 8000): the ingest
    arrives live on the /ws line, and each address it gives answers."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    steps = readme.split("## The first five minutes\n", 1)[1].split("\n## ", 1)[0]
    gw = start_gateway(tmp_path, {"VX11_GATEWAY_TOKEN": "demo-token"}, command="demo")
    try:
        here = steps.replace("127.0.0.1:8000", f"127.0.0.1:{gw.port}")
        for url in re.findall(r"<(http://[^>]+)>", here):
            assert gw.get(url.split(str(gw.port), 1)[1], token=False).status == 200, url
        curl = shlex.split(re.search(r"```sh\n\s*(curl .*?)\n\s*```", here, re.S)[1].replace("\\\n", " "))
        assert curl[-1].endswith("/events/ingest") and "X-VX11-Token: demo-token" in curl
        body = orjson.loads(curl[curl.index("-d") + 1])
        ws_url = re.search(r"'(ws://[^']+)'", here)[1]
        event = arrives_live(gw, ws_url, body)
        assert event["channel"] == "event" and event["payload"] == body["payload"]
        assert "edgelink demo --port" in steps
    finally:
        assert gw.stop() == 0


def test_the_banner_lines_work(tmp_path: Path) -> None:
    """Console and docs addresses, an ingest that arrives live on the printed /ws address,
    and the printed probe line probing the demo's own modules."""
    gw = start_gateway(tmp_path, command="demo")
    try:
        # the banner follows the started line
        text = wait_until(lambda: "Stop with Ctrl-C." in (t := gw.logs()) and t, 20, "the banner")
        base = f"http://127.0.0.1:{gw.port}"
        assert f"console   {base}/console" in text and f"API docs  {base}/docs" in text
        for page in ("/console", "/docs"):
            assert gw.get(page, token=False).status == 200
        ws_url = re.search(r"live events over WebSocket: (\S+)", text)[1]
        assert ws_url == f"ws://127.0.0.1:{gw.port}/ws?token={gw.token}"
        curl = shlex.split(re.search(r"^    (curl .*/events/ingest)$", text, re.M)[1])
        body = orjson.loads(curl[curl.index("-d") + 1])
        assert body["broadcast"] is True

        event = arrives_live(gw, ws_url, body)
        assert event["type"] == "system.alert" and event["payload"]["message"] == "hello from the demo"

        probe, command = re.search(r"probe every module once:  (\S+=\S+) (\S+) probe$", text, re.M).groups()
        assert command == EDGELINK  # as the demo was started
        name, _, path = probe.partition("=")
        env = clean_env()
        ran = subprocess.run([command, "probe"], env={**env, name: path}, capture_output=True, text=True,
                             timeout=120, cwd=tmp_path / "..")
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert ran.stdout.strip().splitlines()[-1] == "10/10 ok"
    finally:
        assert gw.stop() == 0
    assert not Path(path).exists()  # removed when the demo stops
