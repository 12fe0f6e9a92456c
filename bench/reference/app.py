"""The reference peer's FastAPI application: health, module status, event ingest and ``/ws``.

Error bodies follow API.md §1 (``{"error", "status_code", ...}``) through exception
handlers; auth is a dependency on ``X-VX11-Token``; the ledger write runs on one dedicated
writer thread (a single-worker executor: SQLite takes one writer at a time anyway, so a
pool of threads would only queue on a lock); broadcasts go to each WebSocket client in turn.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from functools import partial
from typing import Annotated, Any

import httpx
from fastapi import Depends, FastAPI, Header, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from edgelink import __version__
from edgelink.config import Settings

from .correlation import CorrelationMiddleware
from .hub import Hub
from .ledger import Ledger
from .schemas import CANONICAL, EventIn
from .status import ProbeRounds

ERROR_CODES = {
    400: "bad_request", 401: "auth_required", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 413: "payload_too_large",
}
INVALID_JSON_FRAME = json.dumps({"channel": "control", "type": "error", "error": "invalid_json"})


def error_response(status_code: int, code: str | None = None, headers: dict[str, str] | None = None,
                   **extra: Any) -> JSONResponse:
    body = {"error": code or ERROR_CODES.get(status_code, "error"), "status_code": status_code, **extra}
    return JSONResponse(body, status_code=status_code, headers=headers)


def iso_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def create_app(settings: Settings) -> FastAPI:
    ledger = Ledger(settings.db, settings.ledger_sync)
    hub = Hub()
    health_body = {"status": "ok", "module": "tentaculo_link", "version": "7.0", "edgelink": __version__}
    ports = {m.name: m.port for m in settings.modules} | {"tentaculo_link": settings.port, "gateway": settings.port}

    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(writer, ledger.open)
        try:
            async with httpx.AsyncClient(timeout=settings.health_timeout) as client:
                app.state.probes = ProbeRounds(client, settings.modules, settings.token)
                try:
                    yield
                finally:
                    await app.state.probes.close()
        finally:
            await loop.run_in_executor(writer, ledger.close)
            writer.shutdown()

    app = FastAPI(title="Tentáculo Link (FastAPI reference)", version="7.0", lifespan=lifespan,
                  max_body_size=settings.max_body)
    app.add_middleware(CorrelationMiddleware)

    def check_token(supplied: str | None) -> None:
        if not settings.enable_auth:
            return
        if not supplied:
            raise HTTPException(401)
        if not hmac.compare_digest(supplied.encode(), settings.token.encode()):
            raise HTTPException(403)

    async def require_token(x_vx11_token: Annotated[str | None, Header()] = None) -> None:
        check_token(x_vx11_token)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e["type"] == "json_invalid" for e in errors):
            return error_response(400, "invalid_json")
        return error_response(422, "validation_error",
                              detail=[{"loc": list(e["loc"]), "msg": e["msg"]} for e in errors])

    @app.get("/health")
    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return health_body

    @app.get("/vx11/status")
    @app.get("/v1/status")
    async def status(request: Request) -> dict[str, Any]:
        modules = await request.app.state.probes.health()
        counted = [h for h in modules.values() if h["status"] != "disabled"]
        healthy = sum(h["status"] == "ok" for h in counted)
        return {
            "ok": True, "status": "ok", "module": "tentaculo_link", "version": "7.0",
            "timestamp": iso_now(), "ports": ports, "modules": modules,
            "summary": {"healthy_modules": healthy, "total_modules": len(counted),
                        "all_healthy": healthy == len(counted)},
        }

    @app.post("/events/ingest", status_code=201, dependencies=[Depends(require_token)])
    async def ingest(event: EventIn) -> Any:
        schema = CANONICAL.get(event.type)
        if schema is not None:
            try:
                schema.model_validate(event.payload)
            except ValidationError as exc:
                first = exc.errors()[0]
                rule = ".".join(str(part) for part in ("payload", *first["loc"]))
                return error_response(422, "validation_error", status="rejected",
                                      reason="schema_validation_failed", source=event.source,
                                      type=event.type, detail=f"{rule}: {first['msg']}")
        canonical = schema is not None
        broadcast = canonical and event.broadcast
        stored = await asyncio.get_running_loop().run_in_executor(
            writer, partial(ledger.append, event.source, event.type, event.payload, event.metadata,
                            canonical=canonical, broadcast=broadcast))
        if broadcast:
            await hub.broadcast(stored.frame())
        return {"status": "received", "event_id": stored.event_id, "seq": stored.seq,
                "source": event.source, "type": event.type, "canonical": canonical, "broadcast": broadcast}

    @app.websocket("/ws")
    async def events_socket(websocket: WebSocket, token: str | None = None, client_id: str | None = None) -> None:
        try:
            check_token(token or websocket.headers.get("x-vx11-token"))
        except HTTPException as exc:
            await websocket.send_denial_response(error_response(exc.status_code))
            return
        await websocket.accept()
        # Registered before the connected frame, as edgelink does: no broadcast committed after
        # the last_seq the frame reports can miss this client.
        hub.add(websocket)
        try:
            await websocket.send_text(json.dumps({
                "channel": "control", "type": "connected", "client_id": client_id or uuid.uuid4().hex,
                "last_seq": ledger.last_seq, "replayed": 0, "truncated": False,
            }))
            while True:
                text = await websocket.receive_text()
                try:
                    json.loads(text)
                except ValueError:
                    await websocket.send_text(INVALID_JSON_FRAME)
                else:
                    await websocket.send_text(text)
        except WebSocketDisconnect:
            pass
        finally:
            hub.discard(websocket)

    return app
