"""Large short-lived buffers go back to the system when freed (glibc malloc tuning), and
what an overload freed is given back at once (``trim``).

glibc serves allocations of 128 KiB and more with mmap, but raises that threshold to the
size of each such block freed (up to 32 MiB): after the first 1 MiB request body is
freed, every later one comes from the heap, which a few concurrent megabyte bodies
fragment so that it never shrinks. Measured with 3 concurrent chats of ~1 MB: peak RSS
82 MiB and staying there, against 53 MiB falling back to 49 MiB with a fixed threshold.
A fixed threshold also stops the dynamic adjustment; blocks of 256 KiB and more are rare
on the hot path, so their mmap/munmap costs nothing measurable. An explicit
``MALLOC_MMAP_THRESHOLD_`` in the environment wins.
"""

from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # mallopt parameter number, from glibc's malloc.h
MMAP_THRESHOLD = 256 * 1024


def return_big_buffers() -> bool:
    """Fix the mmap threshold; False where the C library has no ``mallopt`` (not glibc)
    or the environment sets it already."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def trim() -> bool:
    """Give free heap memory back to the system (glibc's ``malloc_trim(0)``); False where the
    C library has none, or nothing could be given back."""
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim.argtypes = (ctypes.c_size_t,)
    return bool(malloc_trim(0))
