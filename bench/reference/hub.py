"""The reference peer's WebSocket clients and broadcast, as in FastAPI's ConnectionManager recipe."""

from __future__ import annotations

from starlette.websockets import WebSocket, WebSocketDisconnect


class Hub:
    def __init__(self) -> None:
        self._clients: set[WebSocket] = set()

    def add(self, websocket: WebSocket) -> None:
        self._clients.add(websocket)

    def discard(self, websocket: WebSocket) -> None:
        self._clients.discard(websocket)

    async def broadcast(self, text: str) -> None:
        """Send one frame to every client in turn; a client that has gone away is dropped."""
        for websocket in list(self._clients):
            try:
                await websocket.send_text(text)
            except (WebSocketDisconnect, RuntimeError):
                self._clients.discard(websocket)
