"""GET /health and /v1/health (API.md §2): answered from memory, never from a module; and the
recorded probe history (API.md §7)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from .. import __version__
from ..http.messages import HTTPError, Request, Response, json_response, validation_error
from ..runtime_truth import GATEWAY_SERVICE
from .operation import VALIDATION, Operation, documented, error, param, query_param, returns

if TYPE_CHECKING:
    from ..runtime import Runtime

DEFAULT_HISTORY = 500  # points; API.md §7
MAX_HISTORY = 5000
MAX_MS = 2**53  # the bound api/events.py puts on epoch milliseconds

_BODY = {"status": "ok", "module": "tentaculo_link", "version": "7.0", "edgelink": __version__}
_OK = orjson.dumps(_BODY)
_STOPPING = orjson.dumps({**_BODY, "status": "stopping", "error": "stopping", "status_code": 503})


@documented("Gateway liveness", ("health",), Operation((
    returns(200, "The gateway is up; answered from memory, never from a module.", "Health"),
    returns(503, "The gateway is shutting down.", "Health"))))
async def health(req: Request[Runtime]) -> Response:
    if req.runtime.stopping:
        return Response(503, _STOPPING)
    return Response(200, _OK)


@documented("Recorded probes of one module", ("operations",), Operation(
    (returns(200, "The module's recorded probe rounds (EDGELINK_PROBE_INTERVAL), oldest first: the newest "
                "`limit` at or after `since`.", "HealthHistory"),
     error(404, "not_found", "not a configured module (nor `tentaculo_link`, the gateway's own row)."),
     VALIDATION),
    parameters=(param("module", "query", "A module name, or `tentaculo_link` for the gateway.",
                      {"type": "string", "minLength": 1}, required=True, example="madre"),
                query_param("since", "Only probes at or after this moment, Unix epoch ms.",
                            {"type": "integer", "minimum": 0, "maximum": MAX_MS, "default": 0}),
                query_param("limit", "At most this many points (the newest).",
                            {"type": "integer", "minimum": 1, "maximum": MAX_HISTORY,
                             "default": DEFAULT_HISTORY}))))
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
