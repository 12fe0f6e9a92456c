"""A SIGHUP applies every ``live`` and ``rebuild`` setting to every piece that holds it, and
keeps ``restart`` settings at their running values (the settings table's reload policies).

The gateway runs in this process (``serve`` on a loopback port), so the test sends itself a
real SIGHUP and then looks inside each piece; the subprocess tests (test_check.py,
test_deploy_runtime.py) see the same reload from outside.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any, Callable

from conftest import TOKEN, until
from edgelink.config import KNOB, KNOBS, RESTART, load_settings
from edgelink.log import LEVELS, log
from edgelink.runtime import Runtime
from edgelink.serve import serve
from fakemodule import unused_port


def _level(rt: Runtime) -> str:
    return next(name for name, value in LEVELS.items() if value == log.threshold)


def _server(name: str) -> Callable[[Runtime], list[Any]]:
    """Read per request and copied by every connection accepted after the reload."""
    return lambda rt: [getattr(rt.settings, name), getattr(rt.server.settings, name)]


def _modules(name: str, *inside: Callable[[Runtime], Any]) -> Callable[[Runtime], list[Any]]:
    """Copied into the module clients, which a reload rebuilds."""
    return lambda rt: [getattr(rt.settings, name), getattr(rt.modules.settings, name), *(f(rt) for f in inside)]


def _settings(name: str) -> Callable[[Runtime], list[Any]]:
    """Read from the runtime's settings where it is used."""
    return lambda rt: [getattr(rt.settings, name)]


def _breakers(attribute: str) -> Callable[[Runtime], Any]:
    def read(rt: Runtime) -> Any:
        (value,) = {getattr(b, attribute) for b in rt.modules.breakers.values()}
        return value
    return read


# knob -> (the value the reload sets, what every piece holding it has after the reload)
NEW: dict[str, tuple[Any, Callable[[Runtime], list[Any]]]] = {
    "token": ("another-token", _modules("token", lambda rt: rt.modules._token[0][1].decode())),
    "enable_auth": (False, _settings("enable_auth")),
    "shub_enabled": (True, _modules("shub_enabled", lambda rt: rt.modules.registry["shubniggurath"].enabled,
                                    lambda rt: "shubniggurath" in rt.modules.breakers)),
    "health_timeout": (0.75, _modules("health_timeout")),
    "probe_interval": (3600.0, lambda rt: [rt.settings.probe_interval,
                                           3600.0 if rt._recorder is not None else "recorder off"]),
    "breaker_failures": (7, _modules("breaker_failures", _breakers("threshold"))),
    "breaker_recovery": (9.5, _modules("breaker_recovery", _breakers("recovery"))),
    "proxy_timeout": (4.5, _settings("proxy_timeout")),
    "upstream_connect_timeout": (0.9, _modules("upstream_connect_timeout",
                                               lambda rt: rt.modules._client._connect_timeout)),
    "upstream_max_reply": (4096, _modules("upstream_max_reply", lambda rt: rt.modules._client._max_reply)),
    "upstream_pool_size": (3, _modules("upstream_pool_size", lambda rt: rt.modules._client._pool_size)),
    "upstream_pool_idle": (5.5, _modules("upstream_pool_idle", lambda rt: rt.modules._client._pool_idle)),
    "max_body": (5000, _server("max_body")),
    "max_bodies": (65536, lambda rt: [*_server("max_bodies")(rt), rt.account.limits["bodies"]]),
    "max_header": (4096, _server("max_header")),
    "max_header_fields": (30, _server("max_header_fields")),
    "memory_budget": (20 * 1024 * 1024, lambda rt: [rt.settings.memory_budget, rt.account.total]),
    "client_share": (0.5, lambda rt: [rt.settings.client_share, rt.account.share_limit / rt.account.total]),
    "memory_soft": (50 * 1024 * 1024, _settings("memory_soft")),
    "memory_hard": (60 * 1024 * 1024, _settings("memory_hard")),
    "max_request_line": (2048, _server("max_request_line")),
    "max_connections": (17, _server("max_connections")),
    "keepalive_timeout": (2.5, _server("keepalive_timeout")),
    "header_timeout": (3.5, _server("header_timeout")),
    "body_timeout": (4.5, _server("body_timeout")),
    "send_timeout": (5.5, _server("send_timeout")),
    "shutdown_grace": (1.5, _settings("shutdown_grace")),
    "write_buffer_high": (4096, _server("write_buffer_high")),
    "cors_origins": (("http://a.example",), _settings("cors_origins")),
    "access_log": (True, _settings("access_log")),
    "log_level": ("warning", lambda rt: [rt.settings.log_level, _level(rt)]),
    "ws_max_frame": (2048, _server("ws_max_frame")),
    "ws_queue": (50, lambda rt: [*_server("ws_queue")(rt), rt.hub.hold_limit]),
    "ws_ping_interval": (7.0, _server("ws_ping_interval")),
    "ws_compression": (True, _server("ws_compression")),
    "ws_replay_max": (5, _settings("ws_replay_max")),
    "ws_queue_bytes": (131072, lambda rt: [rt.settings.ws_queue_bytes, rt.hub.hold_bytes]),
    "ledger_max_bytes": (32 * 1024 * 1024, lambda rt: [rt.settings.ledger_max_bytes, rt.ledger.max_bytes]),
    "ledger_full": ("reject", lambda rt: [rt.settings.ledger_full, rt.ledger.full_policy]),
}
# restart settings changed by the same reload: they must keep their running values
KEPT = {"host": "127.0.0.2", "context7_max_sessions": 5, "retention_events": 10,
        "forward_window": 3, "stream_idle": 1.0}


