"""What the operator console costs: bytes on the wire and the gateway's resident memory.

Starts ``edgelink demo`` on a free loopback port, opens ``/console`` in the system's headless
Chromium (Playwright, ``/usr/bin/chromium``), signs in, ingests a few events and lets the
page refresh. Prints the page's transfer size (every response of the page load, headers and
encoded bodies, gzip as the browser asks for it), the same for ``/docs``, and the gateway's
VmRSS growth over ``--seconds`` with the console open, beside that of a second, fresh demo
that gets the same events with no page open. With ``--screenshots DIR`` it also writes the
console at 360 and 1280 px (the README's picture) and its timeline (docs/timeline.png).

    .venv/bin/python bench/console_weight.py [--seconds 30] [--screenshots docs]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import orjson
from playwright.sync_api import sync_playwright

from proc import MIB, rss_bytes

ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "bench-console-token"


def start_demo(workdir: Path) -> tuple[subprocess.Popen, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGELINK_", "VX11_"))}
    env.update(VX11_GATEWAY_TOKEN=TOKEN, EDGELINK_DB=str(workdir / "demo.db"), EDGELINK_PROBE_INTERVAL="2")
    log = open(workdir / "demo.log", "wb")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("edgelink")), "demo", "--port", "0"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for line in (workdir / "demo.log").read_bytes().splitlines():
            if line.startswith(b"{") and (rec := orjson.loads(line)).get("event") == "started":
                return proc, rec["port"]
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("edgelink demo did not start")


def ingest(port: int, body: dict) -> str:
    """The event's id."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/events/ingest", data=orjson.dumps(body),
                                 headers={"X-VX11-Token": TOKEN, "Content-Type": "application/json"})
    return orjson.loads(urllib.request.urlopen(req, timeout=10).read())["event_id"]


def some_events(port: int) -> None:
    """Alerts sharing a correlation id, one from a module whose clock is 1.5 s ahead, and a
    correlation update naming two of them, so the graph and the timeline have links."""
    ids = []
    for n in range(4):
        ids.append(ingest(port, {"source": "madre", "type": "system.alert", "broadcast": True,
                                 "metadata": {"correlation_id": "incident-7"},
                                 "payload": {"alert_id": f"a-{n}", "severity": "high" if n % 2 else "low",
                                             "message": f"disk {80 + n}% full", "timestamp": int(time.time() * 1000)}}))
        time.sleep(0.4)
    ids.append(ingest(port, {"source": "switch", "type": "switch.tension.updated", "broadcast": True,
                             "metadata": {"correlation_id": "incident-7"},
                             "payload": {"value": 3, "components": {"cpu": 2, "io": 1},
                                         "timestamp": int(time.time() * 1000) + 1500}}))
    ingest(port, {"source": "hormiguero", "type": "system.correlation.updated", "broadcast": True,
                  "payload": {"correlation_id": "incident-7-review", "related_events": [ids[1], ids[-1]],
                              "strength": 0.8, "timestamp": int(time.time() * 1000)}})


def transfer(page, url: str, ready: str, sign_in: bool) -> int:
    """Bytes of every response the page loads until ``ready`` is shown."""
    responses: list = []

    def finished(request) -> None:
        responses.append(request)

    page.on("requestfinished", finished)
    page.goto(url)
    if sign_in:
        page.fill("#token", TOKEN)
        page.press("#token", "Enter")
    page.wait_for_selector(ready, timeout=30_000)
    page.wait_for_load_state("networkidle")
    total = 0
    for r in responses:
        sizes = r.sizes()
        total += sizes["responseBodySize"] + sizes["responseHeadersSize"]
    page.remove_listener("requestfinished", finished)
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--screenshots", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_demo(Path(tmp))
        try:
            time.sleep(3)
            idle_before = rss_bytes(proc.pid) / MIB
            some_events(port)
            time.sleep(args.seconds)
            idle_after = rss_bytes(proc.pid) / MIB
        finally:
            proc.terminate()
            proc.wait(30)
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_demo(Path(tmp))
        base = f"http://127.0.0.1:{port}"
        try:
            time.sleep(3)  # a couple of probe rounds recorded
            before = rss_bytes(proc.pid) / MIB
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                console_bytes = transfer(page, f"{base}/console", "#modules article svg", True)
                some_events(port)
                page.wait_for_timeout(args.seconds * 1000)
                after = rss_bytes(proc.pid) / MIB
                if args.screenshots:
                    args.screenshots.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(args.screenshots / "console.png"), full_page=True)
                    some_events(port)  # fresh ones: the timeline's 30 s span ends now
                    page.select_option("#tl-zoom", "30")
                    page.wait_for_timeout(1000)
                    page.locator("#timeline-section").screenshot(path=str(args.screenshots / "timeline.png"))
                    page.set_viewport_size({"width": 360, "height": 800})
                    page.screenshot(path=str(args.screenshots / "console-360.png"), full_page=True)
                docs = browser.new_page(viewport={"width": 1280, "height": 900})
                docs_bytes = transfer(docs, f"{base}/docs", "#operations details", False)
                browser.close()
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"console page load: {console_bytes / 1024:.1f} KiB transferred (gzip)")
    print(f"docs page load:    {docs_bytes / 1024:.1f} KiB transferred (gzip, /openapi.json included)")
    print(f"gateway VmRSS over {args.seconds:.0f} s: {before:.1f} -> {after:.1f} MiB ({after - before:+.2f}) with the "
          f"console open; {idle_before:.1f} -> {idle_after:.1f} MiB ({idle_after - idle_before:+.2f}) without")
    return 0


if __name__ == "__main__":
    sys.exit(main())
