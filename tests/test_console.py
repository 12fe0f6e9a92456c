"""The operator console, the API reference and /vx11/health/history (API.md §7, §10).

HTTP-level checks run against ``edgelink serve``; the browser tests drive the system's
headless Chromium (``/usr/bin/chromium``) with Playwright against ``edgelink demo``. Without
the browser they skip, except in CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import pytest

from conftest import Gateway, assert_error, module_env, start_gateway
from edgelink.api.console import ASSETS, accepts_gzip
from edgelink.config import MODULE_DEFAULTS
from test_prediction import call_until, creep_until_degrading, start_predicting

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parent.parent
PAGES = ("/console", "/docs")
WAIT_MS = 15_000  # upper bound for the page to show something; the tests never assert speed


def alert(n: int) -> dict[str, Any]:
    """A canonical event that is broadcast to /ws."""
    return {"source": "madre", "type": "system.alert", "broadcast": True,
            "payload": {"alert_id": f"a-{n}", "severity": "high", "message": f"disk full {n}",
                        "timestamp": 1700000000000 + n}}


# --- static pages over HTTP --------------------------------------------------------------


@pytest.mark.parametrize("path", [*PAGES, *(f"/console/{name}" for name in ASSETS)])
def test_pages_are_public_cached_compressed_and_confined(gateway: Gateway, path: str) -> None:
    plain = gateway.get(path, token=False)
    assert plain.status == 200, plain.body
    kind = "text/html" if path in PAGES else "text/css" if path.endswith(".css") else "text/javascript"
    assert plain.headers["content-type"].startswith(kind)
    assert "content-encoding" not in plain.headers
    csp = plain.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    assert "http" not in csp and "*" not in csp and "unsafe" not in csp
    assert plain.headers["cache-control"] == "no-cache"
    assert "accept-encoding" in plain.headers["vary"].lower()
    etag = plain.headers["etag"]

    zipped = gateway.get(path, token=False, headers={"Accept-Encoding": "br;q=1, gzip;q=0.8"})
    assert zipped.headers["content-encoding"] == "gzip"
    assert gzip.decompress(zipped.body) == plain.body
    assert len(zipped.body) < len(plain.body)
    assert zipped.headers["etag"] != etag  # a different representation, a different tag

    refused = gateway.get(path, token=False, headers={"Accept-Encoding": "gzip;q=0, identity"})
    assert "content-encoding" not in refused.headers and refused.body == plain.body

    for tag, headers in ((etag, {}), (zipped.headers["etag"], {"Accept-Encoding": "gzip"})):
        again = gateway.get(path, token=False, headers={"If-None-Match": f'"other", {tag}', **headers})
        assert again.status == 304 and again.body == b""
        assert again.headers["etag"] == tag
    stale = gateway.get(path, token=False, headers={"If-None-Match": '"not-it"'})
    assert stale.status == 200 and stale.body == plain.body

    head = gateway.request("HEAD", path, token=False)
    assert head.status == 200 and head.body == b"" and head.headers["etag"] == etag


def test_pages_load_nothing_from_another_origin(gateway: Gateway) -> None:
    for path in (*PAGES, *(f"/console/{name}" for name in ASSETS)):
        body = gateway.get(path).body.decode().replace("http://www.w3.org/2000/svg", "")  # a name, not a URL
        assert "http://" not in body and "https://" not in body, path


@pytest.mark.parametrize("path", ["/console/nope.js", "/console/index.html", "/console/..%2fledger.py",
                                  "/console/a/b"])
def test_unknown_console_files_are_404(gateway: Gateway, path: str) -> None:
    assert_error(gateway.get(path, token=False), 404, "not_found")


def test_redoc_redirects_to_docs(gateway: Gateway) -> None:
    reply = gateway.get("/redoc", token=False)
    assert reply.status == 308 and reply.headers["location"] == "/docs"


def test_openapi_json_is_gzipped_when_accepted(gateway: Gateway) -> None:
    plain = gateway.get("/openapi.json", token=False)
    zipped = gateway.get("/openapi.json", token=False, headers={"Accept-Encoding": "gzip"})
    assert zipped.headers["content-encoding"] == "gzip"
    assert gzip.decompress(zipped.body) == plain.body
    assert "content-encoding" not in plain.headers


def test_openapi_describes_the_pages_as_html(gateway: Gateway) -> None:
    paths = gateway.get("/openapi.json").json()["paths"]
    for path in PAGES:
        op = paths[path]["get"]
        assert op["security"] == []
        assert list(op["responses"]["200"]["content"]) == ["text/html"]
        assert "304" in op["responses"]
    assert set(paths["/console/{asset}"]["get"]["responses"]["200"]["content"]) == {"text/css", "text/javascript"}
    assert "308" in paths["/redoc"]["get"]["responses"]
    history = paths["/vx11/health/history"]["get"]
    assert {"VX11Token": []} in history["security"]
    assert {"200", "404", "422", "401", "403"} <= set(history["responses"])


@pytest.mark.parametrize(("header", "wanted"), [
    ("gzip", True), ("GZIP", True), ("deflate, gzip;q=0.5", True), ("*", True), ("x-gzip", True),
    ("", False), ("br", False), ("gzip;q=0", False), ("gzip;q=0.0, *", False), ("*;q=0", False),
    ("gzip;q=bogus", False), ("identity", False),
])
def test_accept_encoding(header: str, wanted: bool) -> None:
    assert accepts_gzip(header) is wanted


def test_a_wheel_ships_the_console(tmp_path: Path) -> None:
    """A non-editable install has the files: they are package data. ``build_py`` is the step
    of a wheel build that collects the package's files (the venv has no ``wheel`` package)."""
    (tmp_path / "egg").mkdir()
    subprocess.run([sys.executable, "-W", "ignore", "-c", "from setuptools import setup; setup()", "-q",
                    "egg_info", "--egg-base", str(tmp_path / "egg"), "build_py", "--build-lib", str(tmp_path / "lib")],
                   cwd=ROOT, check=True, capture_output=True)
    for name in ("index.html", "docs.html", *ASSETS):
        assert (tmp_path / "lib" / "edgelink" / "console" / name).is_file(), name


