"""docs/migrating-from-v7.md is tied to the code (issue 22): every setting name it quotes is
one edgelink reads, every Tentáculo Link name edgelink reads is in it, every path it quotes is
a route (those it lists as not served are not), and every status code it quotes is one the
endpoint table documents."""

from __future__ import annotations

import re
from pathlib import Path

from edgelink import openapi
from edgelink.app import build_router
from edgelink.config import ENV_FILE_VAR, KNOBS, MODULE_ENV_NAMES

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "migrating-from-v7.md"
TEXT = GUIDE.read_text(encoding="utf-8")
SETTINGS = {name for knob in KNOBS for name in knob.env} | MODULE_ENV_NAMES | {ENV_FILE_VAR}
NOT_SERVED_HEADING = "**v7 endpoints added after 7.0 in VX11's tree are not served:**"
FILES = ("/opt/", "/var/", "/etc/", "/path/")  # file system paths, not routes


def test_every_setting_name_quoted_exists_and_every_v7_name_is_quoted() -> None:
    quoted = set(re.findall(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b", TEXT))
    assert quoted, "the guide names no settings"
    assert quoted - SETTINGS == set()
    v7_names = {name for name in SETTINGS if not name.startswith("EDGELINK_")}
    assert v7_names - quoted == set()


def _not_served() -> str:
    start = TEXT.index(NOT_SERVED_HEADING)
    end = TEXT.find("\n\n", start)
    return TEXT[start:end]


def test_every_path_quoted_is_a_route_unless_listed_as_not_served() -> None:
    router = build_router()
    not_served = _not_served()
    paths = re.findall(r"`(?:(GET|POST|DELETE) )?(/[^`\s]*)`", TEXT)
    assert len(paths) > 10
    templates = [route.template for route in router.routes]
    for method, quoted in paths:
        path = quoted.split("?")[0]
        if path.startswith(FILES):
            continue
        prefix = re.sub(r"/(\*|\.\.\.)$", "/", path)  # /debug/*: every route under /debug/
        if prefix != path:
            served = any(t.startswith(prefix) for t in templates)
        elif method:
            router.match(method, path)  # raises 404 / 405
            served = True
        else:
            served = router.lookup(path) is not None
        assert served == (f"`{quoted}`" not in not_served), quoted


def test_every_status_code_quoted_is_documented() -> None:
    doc = openapi.document(build_router())
    documented = {code for item in doc["paths"].values() for op in item.values() if isinstance(op, dict)
                  for code in op.get("responses", {})}
    quoted = set(re.findall(r"`([1-5]\d\d)`", TEXT))
    assert {"201", "401", "422", "502", "503", "504"} <= quoted
    assert quoted - documented == set()
