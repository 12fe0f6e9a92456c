"""The servers under test. A ``Target`` is a command and extra environment; ``ServerProcess``
runs one on a free loopback port, times its start-up and stops it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from edgelink.config import KNOBS, MODULE_DEFAULTS

from . import BenchError
from .httpclient import HttpConnection

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0
PROBE_TIMEOUT = 1.0
STOP_GRACE = 15.0
LOG_TAIL = 3000


@dataclass(frozen=True)
class Target:
    name: str
    argv: tuple[str, ...]  # "{host}" and "{port}" are filled in at start
    env: Mapping[str, str] = field(default_factory=dict)


def _edgelink_script() -> str:
    """The ``edgelink`` console script next to this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).with_name("edgelink")
    return str(beside) if beside.exists() else shutil.which("edgelink") or "edgelink"


TARGETS: dict[str, Target] = {
    "edgelink": Target("edgelink", (_edgelink_script(), "serve", "--host", "{host}", "--port", "{port}")),
    "reference": Target("reference", (sys.executable, "-m", "bench.reference", "--host", "{host}", "--port", "{port}")),
}


# Every setting variable is cleared from the inherited environment so that both servers see
# exactly what the harness sets, except the ledger sync mode, which a user may choose to compare.
PASSED_THROUGH = {"EDGELINK_LEDGER_SYNC"}
SETTING_NAMES = ({name for knob in KNOBS for name in knob.env}
                 | {env_name for _, env_name, _ in MODULE_DEFAULTS}) - PASSED_THROUGH


def server_env(settings: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any setting variable, plus ``settings``."""
    env = {name: value for name, value in os.environ.items() if name not in SETTING_NAMES}
    env.update(settings)
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class ServerProcess:
    """One target running as a subprocess (its own session, so its whole group is stopped)."""

    def __init__(self, target: Target, env: Mapping[str, str], log_path: Path) -> None:
        self.target = target
        self._env = {**env, **target.env}
        self._log_path = log_path
        self._proc: asyncio.subprocess.Process | None = None
        self.port = free_port()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_tail(self) -> str:
        try:
            return self._log_path.read_text(errors="replace")[-LOG_TAIL:]
        except OSError:
            return ""

    async def start(self) -> float:
        """Spawn the server and return the seconds until its first 200 on ``/health``."""
        argv = [arg.format(host=HOST, port=self.port) for arg in self.target.argv]
        started = time.perf_counter()
        with open(self._log_path, "wb") as log:
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *argv, cwd=REPO, env=self._env, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                raise BenchError(f"{self.target.name}: cannot run {argv[0]}: {exc}") from None
        while time.perf_counter() - started < START_TIMEOUT:
            if self._proc.returncode is not None:
                raise BenchError(f"{self.target.name} exited with status {self._proc.returncode} "
                                 f"before answering /health:\n{self.log_tail()}")
            probe = HttpConnection(HOST, self.port)
            try:
                status, _ = await asyncio.wait_for(probe.request("GET", "/health"), PROBE_TIMEOUT)
                if status == 200:
                    return time.perf_counter() - started
            except (OSError, TimeoutError, BenchError):
                pass  # not listening, or not answering, yet
            finally:
                await probe.close()
            await asyncio.sleep(0.01)
        raise BenchError(f"{self.target.name} gave no 200 on /health within {START_TIMEOUT:.0f} s:\n{self.log_tail()}")

    async def stop(self) -> None:
        """SIGTERM the server's process group, then SIGKILL it if it outlives the grace period."""
        if self._proc is None or self._proc.returncode is not None:
            return
        os.killpg(self._proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self._proc.wait(), STOP_GRACE)
        except TimeoutError:
            os.killpg(self._proc.pid, signal.SIGKILL)
            await self._proc.wait()