# --- /vx11/health/history ------------------------------------------------------------------


def _probe(gw: Gateway, db: Path, env: dict[str, str]) -> None:
    """One recorded round, as the gateway's recorder writes it."""
    run_env = {**gw.env, **env}
    subprocess.run([str(Path(sys.executable).with_name("edgelink")), "probe", "--db", str(db)], env=run_env,
                   capture_output=True, timeout=60)


def test_health_history(tmp_path: Path, fake: Any) -> None:
    madre = fake("madre")
    env = module_env({"madre": madre})
    db = tmp_path / "gw.db"
    gw = start_gateway(tmp_path, env)
    try:
        assert gw.get("/vx11/health/history?module=madre").json() == {"module": "madre", "points": []}
        for _ in range(3):
            _probe(gw, db, env)
        points = gw.get("/vx11/health/history?module=madre").json()["points"]
        assert len(points) == 3
        assert [p["checked_at"] for p in points] == sorted(p["checked_at"] for p in points)
        assert all(set(p) == {"checked_at", "status", "http_code", "latency_ms"} for p in points)
        assert all(p["status"] == "ok" and p["http_code"] == 200 and p["latency_ms"] >= 0 for p in points)
        down = gw.get("/vx11/health/history?module=switch").json()["points"]
        assert [p["status"] for p in down] == ["unreachable"] * 3 and down[0]["http_code"] is None
        # limit keeps the newest, still oldest first
        newest = gw.get("/vx11/health/history?module=madre&limit=2").json()["points"]
        assert newest == points[1:]
        since = gw.get(f"/vx11/health/history?module=madre&since={points[2]['checked_at']}").json()["points"]
        assert since == points[2:]
        own = gw.get("/vx11/health/history?module=tentaculo_link").json()
        assert own["module"] == "tentaculo_link" and len(own["points"]) == 3

        assert_error(gw.get("/vx11/health/history?module=nope"), 404, "not_found")
        for query in ("", "?module=", "?module=madre&limit=0", "?module=madre&limit=5001",
                      "?module=madre&limit=x", "?module=madre&since=-1"):
            assert_error(gw.get(f"/vx11/health/history{query}"), 422, "validation_error")
        assert_error(gw.get("/vx11/health/history?module=madre", token=False), 401, "auth_required")
        assert_error(gw.get("/vx11/health/history?module=madre", headers={"X-VX11-Token": "wrong"}),
                     403, "forbidden")
    finally:
        gw.stop()