def env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return ",".join(value) if isinstance(value, tuple) else str(value)


def test_the_table_of_this_test_covers_every_live_and_rebuild_setting():
    assert set(NEW) == {k.name for k in KNOBS if k.reload != RESTART}
    assert all(KNOB[name].reload == RESTART for name in KEPT)


def test_sighup_applies_every_live_and_rebuild_setting(tmp_path: Path, capfd):
    config = tmp_path / "edgelink.toml"
    config.write_text("")
    env = {"VX11_GATEWAY_TOKEN": TOKEN, "EDGELINK_HOST": "127.0.0.1", "EDGELINK_PORT": "0",  # never 8000: shared
           "EDGELINK_PROBE_INTERVAL": "0", "EDGELINK_DB": str(tmp_path / "gw.db"),
           "MADRE_URL": f"http://127.0.0.1:{unused_port()}"}

    def reload() -> Any:
        return load_settings(env=env, config_file=str(config))

    initial = reload()
    seen: dict[str, Any] = {}

    async def hup(rt: Runtime) -> None:
        before = rt.settings
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: rt.settings is not before, why="the reload")

    async def on_ready(rt: Runtime) -> None:
        assert rt.settings == initial
        # one setting per reload, so that no other change rebuilds a piece for it
        for name, (value, observe) in NEW.items():
            assert getattr(rt.settings, name) != value, name
            env[KNOB[name].env[0]] = env_value(value)
            await hup(rt)
            seen.setdefault("applied", {})[name] = observe(rt)
        old_modules = rt.modules
        env["MADRE_URL"] = f"http://127.0.0.1:{unused_port()}"
        config.write_text('[routes.extra]\nmodule = "madre"\nendpoint = "/madre/extra"\n')
        apply = rt.apply
        rt.apply = lambda new: seen.setdefault("changed", apply(new))  # what the "reloaded" line logs
        await hup(rt)
        del rt.apply
        seen["rebuilt"] = rt.modules is not old_modules
        seen["madre"] = rt.modules.registry["madre"].url
        seen["extra"] = rt.settings.intent_target("extra")
        for name, value in KEPT.items():
            assert getattr(initial, name) != value, name
            env[KNOB[name].env[0]] = env_value(value)
        await hup(rt)
        seen["restart"] = {k.name: getattr(rt.settings, k.name) for k in KNOBS if k.reload == RESTART}
        os.kill(os.getpid(), signal.SIGTERM)

    try:
        asyncio.run(serve(initial, reload=reload, on_ready=on_ready))
    finally:
        log.threshold = LEVELS["info"]
    for name, (value, _) in NEW.items():
        assert seen["applied"][name] == [value] * len(seen["applied"][name]), name
    assert seen["rebuilt"] and seen["madre"] == env["MADRE_URL"]
    assert seen["extra"] is not None and seen["extra"].endpoint == "/madre/extra"
    assert seen["restart"] == {k.name: getattr(initial, k.name) for k in KNOBS if k.reload == RESTART}
    assert "reload_needs_restart" in capfd.readouterr().err
    # the reload names the TOML tables it applied as the file spells them ([routes.<intent>])
    assert seen["changed"] == ["modules", "routes"]
