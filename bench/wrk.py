"""HTTP load with ``wrk``: a generated Lua script sets method, headers and body, and its
``done`` hook prints wrk's latency distribution as one JSON line that we parse.

Without a think time every connection sends its next request as soon as the answer is in
(closed loop at saturation). With ``think_ms`` the script defines wrk's ``delay`` hook, so
that each connection waits a random time (exponential, that mean, in whole milliseconds)
after every answer: a paced load of about ``connections * 1000 / think_ms`` requests/s.
wrk starts a request's latency clock after the delay, so think time is not counted as latency.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any

from . import BenchError

PERCENTILES = (50, 75, 90, 95, 99, 99.9)
RESULT_MARK = "BENCH_RESULT "
# One wrk thread: the server under test needs the other core of a two-core box.
THREADS = 1
TIMEOUT = "10s"

DONE_HOOK = """
done = function(summary, latency, requests)
  local parts = {}
  for _, p in ipairs({%(percentiles)s}) do
    parts[#parts + 1] = string.format('"%%g": %%d', p, latency:percentile(p))
  end
  local e = summary.errors
  io.write(string.format(
    '%(mark)s{"requests": %%d, "duration_us": %%d, "max_us": %%d, "percentiles_us": {%%s}, '
    .. '"errors": {"connect": %%d, "read": %%d, "write": %%d, "status": %%d, "timeout": %%d}}\\n',
    summary.requests, summary.duration, latency.max, table.concat(parts, ", "),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""

# Exponential think times: independent clients, so arrivals are close to Poisson and the
# connections do not march in step (a fixed delay would make the first round one burst).
DELAY_HOOK = """
local think_ms = %(think_ms)r
delay = function()
  return math.floor(-think_ms * math.log(1 - math.random()) + 0.5)
end
"""


@dataclass(frozen=True)
class Load:
    """One request, repeated by every wrk connection."""

    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: str | None = None
    think_ms: float | None = None  # mean wait after each answer, per connection; None = saturation

    def paced(self, think_ms: float) -> Load:
        return replace(self, think_ms=think_ms)

    def lua(self) -> str:
        lines = [f'wrk.method = "{self.method}"']
        lines += [f'wrk.headers["{name}"] = "{value}"' for name, value in self.headers.items()]
        if self.body is not None:
            lines.append(f"wrk.body = [==[{self.body}]==]")  # a long string: no escapes needed
        if self.think_ms is not None:
            lines.append(DELAY_HOOK % {"think_ms": float(self.think_ms)})
        percentiles = ", ".join(f"{p:g}" for p in PERCENTILES)
        return "\n".join(lines) + DONE_HOOK % {"percentiles": percentiles, "mark": RESULT_MARK}


@dataclass(frozen=True)
class WrkResult:
    connections: int
    requests: int
    seconds: float
    percentiles_ms: dict[str, float]
    max_ms: float
    errors: dict[str, int]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def as_dict(self) -> dict[str, Any]:
        return {"connections": self.connections, "requests": self.requests, "seconds": self.seconds, "rps": self.rps,
                "percentiles_ms": self.percentiles_ms, "max_ms": self.max_ms, "errors": self.errors}


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise BenchError("wrk is not installed (apt-get install -y wrk)")
    return path


async def run_wrk(base_url: str, load: Load, connections: int, duration: float) -> WrkResult:
    """Run wrk against ``base_url + load.path``; the event loop keeps running meanwhile."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(load.lua())
        script.flush()
        proc = await asyncio.create_subprocess_exec(
            wrk_path(), "--latency", "-t", str(THREADS), "-c", str(connections), "-d", f"{duration:g}s",
            "--timeout", TIMEOUT, "-s", script.name, base_url + load.path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await proc.communicate()
        finally:
            if proc.returncode is None:  # the run was cancelled
                proc.kill()
                await proc.wait()
    text = out.decode(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith(RESULT_MARK)), None)
    if proc.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({proc.returncode}): {err.decode(errors='replace')}{text}")
    raw = json.loads(line[len(RESULT_MARK):])
    if raw["requests"] == 0:
        raise BenchError(f"wrk completed no request on {load.method} {load.path}: {raw['errors']}")
    return WrkResult(
        connections=connections,
        requests=raw["requests"],
        seconds=raw["duration_us"] / 1e6,
        percentiles_ms={p: us / 1000 for p, us in raw["percentiles_us"].items()},
        max_ms=raw["max_us"] / 1000,
        errors=raw["errors"],
    )