# --- in the browser ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = None if os.access(CHROMIUM, os.X_OK) else f"{CHROMIUM} is not installed"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "the playwright package is not installed"
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing}: CI runs the browser tests")
        pytest.skip(missing)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def start_demo(tmp_path: Path, port: int = 0, name: str = "demo", **env: str) -> Gateway:
    """``edgelink demo``; the same ``name`` is the same database (and log) file."""
    return start_gateway(tmp_path, {"EDGELINK_PROBE_INTERVAL": "1", **env},
                         args=["--port", str(port)] if port else None, command="demo", name=name)


class Watched:
    """A page whose console errors and requests to other origins are recorded. Predicates
    are passed as functions: the page's CSP forbids evaluating strings."""

    def __init__(self, browser: Any, gw: Gateway, width: int = 1280, scheme: str = "light"):
        self.context = browser.new_context(viewport={"width": width, "height": 900}, color_scheme=scheme)
        self.page = self.context.new_page()
        self.errors: list[tuple[str, str]] = []  # (message, url)
        self.foreign: list[str] = []
        origin = urlsplit(gw.base_url).netloc
        self.page.on("console", lambda m: self.errors.append((m.text, m.location.get("url", "")))
                     if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append((str(e), "")))
        self.page.on("request", lambda r: self.foreign.append(r.url)
                     if urlsplit(r.url).netloc != origin and not r.url.startswith("data:") else None)
        self.gw = gw

    def unexpected_errors(self) -> list[tuple[str, str]]:
        """Console errors, but for the one 404 of the forwarder's status on a gateway that does not
        serve it (the console asks once, then hides the panel; Chromium logs every 4xx)."""
        forward = f"{self.gw.base_url}/vx11/forward/status"
        served = "/vx11/forward/status" in self.gw.get("/openapi.json").json()["paths"]
        errors = list(self.errors)
        missing = [e for e in errors if e[1] == forward and "404" in e[0]]
        if missing and not served:
            errors.remove(missing[0])
        return errors

    def sign_in(self, token: str) -> None:
        """With the keyboard: the token field has the focus when the page asks for it."""
        self.page.goto(f"{self.gw.base_url}/console")
        self.page.wait_for_selector("#token", state="visible", timeout=WAIT_MS)
        assert self.page.evaluate("() => document.activeElement.id") == "token"
        self.page.keyboard.type(token)
        self.page.keyboard.press("Enter")

    def seqs(self, epoch: str | None = None) -> list[int]:
        """The seqs listed, newest first (of one ledger epoch if given)."""
        found = self.page.eval_on_selector_all("#events li", "els => els.map(e => [e.dataset.seq, e.dataset.epoch])")
        return [int(seq) for seq, e in found if epoch is None or e == epoch]

    def wait_for_seq(self, seq: int) -> None:
        self.page.wait_for_selector(f"#events li[data-seq='{seq}']", timeout=WAIT_MS)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def watched(browser: Any) -> Iterator[Any]:
    opened: list[Watched] = []

    def open_page(gw: Gateway, **kw: Any) -> Watched:
        page = Watched(browser, gw, **kw)
        opened.append(page)
        return page

    yield open_page
    for page in opened:
        page.close()


