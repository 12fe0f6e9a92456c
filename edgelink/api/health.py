"""GET /health and /v1/health (API.md §2): answered from memory, never from a module."""

from __future__ import annotations

import orjson

from .. import __version__
from ..http.messages import Request, Response

_BODY = {"status": "ok", "module": "tentaculo_link", "version": "7.0", "edgelink": __version__}
_OK = orjson.dumps(_BODY)
_STOPPING = orjson.dumps({**_BODY, "status": "stopping", "error": "stopping", "status_code": 503})


async def health(req: Request) -> Response:
    if req.runtime.stopping:
        return Response(503, _STOPPING)
    return Response(200, _OK)
