"""GET /health and /v1/health (API.md §2): answered from memory, never from a module; and the
recorded probe history (API.md §7)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from .. import __version__
from ..http.messages import HTTPError, Request, Response, json_response, validation_error
from ..probe import GATEWAY_SERVICE

if TYPE_CHECKING:
    from ..runtime import Runtime

DEFAULT_HISTORY = 500  # points; API.md §7
MAX_HISTORY = 5000
MAX_MS = 2**53  # the bound api/events.py puts on epoch milliseconds

_BODY = {"status": "ok", "module": "tentaculo_link", "version": "7.0", "edgelink": __version__}
_OK = orjson.dumps(_BODY)
_STOPPING = orjson.dumps({**_BODY, "status": "stopping", "error": "stopping", "status_code": 503})


async def health(req: Request[Runtime]) -> Response:
    if req.runtime.stopping:
        return Response(503, _STOPPING)
    return Response(200, _OK)


async def history(req: Request[Runtime]) -> Response:
    """GET /vx11/health/history (API.md §7): one module's recorded probes, oldest first."""
    rt = req.runtime
    module = req.query.get("module")
    if not module:
        raise validation_error((["query", "module"], "field required"))
    if module != GATEWAY_SERVICE and module not in {m.name for m in rt.settings.modules}:
        raise HTTPError(404, "not_found", detail=f"unknown module {module!r}")
    since = req.int_query("since", 0, 0, MAX_MS)
    limit = req.int_query("limit", DEFAULT_HISTORY, 1, MAX_HISTORY)
    return json_response({"module": module, "points": await rt.ledger.health_history(module, since, limit)})
