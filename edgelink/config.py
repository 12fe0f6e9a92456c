"""Settings: one table of every knob, read from defaults < TOML file < environment < flags.

Environment names kept from Tentáculo Link stay as they were; new ones carry the
``EDGELINK_`` prefix. A bad value stops the start with a message naming the setting
(API.md §8). The TOML file uses the field names below as top-level keys, plus
``[modules.<name>]`` (``url``, ``enabled``) and ``[routes.<intent>]`` tables.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """A setting has a bad value; the message names the setting."""


# ---------------------------------------------------------------------------
# value parsers: each takes the raw value (str from env/flags, typed from TOML)


def _bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError("expected true/false/1/0/yes/no")


def _number(kind: type, minimum: float, maximum: float | None = None) -> Callable[[Any], Any]:
    def parse(raw: Any) -> Any:
        if isinstance(raw, bool):
            raise ValueError("expected a number")
        value = kind(raw.strip() if isinstance(raw, str) else raw)
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"must be {bound}")
        return value

    return parse


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        text = str(raw).strip().lower()
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return text

    return parse


def _str(raw: Any) -> str:
    if not isinstance(raw, str):
        raise ValueError("expected a string")
    return raw


def _origins(raw: Any) -> tuple[str, ...]:
    items = raw if isinstance(raw, list) else str(raw).split(",")
    return tuple(o.strip().rstrip("/") for o in items if str(o).strip())


def _url(raw: Any) -> str:
    text = _str(raw).strip().rstrip("/")
    parts = urlsplit(text)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError("expected an http://host[:port] URL")
    parts.port  # raises ValueError on a bad port
    return text


@dataclass(frozen=True)
class Knob:
    """One scalar setting: its field, its environment names (first wins), its parser."""

    name: str
    env: tuple[str, ...]
    parse: Callable[[Any], Any]
    default: Any


KNOBS: tuple[Knob, ...] = (
    Knob("host", ("EDGELINK_HOST",), _str, "0.0.0.0"),
    Knob("port", ("TENTACULO_LINK_PORT", "EDGELINK_PORT"), _number(int, 0, 65535), 8000),
    Knob("token", ("VX11_TENTACULO_LINK_TOKEN", "VX11_GATEWAY_TOKEN"), _str, ""),
    Knob("enable_auth", ("ENABLE_AUTH",), _bool, True),
    Knob("shub_enabled", ("SHUB_ENABLED",), _bool, False),
    Knob("context7_ttl_seconds", ("CONTEXT7_TTL_SECONDS",), _number(float, 1), 3600.0),
    Knob("context7_cleanup_interval", ("CONTEXT7_CLEANUP_INTERVAL",), _number(float, 0.01), 300.0),
    Knob("context7_max_sessions", ("EDGELINK_CONTEXT7_MAX_SESSIONS",), _number(int, 1), 10_000),
    Knob("context7_max_messages", ("EDGELINK_CONTEXT7_MAX_MESSAGES",), _number(int, 1), 100),
    Knob("context7_max_bytes", ("EDGELINK_CONTEXT7_MAX_BYTES",), _number(int, 65536), 16 * 1024 * 1024),
    Knob("db", ("EDGELINK_DB",), _str, "./data/edgelink.db"),
    Knob("ledger_sync", ("EDGELINK_LEDGER_SYNC",), _choice("full", "normal"), "full"),
    Knob("retention_events", ("EDGELINK_RETENTION_EVENTS",), _number(int, 1), 1_000_000),
    Knob("retention_days", ("EDGELINK_RETENTION_DAYS",), _number(float, 0.0001), 7.0),
    Knob("health_timeout", ("EDGELINK_HEALTH_TIMEOUT",), _number(float, 0.01), 2.0),
    Knob("probe_interval", ("EDGELINK_PROBE_INTERVAL",), _number(float, 0), 30.0),
    Knob("breaker_failures", ("EDGELINK_BREAKER_FAILURES",), _number(int, 1), 3),
    Knob("breaker_recovery", ("EDGELINK_BREAKER_RECOVERY",), _number(float, 0.01), 60.0),
    Knob("proxy_timeout", ("EDGELINK_PROXY_TIMEOUT",), _number(float, 0.01), 10.0),
    Knob("upstream_connect_timeout", ("EDGELINK_UPSTREAM_CONNECT_TIMEOUT",), _number(float, 0.01), 2.0),
    Knob("upstream_max_reply", ("EDGELINK_UPSTREAM_MAX_REPLY",), _number(int, 1024), 8 * 1024 * 1024),
    Knob("upstream_pool_size", ("EDGELINK_UPSTREAM_POOL_SIZE",), _number(int, 1), 8),
    Knob("upstream_pool_idle", ("EDGELINK_UPSTREAM_POOL_IDLE",), _number(float, 0.1), 30.0),
    Knob("max_body", ("EDGELINK_MAX_BODY",), _number(int, 1), 1_048_576),
    Knob("max_header", ("EDGELINK_MAX_HEADER",), _number(int, 1024), 16_384),
    Knob("max_connections", ("EDGELINK_MAX_CONNECTIONS",), _number(int, 1), 1000),
    Knob("keepalive_timeout", ("EDGELINK_KEEPALIVE_TIMEOUT",), _number(float, 0.01), 5.0),
    Knob("header_timeout", ("EDGELINK_HEADER_TIMEOUT",), _number(float, 0.01), 10.0),
    Knob("body_timeout", ("EDGELINK_BODY_TIMEOUT",), _number(float, 0.01), 30.0),
    Knob("send_timeout", ("EDGELINK_SEND_TIMEOUT",), _number(float, 0.01), 30.0),
    Knob("shutdown_grace", ("EDGELINK_SHUTDOWN_GRACE",), _number(float, 0), 10.0),
    Knob("write_buffer_high", ("EDGELINK_WRITE_BUFFER_HIGH",), _number(int, 1024), 256 * 1024),
    Knob("cors_origins", ("EDGELINK_CORS_ORIGINS",), _origins, ()),
    Knob("access_log", ("EDGELINK_ACCESS_LOG",), _bool, False),
    Knob("log_level", ("EDGELINK_LOG_LEVEL",), _choice("debug", "info", "warning", "error"), "info"),
    Knob("ws_max_frame", ("EDGELINK_WS_MAX_FRAME",), _number(int, 1024), 64 * 1024),
    Knob("ws_queue", ("EDGELINK_WS_QUEUE",), _number(int, 1), 1000),
    Knob("ws_ping_interval", ("EDGELINK_WS_PING_INTERVAL",), _number(float, 0.01), 20.0),
    Knob("ws_compression", ("EDGELINK_WS_COMPRESSION",), _bool, False),
    Knob("ws_replay_max", ("EDGELINK_WS_REPLAY_MAX",), _number(int, 0), 1000),
    Knob("ws_queue_bytes", ("EDGELINK_WS_QUEUE_BYTES",), _number(int, 65536), 1024 * 1024),
    Knob("ledger_max_bytes", ("EDGELINK_LEDGER_MAX_BYTES",), _number(int, 16 * 1024 * 1024), 1024**3),
    Knob("ledger_full", ("EDGELINK_LEDGER_FULL",), _choice("drop_oldest", "reject"), "drop_oldest"),
    Knob("stream_idle", ("EDGELINK_STREAM_IDLE",), _number(float, 0.01), 30.0),
    Knob("edge_id", ("EDGELINK_EDGE_ID",), _str, ""),
    Knob("forward_url", ("EDGELINK_FORWARD_URL",), _str, ""),
    Knob("forward_window", ("EDGELINK_FORWARD_WINDOW",), _number(int, 1, 65535), 64),
    Knob("forward_ack_timeout", ("EDGELINK_FORWARD_ACK_TIMEOUT",), _number(float, 0.1), 10.0),
    Knob("forward_types", ("EDGELINK_FORWARD_TYPES",), _origins, ()),
    Knob("forward_user", ("EDGELINK_FORWARD_USER",), _str, ""),
    Knob("forward_password", ("EDGELINK_FORWARD_PASSWORD",), _str, ""),
    Knob("forward_token", ("EDGELINK_FORWARD_TOKEN",), _str, ""),
    Knob("forward_ca", ("EDGELINK_FORWARD_CA",), _str, ""),
    Knob("forward_cert", ("EDGELINK_FORWARD_CERT",), _str, ""),
    Knob("forward_key", ("EDGELINK_FORWARD_KEY",), _str, ""),
)

# name, default URL, enabled by default (shubniggurath follows SHUB_ENABLED)
MODULE_DEFAULTS: tuple[tuple[str, str, str], ...] = (
    ("madre", "MADRE_URL", "http://127.0.0.1:8001"),
    ("switch", "SWITCH_URL", "http://127.0.0.1:8002"),
    ("hermes", "HERMES_URL", "http://127.0.0.1:8003"),
    ("hormiguero", "HORMIGUERO_URL", "http://127.0.0.1:8004"),
    ("manifestator", "MANIFESTATOR_URL", "http://127.0.0.1:8005"),
    ("mcp", "MCP_URL", "http://127.0.0.1:8006"),
    ("shubniggurath", "SHUB_URL", "http://127.0.0.1:8007"),
    ("spawner", "SPAWNER_URL", "http://127.0.0.1:8008"),
    ("operator", "OPERATOR_URL", "http://127.0.0.1:8011"),
)


@dataclass(frozen=True)
class ModuleConfig:
    name: str
    url: str
    enabled: bool = True

    @functools.cached_property
    def port(self) -> int:
        return urlsplit(self.url).port or 80


@dataclass(frozen=True)
class RouteConfig:
    """Where an intent goes. ``fallback`` is tried when the primary fails in any way."""

    intent: str
    module: str
    endpoint: str
    method: str = "POST"
    timeout: float = 30.0
    description: str = ""
    auth_required: bool = True
    fallback: "RouteConfig | None" = None


ROUTE_DEFAULTS: tuple[RouteConfig, ...] = (
    RouteConfig("chat", "switch", "/switch/route-v5", "POST", 15.0, "Conversational chat",
                fallback=RouteConfig("chat", "madre", "/madre/chat", "POST", 5.0, "Chat fallback")),
    RouteConfig("code", "switch", "/switch/route-v5", "POST", 20.0, "Code generation"),
    RouteConfig("audio", "hermes", "/hermes/analyze-audio", "POST", 30.0, "Audio analysis"),
    RouteConfig("analysis", "madre", "/madre/task", "POST", 60.0, "Deep analysis task"),
    RouteConfig("task", "madre", "/madre/task", "POST", 30.0, "Generic task"),
    RouteConfig("spawn", "spawner", "/spawner/spawn", "POST", 30.0, "Spawn a worker"),
    RouteConfig("stream", "switch", "/switch/stream", "POST", 60.0, "Streaming generation"),
)


@dataclass(frozen=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = 8000
    token: str = ""
    enable_auth: bool = True
    shub_enabled: bool = False
    context7_ttl_seconds: float = 3600.0
    context7_cleanup_interval: float = 300.0
    context7_max_sessions: int = 10_000
    context7_max_messages: int = 100
    context7_max_bytes: int = 16 * 1024 * 1024
    db: str = "./data/edgelink.db"
    ledger_sync: str = "full"
    retention_events: int = 1_000_000
    retention_days: float = 7.0
    health_timeout: float = 2.0
    probe_interval: float = 30.0
    breaker_failures: int = 3
    breaker_recovery: float = 60.0
    proxy_timeout: float = 10.0
    upstream_connect_timeout: float = 2.0
    upstream_max_reply: int = 8 * 1024 * 1024
    upstream_pool_size: int = 8
    upstream_pool_idle: float = 30.0
    max_body: int = 1_048_576
    max_header: int = 16_384
    max_connections: int = 1000
    keepalive_timeout: float = 5.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    send_timeout: float = 30.0
    shutdown_grace: float = 10.0
    write_buffer_high: int = 256 * 1024
    cors_origins: tuple[str, ...] = ()
    access_log: bool = False
    log_level: str = "info"
    ws_max_frame: int = 64 * 1024
    ws_queue: int = 1000
    ws_ping_interval: float = 20.0
    ws_compression: bool = False
    ws_replay_max: int = 1000
    ws_queue_bytes: int = 1024 * 1024
    ledger_max_bytes: int = 1024**3
    ledger_full: str = "drop_oldest"
    stream_idle: float = 30.0
    edge_id: str = ""  # empty: the host name (API.md §9)
    forward_url: str = ""
    forward_window: int = 64
    forward_ack_timeout: float = 10.0  # seconds for a connect or the oldest ack in flight
    forward_types: tuple[str, ...] = ()
    forward_user: str = ""
    forward_password: str = ""
    forward_token: str = ""
    forward_ca: str = ""
    forward_cert: str = ""
    forward_key: str = ""
    modules: tuple[ModuleConfig, ...] = field(default_factory=tuple)
    routes: tuple[RouteConfig, ...] = ROUTE_DEFAULTS
    config_file: str | None = None

    def module(self, name: str) -> ModuleConfig | None:
        for m in self.modules:
            if m.name == name:
                return m
        return None

    def route(self, intent: str) -> RouteConfig | None:
        for r in self.routes:
            if r.intent == intent:
                return r
        return None

    def check(self) -> None:
        """Refuse configurations that cannot serve (auth on without a token, dangling routes)."""
        if self.enable_auth and not self.token:
            raise ConfigError(
                "auth is on (ENABLE_AUTH) but no token is configured: set "
                "VX11_TENTACULO_LINK_TOKEN or VX11_GATEWAY_TOKEN, or ENABLE_AUTH=false"
            )
        names = {m.name for m in self.modules}
        for r in self.routes:
            for target in (r, r.fallback):
                if target is not None and target.module not in names:
                    raise ConfigError(f"routes.{r.intent}: unknown module {target.module!r}")


def _knob_value(knob: Knob, raw: Any, where: str) -> Any:
    try:
        return knob.parse(raw)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"bad value for {where}: {raw!r} ({exc})") from None


def _route_from_toml(intent: str, table: Mapping[str, Any], base: RouteConfig | None) -> RouteConfig:
    where = f"routes.{intent}"
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table")
    known = {"module", "endpoint", "method", "timeout", "description", "auth_required", "fallback"}
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    values: dict[str, Any] = dataclasses.asdict(base) if base else {}
    values.pop("fallback", None)
    values["intent"] = intent
    try:
        for key in ("module", "endpoint", "description"):
            if key in table:
                values[key] = _str(table[key])
        if "method" in table:
            values["method"] = _choice("get", "post", "put", "patch", "delete")(table["method"]).upper()
        if "timeout" in table:
            values["timeout"] = _number(float, 0.01)(table["timeout"])
        if "auth_required" in table:
            values["auth_required"] = _bool(table["auth_required"])
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"bad value in {where}: {exc}") from None
    for key in ("module", "endpoint"):
        if key not in values:
            raise ConfigError(f"{where}: missing {key}")
    if not values["endpoint"].startswith("/"):
        raise ConfigError(f"{where}.endpoint must start with '/'")
    fallback = base.fallback if base else None
    if "fallback" in table:
        fb = table["fallback"]
        fallback = None if fb in (False, None, "") else _route_from_toml(intent, fb, None)
        if fallback is not None and fallback.fallback is not None:
            raise ConfigError(f"{where}.fallback cannot have its own fallback")
    return RouteConfig(fallback=fallback, **values)


ENV_FILE_VAR = "EDGELINK_ENV_FILE"


def read_env_file(path: str) -> dict[str, str]:
    """``KEY=value`` lines (systemd EnvironmentFile syntax: blank lines and ``#`` comments
    skipped, one pair of surrounding quotes removed)."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read environment file {path} ({ENV_FILE_VAR}): {exc}") from None
    values: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith(("#", ";")):
            continue
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "").isalnum():
            raise ConfigError(f"environment file {path}, line {number}: expected KEY=value")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def load_settings(
    env: Mapping[str, str] | None = None,
    config_file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build Settings from a TOML file, the environment and flag overrides (highest last).

    When ``EDGELINK_ENV_FILE`` names a file, its values are laid over the environment: read
    again on every reload, so edits to it take effect on SIGHUP even where systemd loaded
    the same file into the environment at start.
    """
    env = os.environ if env is None else env
    if env.get(ENV_FILE_VAR):
        env = {**env, **read_env_file(env[ENV_FILE_VAR])}
    file_data: dict[str, Any] = {}
    if config_file:
        try:
            with open(config_file, "rb") as fh:
                file_data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_file} is not valid TOML: {exc}") from None

    values: dict[str, Any] = {}
    knob_names = {k.name for k in KNOBS}
    unknown = set(file_data) - knob_names - {"modules", "routes"}
    if unknown:
        raise ConfigError(f"config file {config_file}: unknown setting(s) {', '.join(sorted(unknown))}")
    for knob in KNOBS:
        value = knob.default
        if knob.name in file_data:
            value = _knob_value(knob, file_data[knob.name], f"{knob.name} in {config_file}")
        for name in reversed(knob.env):  # the first name listed wins
            if env.get(name, "") != "":
                value = _knob_value(knob, env[name], name)
        if overrides and overrides.get(knob.name) is not None:
            value = _knob_value(knob, overrides[knob.name], f"--{knob.name.replace('_', '-')}")
        values[knob.name] = value

    file_modules = file_data.get("modules", {})
    if not isinstance(file_modules, Mapping):
        raise ConfigError("modules in the config file must be a table")
    known_modules = {name for name, _, _ in MODULE_DEFAULTS}
    for name in file_modules:
        if name not in known_modules:
            raise ConfigError(f"modules.{name}: unknown module (known: {', '.join(sorted(known_modules))})")
    modules = []
    for name, env_name, default_url in MODULE_DEFAULTS:
        table = file_modules.get(name, {})
        url = default_url
        enabled = values["shub_enabled"] if name == "shubniggurath" else True
        if "url" in table:
            url = _knob_value(Knob(name, (), _url, None), table["url"], f"modules.{name}.url")
        if "enabled" in table:
            enabled = _knob_value(Knob(name, (), _bool, None), table["enabled"], f"modules.{name}.enabled")
        if env.get(env_name, "") != "":
            url = _knob_value(Knob(name, (), _url, None), env[env_name], env_name)
        if name == "shubniggurath" and env.get("SHUB_ENABLED", "") != "":
            enabled = values["shub_enabled"]
        modules.append(ModuleConfig(name, url, enabled))

    routes = {r.intent: r for r in ROUTE_DEFAULTS}
    file_routes = file_data.get("routes", {})
    if not isinstance(file_routes, Mapping):
        raise ConfigError("routes in the config file must be a table")
    for intent, table in file_routes.items():
        routes[intent] = _route_from_toml(intent, table, routes.get(intent))

    settings = Settings(
        modules=tuple(modules), routes=tuple(routes.values()), config_file=config_file, **values
    )
    settings.check()
    return settings