def test_console_shows_modules_and_live_events(tmp_path: Path, watched: Any) -> None:
    gw = start_demo(tmp_path, SHUB_ENABLED="false")
    try:
        w = watched(gw)
        w.sign_in(gw.token)
        page = w.page
        page.wait_for_function(f"() => document.querySelectorAll('#modules article').length === {len(MODULE_DEFAULTS)}",
                               timeout=WAIT_MS)
        cards = page.eval_on_selector_all("#modules article", "els => els.map(e => [e.dataset.module, e.className])")
        assert {name for name, _ in cards} == {name for name, _, _ in MODULE_DEFAULTS}
        classes = dict(cards)
        assert "disabled" in classes["shubniggurath"]
        assert "disabled" in page.inner_text("#modules article[data-module='shubniggurath']")
        assert all("ok" in cls.split() for name, cls in cards if name != "shubniggurath")
        assert "closed" in page.inner_text("#modules article[data-module='madre']")
        # the trend appears once two probe rounds are recorded
        page.wait_for_selector("#modules article[data-module='madre'] svg.spark polyline", timeout=WAIT_MS)
        page.wait_for_selector("#link.ok", timeout=WAIT_MS)

        seq = gw.post("/events/ingest", alert(1)).json()["seq"]
        w.wait_for_seq(seq)
        assert "disk full 1" in page.inner_text(f"#events li[data-seq='{seq}']")

        # pause holds the list still; resume shows what came meanwhile, newest first
        page.focus("#pause")
        page.keyboard.press("Enter")
        assert page.get_attribute("#pause", "aria-pressed") == "true"
        held = gw.post("/events/ingest", alert(2)).json()["seq"]
        page.wait_for_selector("#stream-note:has-text('1 new while paused')", timeout=WAIT_MS)
        assert held not in w.seqs()
        page.click("#pause")
        w.wait_for_seq(held)
        assert w.seqs() == [held, seq]

        # the type filter
        other = gw.post("/events/ingest", {"source": "switch", "type": "switch.tension.updated", "broadcast": True,
                                           "payload": {"value": 3, "components": {}, "timestamp": 1}}).json()["seq"]
        w.wait_for_seq(other)
        page.select_option("#type-filter", "system.alert")
        assert w.seqs() == [held, seq]
        page.select_option("#type-filter", "")
        assert w.seqs() == [other, held, seq]

        # events per type and the correlation graph come with the next refresh
        page.wait_for_selector("#types td:text('system.alert')", timeout=WAIT_MS)
        page.wait_for_selector("#graph circle.node", timeout=WAIT_MS)
        assert page.is_hidden("#forward-section")  # this gateway does not forward
        assert page.is_visible("#sessions")

        screenshots(page, tmp_path / "console", (360, "dark"), (1280, "light"))
        assert w.unexpected_errors() == []
        assert w.foreign == []
    finally:
        gw.stop()


