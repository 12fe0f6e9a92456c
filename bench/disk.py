"""The disk's own floor under a durable commit: how long ``fsync`` of a small write takes in
the directory the ledger lives in, written the way a commit at about 1,000 events/s writes.

A ``synchronous=FULL`` commit cannot be faster than this: on a disk (or a virtual one) whose
``fsync`` stalls for tens of milliseconds now and then, every event waiting for that commit
waits too, whatever the gateway does. The figure is measured in the same run as the ingest
latencies so that the two can be read side by side.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

WRITE = b"x" * 1024  # about one event's WAL frame
PAUSE = 0.001  # seconds between commits: the cadence of the paced ingest run


def fsync_floor(directory: Path, seconds: float) -> dict[str, Any]:
    """Append 1 KiB and fsync it, again and again for ``seconds``; the latency percentiles in ms."""
    path = directory / "fsync-floor.tmp"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    took = []
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            os.write(fd, WRITE)
            started = time.perf_counter()
            os.fsync(fd)
            took.append((time.perf_counter() - started) * 1000)
            time.sleep(PAUSE)
    finally:
        os.close(fd)
        path.unlink()
    took.sort()
    n = len(took)
    return {"directory": str(directory), "fsyncs": n, "p50_ms": took[n // 2], "p99_ms": took[int(n * 0.99)],
            "p999_ms": took[int(n * 0.999)], "max_ms": took[-1]}


def tmpfs_directory() -> Path | None:
    """``/dev/shm`` when it is a writable tmpfs (memory: fsync is free there), else None."""
    shm = Path("/dev/shm")
    try:
        with open("/proc/mounts") as mounts:
            tmpfs = any(line.split()[1:3] == [str(shm), "tmpfs"] for line in mounts)
    except OSError:
        return None
    return shm if tmpfs and os.access(shm, os.W_OK) else None
