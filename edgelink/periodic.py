"""A step run every ``interval`` seconds as a task on the running loop (the session sweep).

The pure pieces in ``gateway/`` start no tasks; the runtime runs their periodic steps with
this. A step that raises is logged (``failed_event``) and run again at the next interval:
one bad step must not end it for the life of the process.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from .log import log


class Periodic:
    def __init__(self, name: str, interval: float, step: Callable[[], object], failed_event: str) -> None:
        if interval <= 0:
            raise ValueError("interval must be > 0")
        self.name = name
        self._interval = interval
        self._step = step
        self._failed_event = failed_event
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start running the step; call from inside the running event loop."""
        if self._task is not None:
            raise RuntimeError(f"{self.name} already started")
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        """Stop and wait for the task to end; idempotent."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        # wait() rather than await: the task's CancelledError is expected, while one aimed
        # at our caller must still reach it.
        await asyncio.wait((task,))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                self._step()
            except Exception as exc:
                log.error(self._failed_event, error=repr(exc))
