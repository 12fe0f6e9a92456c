"""What Python 3.11 added and the gateway uses, for Python 3.10 (API.md §8: 3.10 to 3.13).

``tomllib`` is the ``tomli`` backport there (a dependency only below 3.11, pyproject.toml);
``timeout`` is ``asyncio.timeout`` or, on 3.10, a context manager doing what the gateway
needs of it: cancel the block when the delay passes and raise ``TimeoutError`` in its place.
"""

from __future__ import annotations

import asyncio
import sys

if sys.version_info >= (3, 11):
    from asyncio import timeout

    import tomllib
else:
    import tomli as tomllib

    class timeout:  # noqa: N801 - named as asyncio's
        """``async with timeout(delay):`` cancels the block after ``delay`` seconds and raises
        the builtin ``TimeoutError`` (3.10's ``asyncio.wait_for`` raises ``asyncio.TimeoutError``,
        another class there). A cancellation from outside still propagates as itself."""

        __slots__ = ("_delay", "_handle", "_expired")

        def __init__(self, delay: float | None):
            self._delay = delay
            self._handle: asyncio.TimerHandle | None = None
            self._expired = False

        async def __aenter__(self) -> timeout:
            if self._delay is not None:
                task = asyncio.current_task()
                assert task is not None, "timeout() outside a task"
                self._handle = asyncio.get_running_loop().call_later(self._delay, self._expire, task)
            return self

        def _expire(self, task: asyncio.Task) -> None:
            self._expired = True
            task.cancel()

        async def __aexit__(self, exc_type, exc, tb) -> None:
            if self._handle is not None:
                self._handle.cancel()
            if self._expired and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc

__all__ = ["timeout", "tomllib"]
