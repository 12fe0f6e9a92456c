"""What users install: check the built wheel and sdist, then run the demo from the wheel.

Run by the interpreter of a clean venv that has only the wheel installed (and its
dependencies), from a directory outside the checkout, as .ci/run does:

    python3 -m venv --clear /tmp/w && /tmp/w/bin/pip install dist/edgelink-*.whl
    (cd /tmp && /tmp/w/bin/python CHECKOUT/.ci/artifact_check.py CHECKOUT/dist)

Standard library only: nothing of the test extra is in that venv.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

# the installed wheel's own list of console files
from edgelink.api.console import ASSETS

DEMO_TOKEN = "demo-token"  # edgelink/demo.py's default


def one(dist: Path, pattern: str) -> Path:
    (found,) = dist.glob(pattern)
    return found


def check_contents(dist: Path) -> None:
    wheel = one(dist, "edgelink-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for asset in ("index.html", "docs.html", *ASSETS):
        assert f"edgelink/console/{asset}" in names, f"{wheel.name} lacks the console's {asset}"
    assert not [n for n in names if n.startswith(("tests/", "bench/"))], "tests or bench in the wheel"

    sdist = one(dist, "edgelink-*.tar.gz")
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        members = {name.partition("/")[2] for name in tar.getnames()}
    for required in ("pyproject.toml", "README.md", "MANIFEST.in", "Containerfile",
                     "systemd/edgelink.service", "systemd/edgelink.socket", "systemd/edgelink.sysusers",
                     "systemd/edgelink.env.example", "docs/deploy-systemd.md",
                     "tests/conftest.py", "tests/fakemodule.py", "tests/test_systemd_boot.py",
                     "edgelink/console/index.html"):
        assert required in members, f"{sdist.name} lacks {required}"
    assert not [m for m in members if "__pycache__" in m or m.startswith("bench/results/")], "build debris in the sdist"
    print(f"artifact: {wheel.name} ({len(names)} files), {sdist.name} ({len(members)} files, top {top})")


def request(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"X-VX11-Token": DEMO_TOKEN}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def demo_smoke() -> None:
    """``edgelink demo`` from the installed wheel: health, console and docs pages, one ingest."""
    edgelink = Path(sys.executable).with_name("edgelink")
    here = subprocess.run([sys.executable, "-c", "import edgelink; print(edgelink.__file__)"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert "site-packages" in here, f"edgelink imported from {here}, not from the installed wheel"
    with tempfile.TemporaryDirectory() as work:
        log_path = Path(work) / "demo.log"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "EDGELINK_DB": f"{work}/demo.db",
               "EDGELINK_PROBE_INTERVAL": "0"}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([str(edgelink), "demo", "--port", "0"], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, cwd=work)
        try:
            port = None
            deadline = time.monotonic() + 60
            while port is None:
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                for line in log_path.read_text().splitlines():
                    if line.startswith("{") and json.loads(line).get("event") == "started":
                        port = json.loads(line)["port"]
                time.sleep(0.1)
            status, body = request(port, "GET", "/health")
            assert status == 200, (status, body)
            for page, marker in (("/console", b"<html"), ("/docs", b"<html"), ("/console/app.css", b"{")):
                status, body = request(port, "GET", page)
                assert status == 200 and marker in body.lower(), (page, status, body[:200])
            status, body = request(port, "GET", "/openapi.json")
            assert status == 200 and json.loads(body)["paths"], (status, body[:200])
            status, body = request(port, "POST", "/events/ingest",
                                   {"source": "wheel-smoke", "type": "custom.note", "payload": {"n": 1}})
            assert status == 201, (status, body)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    print(f"artifact: the demo from {here} served /health, /console, /docs, /openapi.json and an ingest")


if __name__ == "__main__":
    check_contents(Path(sys.argv[1]))
    demo_smoke()
