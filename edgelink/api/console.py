"""The operator console and the API reference (API.md §10): static files shipped in the
package (``edgelink/console/``), served with an ETag, gzip when accepted and a
Content-Security-Policy that admits nothing but the gateway's own origin.

Each file is read and compressed once, at its first request, and kept: the set of files is
fixed by the package and each is refused above ``MAX_ASSET_BYTES``, so the cache is bounded.
gzip and hashlib are imported then too: a gateway nobody opens the console of never pays
for them (together with importlib.resources they were ~4 ms of every start-up).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from ..http.messages import HTTPError, Request, Response, empty_response
from .operation import HTML as HTML_MEDIA_TYPE
from .operation import Case, Operation, documented, error, param, ref

MAX_ASSET_BYTES = 256 * 1024  # per file; the whole console is a few tens of KiB

HTML = b"text/html; charset=utf-8"
_TYPES = {".html": HTML, ".css": b"text/css; charset=utf-8", ".js": b"text/javascript; charset=utf-8"}
# The files under /console/{asset}; the pages themselves are /console and /docs.
ASSETS = ("app.css", "common.js", "console.js", "docs.js", "timeline.js")
_FILES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "console")

# 'self' covers same-origin ws:/wss: in CSP Level 3 browsers; the icon is an inline data: URL
# so that the browser does not ask for /favicon.ico.
CSP = (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
# Revalidate every time (a 304 costs a few bytes): an upgraded gateway never serves a stale page.
_COMMON_HEADERS = [(b"cache-control", b"no-cache"), (b"vary", b"Accept-Encoding"),
                   (b"content-security-policy", CSP), (b"x-content-type-options", b"nosniff"),
                   (b"referrer-policy", b"no-referrer")]


@dataclass(frozen=True, slots=True)
class Asset:
    content_type: bytes
    body: bytes
    gzipped: bytes
    etag: bytes  # of the identity body; the gzip variant's is this with "-gz" before the quote

    @property
    def gzip_etag(self) -> bytes:
        return self.etag[:-1] + b'-gz"'


# what the pages' and files' documentation shares
STATIC_CASES = (
    Case("304", "Not Modified: `If-None-Match` names the current ETag.", headers=(("ETag", "The file's tag."),)),
)
IF_NONE_MATCH = param("If-None-Match", "header", "ETags the client holds; the current one answers 304.",
                      {"type": "string"})
PAGE = Operation(
    (Case("200", "The page (gzip when `Accept-Encoding` admits it), sent with `Cache-Control: no-cache`, an "
                 "`ETag` and a `Content-Security-Policy` of the gateway's own origin. The data it shows needs "
                 "the token, entered in the page.", schema=ref("Text"), media_type=HTML_MEDIA_TYPE,
          headers=(("ETag", "The file's tag."), ("Content-Security-Policy", "Only the gateway's own origin."))),
     *STATIC_CASES),
    parameters=(IF_NONE_MATCH,),
)


@functools.cache
def load(name: str) -> Asset:
    """One packaged file, read and compressed once."""
    import gzip
    import hashlib

    with open(os.path.join(_FILES, name), "rb") as fh:
        body = fh.read()
    if len(body) > MAX_ASSET_BYTES:
        raise RuntimeError(f"console/{name} is {len(body)} bytes, over MAX_ASSET_BYTES")
    etag = b'"%s"' % hashlib.sha256(body).hexdigest()[:20].encode()
    # mtime=0: the same bytes, hence the same ETag meaning, on every start
    return Asset(_TYPES[name[name.rfind("."):]], body, gzip.compress(body, 9, mtime=0), etag)


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether ``Accept-Encoding`` admits gzip (``gzip;q=0`` refuses it, ``*`` admits it)."""
    verdict = {}
    for item in accept_encoding.split(","):
        coding, _, params = item.partition(";")
        quality = 1.0
        for option in params.split(";"):
            key, _, value = option.strip().partition("=")
            if key.lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        verdict[coding.strip().lower()] = quality > 0
    return verdict.get("gzip", verdict.get("x-gzip", verdict.get("*", False)))


def _matches(if_none_match: str, etag: bytes) -> bool:
    tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
    return "*" in tags or etag.decode() in tags


def respond(req: Request, name: str) -> Response:
    """The file ``name``: 304 when the client holds it, else the body (gzip if accepted)."""
    asset = load(name)
    gzipped = accepts_gzip(req.headers.get("accept-encoding", ""))
    etag = asset.gzip_etag if gzipped else asset.etag
    headers = [*_COMMON_HEADERS, (b"etag", etag)]
    if _matches(req.headers.get("if-none-match", ""), etag):
        return empty_response(304, headers)
    if gzipped:
        headers.append((b"content-encoding", b"gzip"))
    return Response(200, asset.gzipped if gzipped else asset.body, headers, asset.content_type)


@documented("Operator console (HTML page)", ("console",), PAGE)
async def console(req: Request) -> Response:
    return respond(req, "index.html")


@documented("Interactive API reference (HTML page)", ("console",), PAGE)
async def docs(req: Request) -> Response:
    return respond(req, "docs.html")


@documented("Operator console files", ("console",), Operation(
    (Case("200", "The file, sent as the pages are: a stylesheet as `text/css`,", schema=ref("Text"),
          media_type="text/css", headers=(("ETag", "The file's tag."),)),
     Case("200", "a script as `text/javascript`.", schema=ref("Text"), media_type="text/javascript"),
     *STATIC_CASES,
     error(404, "not_found", "not one of the console's files.")),
    parameters=({**param("asset", "path", "The file.", {"enum": list(ASSETS)}, required=True),
                 "example": "console.js"}, IF_NONE_MATCH)))
async def asset(req: Request) -> Response:
    name = req.params["asset"]
    if name not in ASSETS:
        raise HTTPError(404, "not_found", detail=f"no console file {name!r}; the files are {', '.join(ASSETS)}")
    return respond(req, name)


@documented("Redirect to /docs", ("console",), Operation((
    Case("308", "Permanent Redirect to `/docs`, the API reference.", headers=(("Location", "`/docs`."),)),)))
async def redoc(req: Request) -> Response:
    """FastAPI served ReDoc here; its bookmarks land on the one reference there is."""
    return empty_response(308, [(b"location", b"/docs")])
