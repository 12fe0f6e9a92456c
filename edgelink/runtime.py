"""The gateway's live state, shared by every handler as ``request.app``.

It owns the pieces that outlive a request (settings, metrics, module clients, sessions,
the ledger, the WebSocket hub) and starts and stops them in order.
"""

from __future__ import annotations

import time

from .config import Settings
from .gateway.metrics import Registry
from .gateway.observe import CardinalityCounter, CorrelationGraph
from .http.router import Router
from .hub import Hub
from .ledger import Ledger


class Runtime:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.metrics = Registry()
        self.stopping = False
        self.started_at = time.time()
        self.port = settings.port  # the port actually bound, set once listening
        self.ledger = Ledger.from_settings(settings)
        self.hub = Hub(self.metrics, settings.ws_queue)
        self.cardinality = CardinalityCounter(time.time)
        self.correlations = CorrelationGraph(time.time)
        self.router: Router | None = None  # set by serve(); /openapi.json describes it
        self.openapi_cache: bytes | None = None

    async def start(self) -> None:
        """Open what the handlers need before the first request."""
        await self.ledger.start()

    async def stop(self) -> None:
        """Flush and close, after the server has stopped serving."""
        await self.ledger.close()

    def apply(self, settings: Settings) -> None:
        """Take reloaded settings: tokens, CORS, limits and routes are read per request."""
        self.settings = settings
