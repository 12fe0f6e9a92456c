"""The systemd unit's start and reload, as the unprivileged user it runs as.

systemd is not PID 1 on the test machine, so this does what it would: read
``EnvironmentFile=`` as root, set ``Environment=``, then run ``ExecStart=`` (and later each
``ExecReload=``) as a uid that is not root and has the unit's ``SupplementaryGroups=``, in a
copy of the installed layout (/etc/edgelink root:edgelink 0750/0640, the state directory
owned by the service uid). Without the group, the same start must fail: that is the bug the
unit's layout fixes (the gateway reads the env file itself, and root's 0640 file is EACCES).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from conftest import log_records, wait_for_log
from edgelink.config import read_env_file
from test_deploy_files import ENV_EXAMPLE, SYSTEMD, unit_entries

UNIT = SYSTEMD / "edgelink.service"
SETPRIV = shutil.which("setpriv")
INSTALLED_PREFIX = "/opt/edgelink/bin/"

pytestmark = [
    pytest.mark.skipif(SETPRIV is None, reason="setpriv (util-linux) is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="switching to the service uid needs root"),
]


def _unused_id(taken: set[int], start: int) -> int:
    n = start
    while n in taken:
        n += 1
    return n


def _ids() -> tuple[int, int]:
    """A uid in systemd's DynamicUser= range and a gid for the static group, both unused."""
    uids = {int(line.split(":")[2]) for line in Path("/etc/passwd").read_text().splitlines() if line.count(":") >= 3}
    gids = {int(line.split(":")[2]) for line in Path("/etc/group").read_text().splitlines() if line.count(":") >= 3}
    return _unused_id(uids, 61184 + os.getpid() % 1000), _unused_id(gids, 60900)


class Installed:
    """The README's install, laid out under a temporary root instead of /."""

    def __init__(self, root: Path, uid: int, gid: int, token: str):
        self.root, self.uid, self.gid = root, uid, gid
        self.etc = root / "etc" / "edgelink"
        self.state = root / "var" / "lib" / "edgelink"
        self.etc.mkdir(parents=True)
        os.chmod(self.etc, 0o750)
        os.chown(self.etc, 0, gid)
        self.state.mkdir(parents=True)  # StateDirectory=: created by systemd, owned by the service
        os.chmod(self.state, 0o700)
        os.chown(self.state, uid, uid)
        example = ENV_EXAMPLE.read_text()
        self.write_env(example.replace("VX11_TENTACULO_LINK_TOKEN=\n", f"VX11_TENTACULO_LINK_TOKEN={token}\n")
                       + "EDGELINK_PROBE_INTERVAL=0\n")
        # port 0: this machine's tests never use fixed ports
        self.write(self.etc / "edgelink.toml", 'host = "127.0.0.1"\nport = 0\n')

    def write(self, path: Path, text: str) -> None:
        """As the README installs it: root:edgelink 0640."""
        path.write_text(text)
        os.chown(path, 0, self.gid)
        os.chmod(path, 0o640)

    def write_env(self, text: str) -> None:
        self.write(self.etc / "edgelink.env", text)

    def path(self, value: str) -> str:
        """A path of the unit, in this layout."""
        value = value.replace("/etc/edgelink/", f"{self.etc}/").replace("/var/lib/edgelink", str(self.state))
        # the installed console script is this venv's
        return value.replace(INSTALLED_PREFIX, f"{Path(sys.executable).parent}/")


@pytest.fixture
def installed() -> Iterator[Installed]:
    # Not under pytest's tmp_path: that is root's 0700 directory, which the service uid
    # could not even traverse.
    root = Path(tempfile.mkdtemp(prefix="edgelink-unit-"))
    os.chmod(root, 0o755)
    uid, gid = _ids()
    try:
        yield Installed(root, uid, gid, "unit-token-one")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _unit_environment(unit: dict[str, list[str]], inst: Installed) -> dict[str, str]:
    """What systemd hands ExecStart=: a clean environment, EnvironmentFile= (read as root),
    then Environment=, each value in the test layout."""
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    for path in unit.get("Service.EnvironmentFile", []):
        env.update(read_env_file(inst.path(path.lstrip("-"))))
    for line in unit.get("Service.Environment", []):
        for assignment in shlex.split(line):
            key, _, value = assignment.partition("=")
            env[key] = inst.path(value)
    return env


def _as_service(unit: dict[str, list[str]], inst: Installed, with_group: bool = True) -> list[str]:
    """setpriv as systemd would run the unit: its uid, no capabilities, no new privileges."""
    groups = unit.get("Service.SupplementaryGroups", [])
    assert groups == ["edgelink"]
    return [SETPRIV, f"--reuid={inst.uid}", f"--regid={inst.uid}",
            f"--groups={inst.gid}" if with_group else "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]


def _start(unit: dict[str, list[str]], inst: Installed, log_path: Path, with_group: bool = True) -> subprocess.Popen:
    (exec_start,) = unit["Service.ExecStart"]
    argv = [inst.path(arg) for arg in shlex.split(exec_start)]
    env = _unit_environment(unit, inst)
    with open(log_path, "wb") as log:
        return subprocess.Popen([*_as_service(unit, inst, with_group), *argv], env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=inst.path(unit["Service.WorkingDirectory"][0]))


def _reload(unit: dict[str, list[str]], inst: Installed, pid: int) -> None:
    """Each ExecReload= line, as the service uid, with $MAINPID set (as systemd does)."""
    env = {**_unit_environment(unit, inst), "MAINPID": str(pid)}
    for line in unit["Service.ExecReload"]:
        argv = [inst.path(arg.replace("$MAINPID", str(pid))) for arg in shlex.split(line.lstrip("-+@!:"))]
        proc = subprocess.run([*_as_service(unit, inst), *argv], env=env, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, (line, proc.stdout, proc.stderr)


def _get(port: int, path: str, token: str | None) -> int:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"X-VX11-Token": token} if token else {})
        return conn.getresponse().status
    finally:
        conn.close()


def test_unit_starts_and_reloads_as_its_unprivileged_user(installed, tmp_path):
    unit = unit_entries(UNIT)
    log_path = tmp_path / "unit.log"
    proc = _start(unit, installed, log_path)
    try:
        started = wait_for_log(log_path, "started", proc)
        port = started["port"]
        status = Path(f"/proc/{proc.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == [str(installed.uid)] * 4  # really not root
        assert _get(port, "/vx11/routes", "unit-token-one") == 200
        # the ledger went to the state directory, owned by the service uid
        assert (installed.state / "edgelink.db").stat().st_uid == installed.uid

        # Edit the root-owned env file (a new token) and reload as systemd would.
        installed.write_env((installed.etc / "edgelink.env").read_text().replace("unit-token-one", "unit-token-two"))
        seen = len(log_records(log_path))
        _reload(unit, installed, proc.pid)
        wait_for_log(log_path, "reloaded", proc, 20, seen)
        assert _get(port, "/vx11/routes", "unit-token-one") == 403
        assert _get(port, "/vx11/routes", "unit-token-two") == 200
        assert not [r for r in log_records(log_path) if r["event"] == "reload_refused"]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_without_the_group_the_service_user_cannot_read_the_env_file(installed, tmp_path):
    """The failure the unit's group prevents: the gateway reads the env file itself."""
    unit = unit_entries(UNIT)
    log_path = tmp_path / "unit.log"
    proc = _start(unit, installed, log_path, with_group=False)
    try:
        assert proc.wait(30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log_path.read_text()
    assert "cannot read environment file" in output and "Permission denied" in output, output