def screenshots(page: Any, stem: Path, *views: tuple[int, str | None]) -> None:
    """A full-page screenshot per (width, colour scheme) as ``<stem>-<width>.png``; the page
    must never scroll sideways."""
    for width, scheme in views:
        page.set_viewport_size({"width": width, "height": 900})
        if scheme is not None:
            page.emulate_media(color_scheme=scheme)
        page.screenshot(path=f"{stem}-{width}.png", full_page=True)
        overflow = page.evaluate("() => document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"the page scrolls sideways at {width} px"


def test_a_wrong_token_says_so(tmp_path: Path, watched: Any) -> None:
    gw = start_demo(tmp_path)
    try:
        w = watched(gw)
        w.sign_in("not-the-token")
        w.page.wait_for_selector("#login-error:has-text('refused')", timeout=WAIT_MS)
        assert w.page.is_hidden("#main")
        # the gateway is up: the sign-in page must not call it offline
        assert w.page.inner_text("#link") == "stream: not signed in"
        assert w.page.evaluate("sessionStorage.getItem('edgelink.token')") is None
        w.page.fill("#token", gw.token)
        w.page.press("#token", "Enter")
        w.page.wait_for_selector("#modules article", timeout=WAIT_MS)
        assert w.page.evaluate("sessionStorage.getItem('edgelink.token')") == gw.token
        # the token is asked once: a reload keeps it
        w.page.reload()
        w.page.wait_for_selector("#modules article", timeout=WAIT_MS)
        assert w.page.is_hidden("#login")
        w.page.wait_for_selector("#link.ok", timeout=WAIT_MS)
        w.page.click("#logout")  # signing out closes the stream on purpose: still not "offline"
        w.page.wait_for_selector("#token", state="visible", timeout=WAIT_MS)
        w.page.wait_for_function("() => document.querySelector('#link').textContent === 'stream: not signed in'",
                                 timeout=WAIT_MS)
    finally:
        gw.stop()


def test_console_resumes_after_a_restart_without_gap_or_duplicate(tmp_path: Path, watched: Any) -> None:
    gw = start_demo(tmp_path)
    port = gw.port
    try:
        w = watched(gw)
        w.sign_in(gw.token)
        w.page.wait_for_selector("#link.ok", timeout=WAIT_MS)
        before = [gw.post("/events/ingest", alert(n)).json()["seq"] for n in range(3)]
        w.wait_for_seq(before[-1])
        gw.stop()
        # let the page fail a few times, so that it is backing off when the gateway returns
        w.page.wait_for_function("() => Number(document.querySelector('#link').dataset.attempts) >= 3", timeout=WAIT_MS * 2)
        gw = start_demo(tmp_path, port=port)
        meanwhile = [gw.post("/events/ingest", alert(n)).json()["seq"] for n in range(3, 6)]
        w.wait_for_seq(meanwhile[-1])
        w.page.wait_for_selector("#link.ok", timeout=WAIT_MS)
        after = gw.post("/events/ingest", alert(6)).json()["seq"]
        w.wait_for_seq(after)
        seqs = w.seqs()
        assert seqs == sorted(seqs, reverse=True)
        assert len(seqs) == len(set(seqs)), seqs
        assert set(seqs) == {*before, *meanwhile, after}
    finally:
        gw.stop()


def test_console_reads_a_replaced_ledger_from_its_start(tmp_path: Path, watched: Any) -> None:
    """A new database file (a new epoch) restarts seq at 1: the page must not skip its events
    as seen, nor resume from the old ledger's position."""
    gw = start_demo(tmp_path)
    port = gw.port
    try:
        w = watched(gw)
        w.sign_in(gw.token)
        w.page.wait_for_selector("#link.ok", timeout=WAIT_MS)
        old = [gw.post("/events/ingest", alert(n)).json()["seq"] for n in range(4)]
        w.wait_for_seq(old[-1])
        gw.stop()
        w.page.wait_for_function("() => Number(document.querySelector('#link').dataset.attempts) >= 3",
                                 timeout=WAIT_MS * 2)
        gw = start_demo(tmp_path, port=port, name="other")
        new = [gw.post("/events/ingest", alert(n)).json()["seq"] for n in range(10, 12)]
        assert new == [1, 2]  # below the old position: a plain resume would miss them
        w.page.wait_for_function("() => document.querySelectorAll('#events li').length === 6", timeout=WAIT_MS)
        epochs = {e for _, e in w.page.eval_on_selector_all(
            "#events li", "els => els.map(e => [e.dataset.seq, e.dataset.epoch])")}
        assert len(epochs) == 2
        old_epoch = w.page.get_attribute(f"#events li[data-seq='{old[0]}']:last-child", "data-epoch")
        new_epoch = (epochs - {old_epoch}).pop()
        assert w.seqs(new_epoch) == [2, 1]
        assert w.seqs(old_epoch) == old[::-1]
    finally:
        gw.stop()


def test_docs_lists_every_operation_and_tries_one(tmp_path: Path, watched: Any) -> None:
    gw = start_demo(tmp_path)
    try:
        doc = gw.get("/openapi.json").json()
        wanted = {("WS" if "101" in op["responses"] else method.upper(), path)
                  for path, item in doc["paths"].items() for method, op in item.items()}
        w = watched(gw)
        page = w.page
        page.goto(f"{gw.base_url}/redoc")
        assert urlsplit(page.url).path == "/docs"
        page.wait_for_selector("#operations details.op", timeout=WAIT_MS)
        listed = page.eval_on_selector_all("#operations details.op",
                                           "els => els.map(e => [e.dataset.method, e.dataset.path])")
        assert {tuple(x) for x in listed} == wanted
        assert len(listed) == len(wanted)

        health = "#operations details[data-path='/health'][data-method='GET']"
        page.click(f"{health} summary")
        page.click(f"{health} button[type=submit]")
        page.wait_for_selector(f"{health} .result-status[data-status='200']", timeout=WAIT_MS)
        assert '"tentaculo_link"' in page.inner_text(f"{health} .result-body")

        # a protected operation with the token entered on the page
        routes = "#operations details[data-path='/vx11/routes']"
        page.fill("#doc-token", gw.token)
        page.press("#doc-token", "Tab")
        page.click(f"{routes} summary")
        page.click(f"{routes} button[type=submit]")
        page.wait_for_selector(f"{routes} .result-status[data-status='200']", timeout=WAIT_MS)

        # the request body form of the ingest operation sends its example
        ingest = "#operations details[data-path='/events/ingest']"
        page.click(f"{ingest} summary")
        page.click(f"{ingest} button[type=submit]")
        page.wait_for_selector(f"{ingest} .result-status[data-status='201']", timeout=WAIT_MS)

        page.fill("#filter", "/vx11/context-7/sessions")
        assert page.eval_on_selector_all("#operations details.op:not([hidden])", "els => els.length") == 1
        page.fill("#filter", "")
        page.click("#operations details[data-path='/vx11/health/history'] summary")  # a parameter table
        screenshots(page, tmp_path / "docs", (360, None), (1280, None))
        assert w.unexpected_errors() == []
        assert w.foreign == []
    finally:
        gw.stop()


def test_docs_shows_schemas_as_fields_and_tries_with_valid_examples(tmp_path: Path, watched: Any) -> None:
    """Request bodies as their fields (API.md §10), never a bare ``$ref``: the ingest body's
    oneOf per event type, each branch's fields, the payload nested inside; "try it" of an
    operation with a required query parameter works as the page fills it."""
    gw = start_demo(tmp_path)
    try:
        doc = gw.get("/openapi.json").json()
        branches = [r["$ref"].rsplit("/", 1)[1] for r in doc["components"]["schemas"]["IngestRequest"]["oneOf"]]
        w = watched(gw)
        page = w.page
        page.goto(f"{gw.base_url}/docs")
        ingest = "#operations details[data-path='/events/ingest']"
        page.click(f"{ingest} summary")
        page.wait_for_selector(f"{ingest} .one-of", timeout=WAIT_MS)  # built when the toggle event comes
        body = page.inner_text(f"{ingest} .body")
        assert "$ref" not in body and "#/components" not in body
        listed = page.eval_on_selector_all(f"{ingest} .one-of > details.branch", "els => els.map(e => e.dataset.branch)")
        assert listed == branches
        alert = f"{ingest} details.branch[data-branch='IngestSystemAlert']"
        assert '(type "system.alert")' in page.inner_text(f"{alert} > summary")
        page.click(f"{alert} > summary")
        page.wait_for_selector(f"{alert} li.field", timeout=WAIT_MS)
        fields = page.eval_on_selector_all(
            f"{alert} > .schema > ul.fields > li.field",
            "els => els.map(e => [e.dataset.name, e.querySelector('.type').textContent, !!e.querySelector(':scope > .req')])")
        assert fields[:3] == [["source", "string", True], ["type", '"system.alert"', True],
                              ["payload", "SystemAlertPayload", True]]
        assert ["broadcast", "boolean | null", False] in fields
        source = page.inner_text(f"{alert} li.field[data-name='source'] .constraints")
        assert "1..256 chars" in source
        # the payload is a nested object: its fields once opened
        payload = f"{alert} li.field[data-name='payload']"
        page.click(f"{payload} > details.nested > summary")
        page.wait_for_selector(f"{payload} li.field", timeout=WAIT_MS)
        inner = page.eval_on_selector_all(f"{payload} li.field", "els => els.map(e => e.dataset.name)")
        assert inner == ["alert_id", "severity", "message", "timestamp"]
        assert "without a fraction" in page.inner_text(f"{payload} li.field[data-name='timestamp'] .desc")

        # a component schema in the list at the bottom is fields too
        page.click("#schema-ChatRequest > summary")
        page.wait_for_selector("#schema-ChatRequest li.field", timeout=WAIT_MS)
        chat = page.eval_on_selector_all("#schema-ChatRequest li.field", "els => els.map(e => e.dataset.name)")
        assert chat[0] == "message" and "stream" in chat
        assert "$ref" not in page.inner_text("#schemas")

        # "try it" starts from a valid example for the required parameter
        page.fill("#doc-token", gw.token)
        page.press("#doc-token", "Tab")
        history = "#operations details[data-path='/vx11/health/history']"
        page.click(f"{history} summary")
        page.wait_for_selector(f"{history} input[name='module']", timeout=WAIT_MS)
        assert page.input_value(f"{history} input[name='module']") == "madre"
        page.click(f"{history} button[type=submit]")
        page.wait_for_selector(f"{history} .result-status[data-status='200']", timeout=WAIT_MS)
        assert '"module": "madre"' in page.inner_text(f"{history} .result-body")
        screenshots(page, tmp_path / "docs-schemas", (360, None), (1280, None))
        assert w.unexpected_errors() == []
    finally:
        gw.stop()


def test_rss_with_the_console_open(tmp_path: Path, watched: Any) -> None:
    """A memory figure (not a timing): the console's polling must not grow the gateway."""
    gw = start_demo(tmp_path)
    try:
        w = watched(gw)
        w.sign_in(gw.token)
        w.page.wait_for_selector("#modules article svg.spark", timeout=WAIT_MS)
        baseline = gw.status_kib("VmRSS")
        for n in range(20):
            gw.post("/events/ingest", alert(n))
        # three more refresh rounds of every panel
        for _ in range(3):
            stamp = w.page.inner_text("#modules-note")
            w.page.wait_for_function(f"() => document.querySelector('#modules-note').textContent !== {stamp!r}",
                                     timeout=WAIT_MS)
        grown = gw.status_kib("VmRSS") - baseline
        print(f"gateway RSS {baseline / 1024:.1f} MiB with the console open, {grown / 1024:+.2f} MiB after "
              f"three refreshes")
        assert grown < 2048
    finally:
        gw.stop()


# --- the timeline (API.md §10) and the health prediction on the cards (§11) ------------------


def _timeline(page: Any) -> dict[str, dict[str, Any]]:
    """The events drawn, by source: their own, received and placed times and the circle's x."""
    rows = page.eval_on_selector_all("#timeline g.tl-event", """els => els.map(e => ({
        id: e.dataset.eventId, source: e.dataset.source, type: e.dataset.type, own: Number(e.dataset.own),
        received: Number(e.dataset.received), placed: Number(e.dataset.placed),
        x: Number(e.querySelector('circle').getAttribute('cx'))}))""")
    return {r["source"]: r for r in rows}


def _wait_drawn(page: Any, count: int) -> None:
    page.wait_for_function(f"() => document.querySelectorAll('#timeline g.tl-event').length === {count}",
                           timeout=WAIT_MS)


def test_timeline_aligns_skewed_clocks_and_joins_a_correlation(tmp_path: Path, watched: Any) -> None:
    gw = start_demo(tmp_path)
    try:
        # stored before the page opens, and not broadcast: only GET /debug/events/timeline has it
        early = gw.post("/events/ingest", {"source": "manifestator", "type": "forensic.snapshot.created",
                                           "payload": {"snapshot_id": "s-1", "reason": "before",
                                                       "timestamp": int(time.time() * 1000)}}).json()["event_id"]
        w = watched(gw)
        w.sign_in(gw.token)
        page = w.page
        page.wait_for_selector("#link.ok", timeout=WAIT_MS)
        _wait_drawn(page, 1)
        assert _timeline(page)["manifestator"]["id"] == early
        # two modules report the same moment; switch's clock is 2 s ahead of the gateway's
        flow = {"correlation_id": "flow-7"}
        now = int(time.time() * 1000)
        madre = gw.post("/events/ingest", {**alert(1), "metadata": flow, "payload": {
            **alert(1)["payload"], "timestamp": now}}).json()["event_id"]
        switch = gw.post("/events/ingest", {"source": "switch", "type": "switch.tension.updated", "broadcast": True,
                                            "metadata": flow, "payload": {"value": 7, "components": {},
                                                                          "timestamp": now + 2000}}).json()["event_id"]
        link = gw.post("/events/ingest", {
            "source": "hormiguero", "type": "system.correlation.updated", "broadcast": True,
            "payload": {"correlation_id": "meta-1", "related_events": [madre, switch], "strength": 0.9,
                        "timestamp": int(time.time() * 1000)}}).json()["event_id"]
        _wait_drawn(page, 4)  # from the live stream, nothing reloaded
        drawn = _timeline(page)
        assert {drawn[s]["id"] for s in ("madre", "switch", "hormiguero")} == {madre, switch, link}

        # placed by their own timestamps, the receive time beside: switch sits 2 s to the right
        m, s = drawn["madre"], drawn["switch"]
        assert (m["own"], s["own"]) == (now, now + 2000) and m["placed"] == m["own"] and s["placed"] == s["own"]
        assert 0 <= s["received"] - m["received"] < 1000
        skews = dict(page.eval_on_selector_all("#timeline g.tl-lane", "els => els.map(e => [e.dataset.source, "
                                                                      "Number(e.dataset.skew)])"))
        assert 1000 < skews["switch"] <= 2000 and -1000 < skews["madre"] <= 0
        assert "clock +" in page.text_content("#timeline g.tl-lane[data-source='switch']")
        apart = s["x"] - m["x"]
        assert apart > 0

        # the two flow-7 events are joined, the correlation update to both it names
        joins = page.eval_on_selector_all("#timeline path.tl-join", "els => els.map(e => [e.dataset.a, e.dataset.b, "
                                                                    "e.dataset.correlation, e.classList.contains('tl-related')])")
        assert sorted((frozenset((a, b)), c, r) for a, b, c, r in joins) == sorted([
            (frozenset((madre, switch)), "flow-7", False),
            (frozenset((link, madre)), "", True), (frozenset((link, switch)), "", True)])

        # zoom: a quarter of the span, four times the distance
        page.select_option("#tl-zoom", "30")
        page.wait_for_function(f"() => {{ const x = (s) => Number(document.querySelector("
                               f"`#timeline g.tl-event[data-source=${{s}}] circle`).getAttribute('cx')); "
                               f"return x('switch') - x('madre') > {apart * 3}; }}", timeout=WAIT_MS)

        # align clocks: each source's median skew removed, the two moments line up
        page.check("#tl-align")
        page.wait_for_function("() => document.querySelector('#timeline g.tl-event[data-source=switch]')"
                               ".dataset.placed !== document.querySelector('#timeline g.tl-event[data-source=switch]')"
                               ".dataset.own", timeout=WAIT_MS)
        aligned = _timeline(page)
        assert abs(aligned["switch"]["placed"] - aligned["madre"]["placed"]) < 1000
        assert abs(aligned["switch"]["x"] - aligned["madre"]["x"]) < apart  # at four times the zoom
        page.uncheck("#tl-align")

        # filters: correlation id, source, type
        page.fill("#tl-cid", "flow-7")
        _wait_drawn(page, 2)
        assert set(_timeline(page)) == {"madre", "switch"}
        page.select_option("#tl-source", "switch")
        _wait_drawn(page, 1)
        page.fill("#tl-cid", "")
        page.select_option("#tl-source", "")
        _wait_drawn(page, 4)  # each step's count differs from the last, so a wait sees it applied
        page.select_option("#tl-type", "system.correlation.updated")
        _wait_drawn(page, 1)
        assert set(_timeline(page)) == {"hormiguero"}
        page.select_option("#tl-type", "")
        _wait_drawn(page, 4)

        page.locator("#timeline-section").screenshot(path=str(tmp_path / "timeline.png"))
        screenshots(page, tmp_path / "console", (360, "dark"), (1280, "light"))
        assert w.unexpected_errors() == []
        assert w.foreign == []
    finally:
        gw.stop()


def test_a_degrading_module_is_marked_on_its_card(tmp_path: Path, watched: Any, fake: Any) -> None:
    madre = fake("madre")
    gw = start_predicting(tmp_path, madre)
    stop = threading.Event()

    def keep_calling() -> None:  # a module nobody calls is judged on its probes alone after 4 s
        while not stop.is_set():
            gw.post("/vx11/intent/task", {"task": "x"})

    try:
        call_until(gw, "madre", {"stable"})
        creep_until_degrading(gw, madre)
        caller = threading.Thread(target=keep_calling, daemon=True)
        caller.start()
        w = watched(gw)
        w.sign_in(gw.token)
        card = "#modules article[data-module='madre']"
        w.page.wait_for_selector(f"{card}.degrading", timeout=WAIT_MS)
        assert "trend degrading" in w.page.inner_text(card)
        assert w.page.get_attribute(card, "aria-label") == "madre: ok, degrading"
        switch = "#modules article[data-module='switch']"
        assert "degrading" not in w.page.get_attribute(switch, "class")
        assert "trend unknown" in w.page.inner_text(switch)  # never answered: nothing learnt
        stop.set()
        caller.join(30)
        assert w.unexpected_errors() == []
    finally:
        stop.set()
        gw.stop()
