"""What the kernel says about this process, from ``/proc/self``: the ``process_*`` figures
of the Prometheus client libraries (read once per scrape), and the resident set size the
overload manager reads every 100 ms while busy (one ``pread`` on a descriptor kept open:
one system call, no file object, a few microseconds). The unit's ``ProcSubset=pid`` still
shows both.
"""

from __future__ import annotations

import os
import resource
import time

PAGE = os.sysconf("SC_PAGE_SIZE")


def process_stats() -> dict[str, float]:
    """The process_* figures of the Prometheus client libraries, from /proc/self (which
    the unit's ProcSubset=pid still shows) and the clocks."""
    with open("/proc/self/stat", "rb") as fh:
        fields = fh.read().rpartition(b")")[2].split()
    # after the command name: state is field 3 of proc(5), so field n is fields[n - 3]
    ticks = os.sysconf("SC_CLK_TCK")
    boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    return {
        "cpu": (int(fields[11]) + int(fields[12])) / ticks,
        "start": boot + int(fields[19]) / ticks,
        "vsize": float(fields[20]),
        "rss": float(int(fields[21]) * PAGE),
        "open_fds": float(len(os.listdir("/proc/self/fd"))),
        "max_fds": float(resource.getrlimit(resource.RLIMIT_NOFILE)[0]),
    }


class RssMonitor:
    """The resident set size in bytes, from ``/proc/self/statm`` (its second field, pages)."""

    def __init__(self, path: str = "/proc/self/statm"):
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def read(self) -> int:
        return int(os.pread(self._fd, 128, 0).split()[1]) * PAGE

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
