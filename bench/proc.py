"""What ``/proc`` says about a server and its descendants: resident memory (VmRSS) and CPU time.

``RssSampler`` polls in a thread so that a busy harness event loop (1,000 WebSocket clients)
cannot delay the samples.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

MIB = 1024 * 1024
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name, or None if it has ended."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None


def _tree(pid: int) -> Iterator[int]:
    """``pid`` and every descendant."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))) is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry))
    pending = [pid]
    while pending:
        current = pending.pop()
        yield current
        pending.extend(parents.get(current, ()))


def _vmrss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0  # ended, or a zombie without memory


def rss_bytes(pid: int) -> int:
    """VmRSS of ``pid`` plus that of every descendant, in bytes."""
    return sum(_vmrss(p) for p in _tree(pid))


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time used so far by ``pid`` and its descendants."""
    ticks = 0
    for p in _tree(pid):
        if (fields := _stat_fields(p)) is not None:
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / CLOCK_TICKS


class CpuClock:
    """CPU seconds spent by the server and by this harness since the clock was made."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._server = cpu_seconds(pid)
        self._harness = time.process_time()

    def elapsed(self) -> dict[str, float]:
        return {"server_cpu_s": cpu_seconds(self._pid) - self._server,
                "harness_cpu_s": time.process_time() - self._harness}


class RssSampler:
    """Samples ``rss_bytes(pid)`` every ``interval`` seconds while its ``with`` block runs."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self._pid = pid
        self._interval = interval
        self._samples: list[tuple[float, int]] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._samples.append((time.monotonic(), rss_bytes(self._pid)))
            self._stopping.wait(self._interval)

    def peak(self, since: float = 0.0) -> int:
        """The largest sample taken at or after ``since`` (a ``time.monotonic()`` value)."""
        return max((rss for t, rss in self._samples if t >= since), default=0)
