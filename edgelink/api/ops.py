"""Operations endpoints (API.md §7): Prometheus metrics and the OpenAPI document."""

from __future__ import annotations

import orjson

from .. import openapi
from ..http.messages import Request, Response

PROMETHEUS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


async def metrics(req: Request) -> Response:
    return Response(200, req.runtime.metrics.render(), content_type=PROMETHEUS_TYPE)


async def openapi_json(req: Request) -> Response:
    rt = req.runtime
    if rt.openapi_cache is None:
        rt.openapi_cache = orjson.dumps(openapi.document(rt.router))
    return Response(200, rt.openapi_cache)
