"""Settings: one table of every knob, read from defaults < TOML file < environment < flags.

Each setting is declared once, in ``KNOBS``: its field name, its environment names (the old
Tentáculo Link name first where there is one; new ones carry the ``EDGELINK_`` prefix), its
TOML key, parser, default, a one-line doc and its reload policy. The ``Settings`` dataclass,
the reload logic (runtime.py), ``edgelink check --print``, the settings list in
docs/settings.md and the OpenAPI text that quotes defaults are all built from it. Besides the
knobs, the TOML file has ``[modules.<name>]`` (``url``, ``enabled``) and ``[routes.<intent>]``
tables (the intent table: in code, ``Settings.intents`` of ``IntentTarget``).

A bad value stops the start with a message naming the setting (API.md §8); loading reports
every problem it finds, one a line, not only the first.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlsplit

import orjson

from edgelink.compat import tomllib


class ConfigError(ValueError):
    """Settings that cannot serve; ``problems`` has one line per problem, each naming the
    setting or TOML key."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


# ---------------------------------------------------------------------------
# value parsers: each takes the raw value (str from env/flags, typed from TOML) and raises
# ValueError with a message for people


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
    noun = "an integer" if kind is int else "a number"
    bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"

    def parse(raw: Any) -> Any:
        # TOML hands over typed values: 2.5 must not become the integer 2, true not 1
        if isinstance(raw, bool) or (kind is int and isinstance(raw, float)):
            raise ValueError(f"expected {noun}")
        try:
            value = kind(raw.strip() if isinstance(raw, str) else raw)
        except (TypeError, ValueError):
            raise ValueError(f"expected {noun}") from None
        if not math.isfinite(value) or value < minimum or (maximum is not None and value > maximum):
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


def _names(raw: Any) -> tuple[str, ...]:
    """A comma-separated list (env) or a list of strings (TOML)."""
    if isinstance(raw, list):
        if not all(isinstance(item, str) for item in raw):
            raise ValueError("expected a list of strings")
        items = raw
    else:
        items = _str(raw).split(",")
    return tuple(item.strip() for item in items if item.strip())


def _origins(raw: Any) -> tuple[str, ...]:
    return tuple(origin.rstrip("/") for origin in _names(raw))


def _url(raw: Any) -> str:
    text = _str(raw).strip().rstrip("/")
    parts = urlsplit(text)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError("expected an http://host[:port] URL")
    try:
        parts.port
    except ValueError:
        raise ValueError("the port is not a number between 0 and 65535") from None
    return text


# reload policies: what a SIGHUP does with a changed value
LIVE = "live"  # every piece reads it from the runtime's settings, or is handed it by Runtime.apply
REBUILD = "rebuild"  # the piece that copied it (``Knob.piece``) is built anew
RESTART = "restart"  # kept at its running value, logged as needing a restart
MIB, KIB = 1024 * 1024, 1024


@dataclass(frozen=True)
class Knob:
    """One scalar setting. ``env``: environment names, the first one set wins; ``toml``:
    its key in the TOML file (dotted for a table), the field name when empty; ``unit``:
    ``s`` or ``bytes``, for the docs; ``secret``: redacted when printed."""

    name: str
    env: tuple[str, ...]
    parse: Callable[[Any], Any]
    default: Any
    doc: str
    reload: str
    piece: str = ""  # for REBUILD: the runtime piece that holds a copy
    toml: str = ""
    unit: str = ""
    secret: bool = False

    def __post_init__(self) -> None:
        if self.reload not in (LIVE, REBUILD, RESTART) or (self.reload == REBUILD) != bool(self.piece):
            raise ValueError(f"{self.name}: reload must be live, restart, or rebuild with its piece")
        if not self.toml:
            object.__setattr__(self, "toml", self.name)

    def shown(self, value: Any = None) -> str:
        """A value as people read it in docs: ``10 s``, ``16 MiB``, ``off``."""
        value = self.default if value is None else value
        if isinstance(value, bool):
            return "true" if value else "false"
        if self.unit == "bytes":
            for size, suffix in ((MIB, "MiB"), (KIB, "KiB")):
                if value >= size and value % size == 0:
                    return f"{value // size} {suffix}"
            return f"{value} bytes"
        if self.unit == "s":
            return f"{value:g} s"
        if isinstance(value, tuple):
            return ",".join(value) or "(empty)"
        return str(value) if value != "" else "(empty)"

    def quote(self) -> str:
        """How the OpenAPI text names a setting: ``EDGELINK_MAX_BODY, default 1 MiB``."""
        return f"{self.env[0]}, default {self.shown()}"


_int, _positive_s = _number(int, 1), _number(float, 0.01)
_port = _number(int, 1, 65535)

# A new setting is one line here. A live or rebuild one also gets its line in
# tests/test_reload.py, which reloads it and reads every piece holding it.
KNOBS: tuple[Knob, ...] = (
    Knob("host", ("EDGELINK_HOST",), _str, "0.0.0.0", "Listen address.", RESTART),
    Knob("port", ("TENTACULO_LINK_PORT", "EDGELINK_PORT"), _number(int, 0, 65535), 8000, "Listen port.", RESTART),
    Knob("token", ("VX11_TENTACULO_LINK_TOKEN", "VX11_GATEWAY_TOKEN"), _str, "",
         "The gateway token; also sent to modules.", REBUILD, "modules", secret=True),
    Knob("enable_auth", ("ENABLE_AUTH",), _bool, True, "Require the token on protected routes.", LIVE),
    Knob("shub_enabled", ("SHUB_ENABLED",), _bool, False, "Enable the shubniggurath module.", REBUILD, "modules"),
    Knob("context7_ttl_seconds", ("CONTEXT7_TTL_SECONDS",), _number(float, 1), 3600.0,
         "Idle time after which a chat session expires.", RESTART, unit="s"),
    Knob("context7_cleanup_interval", ("CONTEXT7_CLEANUP_INTERVAL",), _positive_s, 300.0,
         "How often expired sessions are swept.", RESTART, unit="s"),
    Knob("context7_max_sessions", ("EDGELINK_CONTEXT7_MAX_SESSIONS",), _int, 10_000,
         "Most live sessions; the least recently active go first.", RESTART),
    Knob("context7_max_messages", ("EDGELINK_CONTEXT7_MAX_MESSAGES",), _int, 100,
         "Most messages kept per session.", RESTART),
    Knob("context7_max_bytes", ("EDGELINK_CONTEXT7_MAX_BYTES",), _number(int, 65536), 16 * MIB,
         "Bytes all sessions may hold together.", RESTART, unit="bytes"),
    Knob("db", ("EDGELINK_DB",), _str, "./data/edgelink.db", "The SQLite ledger file.", RESTART),
    Knob("ledger_sync", ("EDGELINK_LEDGER_SYNC",), _choice("full", "normal"), "full",
         "full survives power loss, normal a process crash.", RESTART),
    Knob("retention_events", ("EDGELINK_RETENTION_EVENTS",), _int, 1_000_000, "Most events kept.", RESTART),
    Knob("retention_days", ("EDGELINK_RETENTION_DAYS",), _number(float, 0.0001), 7.0,
         "Events older than this are pruned (days).", RESTART),
    Knob("health_timeout", ("EDGELINK_HEALTH_TIMEOUT",), _positive_s, 2.0,
         "Bound on each module health probe.", REBUILD, "modules", unit="s"),
    Knob("probe_interval", ("EDGELINK_PROBE_INTERVAL",), _number(float, 0), 30.0,
         "Seconds between recorded probe rounds; 0 = off.", LIVE, unit="s"),
    Knob("prediction_window", ("EDGELINK_PREDICTION_WINDOW",), _number(float, 12), 7200.0,
         "Time the health prediction's baseline of each module spans (API.md §11); a shorter one "
         "follows a slow creep in latency instead of warning of it.", RESTART, unit="s"),
    Knob("breaker_failures", ("EDGELINK_BREAKER_FAILURES",), _int, 3,
         "Failures in a row that open a module's breaker.", REBUILD, "modules"),
    Knob("breaker_recovery", ("EDGELINK_BREAKER_RECOVERY",), _positive_s, 60.0,
         "Time an open breaker waits before a trial call.", REBUILD, "modules", unit="s"),
    Knob("proxy_timeout", ("EDGELINK_PROXY_TIMEOUT",), _positive_s, 10.0,
         "Bound on proxied module calls.", LIVE, unit="s"),
    Knob("upstream_connect_timeout", ("EDGELINK_UPSTREAM_CONNECT_TIMEOUT",), _positive_s, 2.0,
         "Bound on connecting to a module.", REBUILD, "modules", unit="s"),
    Knob("upstream_max_reply", ("EDGELINK_UPSTREAM_MAX_REPLY",), _number(int, 1024), 8 * MIB,
         "Largest module reply read.", REBUILD, "modules", unit="bytes"),
    Knob("upstream_pool_size", ("EDGELINK_UPSTREAM_POOL_SIZE",), _int, 8,
         "Idle keep-alive connections kept per module.", REBUILD, "modules"),
    Knob("upstream_pool_idle", ("EDGELINK_UPSTREAM_POOL_IDLE",), _number(float, 0.1), 30.0,
         "Idle time after which a pooled connection is closed.", REBUILD, "modules", unit="s"),
    Knob("max_body", ("EDGELINK_MAX_BODY",), _int, MIB, "Largest request body.", LIVE, unit="bytes"),
    Knob("max_bodies", ("EDGELINK_MAX_BODIES",), _number(int, 1024), 8 * MIB,
         "Request body bytes held at once over all connections, the bodies' part of the memory "
         "account (authenticated bodies only, as they arrive, until the answer); a request past it "
         "answers 503 gateway_overloaded.", LIVE, unit="bytes"),
    Knob("memory_budget", ("EDGELINK_MEMORY_BUDGET",), _number(int, MIB), 40 * MIB,
         "The one account of bytes held for others (bodies, replies, streams, queues); past it "
         "new work answers 503 gateway_overloaded.", LIVE, unit="bytes"),
    Knob("client_share", ("EDGELINK_CLIENT_SHARE",), _number(float, 0.01, 1.0), 0.25,
         "Most of the memory account one connection may hold (a fraction).", LIVE),
    Knob("memory_soft", ("EDGELINK_MEMORY_SOFT",), _number(int, 8 * MIB), 64 * MIB,
         "Resident memory past which no new body, stream, replay or WebSocket is accepted.", LIVE,
         unit="bytes"),
    Knob("memory_hard", ("EDGELINK_MEMORY_HARD",), _number(int, 8 * MIB), 72 * MIB,
         "Resident memory past which the connections holding the most bytes are closed.", LIVE,
         unit="bytes"),
    Knob("max_header", ("EDGELINK_MAX_HEADER",), _number(int, 1024), 16 * KIB,
         "Largest request header block.", LIVE, unit="bytes"),
    Knob("max_header_fields", ("EDGELINK_MAX_HEADER_FIELDS",), _number(int, 8), 100,
         "Most header fields in a request; more answer 431.", LIVE),
    Knob("max_request_line", ("EDGELINK_MAX_REQUEST_LINE",), _number(int, 256), 8 * KIB,
         "Longest request line; longer ones answer 414.", LIVE, unit="bytes"),
    Knob("max_connections", ("EDGELINK_MAX_CONNECTIONS",), _int, 1000, "Most open client connections.", LIVE),
    Knob("keepalive_timeout", ("EDGELINK_KEEPALIVE_TIMEOUT",), _positive_s, 5.0,
         "Idle time before a keep-alive connection is closed.", LIVE, unit="s"),
    Knob("header_timeout", ("EDGELINK_HEADER_TIMEOUT",), _positive_s, 10.0,
         "Time for the header block (and the body) to arrive.", LIVE, unit="s"),
    Knob("body_timeout", ("EDGELINK_BODY_TIMEOUT",), _positive_s, 30.0,
         "Time for a whole request body to arrive.", LIVE, unit="s"),
    Knob("send_timeout", ("EDGELINK_SEND_TIMEOUT",), _positive_s, 30.0,
         "Time a client may take to read a reply.", LIVE, unit="s"),
    Knob("shutdown_grace", ("EDGELINK_SHUTDOWN_GRACE",), _number(float, 0), 10.0,
         "Time in-flight requests get to finish on SIGTERM.", LIVE, unit="s"),
    Knob("write_buffer_high", ("EDGELINK_WRITE_BUFFER_HIGH",), _number(int, 1024), 256 * KIB,
         "Per-connection write buffer before reading pauses.", LIVE, unit="bytes"),
    Knob("cors_origins", ("EDGELINK_CORS_ORIGINS",), _origins, (),
         "Comma-separated allowed origins; empty = CORS off.", LIVE),
    Knob("access_log", ("EDGELINK_ACCESS_LOG",), _bool, False, "Log one line per request.", LIVE),
    Knob("log_level", ("EDGELINK_LOG_LEVEL",), _choice("debug", "info", "warning", "error"), "info",
         "debug, info, warning or error.", LIVE),
    Knob("ws_max_frame", ("EDGELINK_WS_MAX_FRAME",), _number(int, 1024), 64 * KIB,
         "Largest WebSocket message; larger ones close with 1009.", LIVE, unit="bytes"),
    Knob("ws_queue", ("EDGELINK_WS_QUEUE",), _int, 1000, "Frames queued per WebSocket client.", LIVE),
    Knob("ws_ping_interval", ("EDGELINK_WS_PING_INTERVAL",), _positive_s, 20.0,
         "Time between pings; no pong in as long closes.", LIVE, unit="s"),
    Knob("ws_compression", ("EDGELINK_WS_COMPRESSION",), _bool, False, "Negotiate permessage-deflate.", LIVE),
    Knob("ws_replay_max", ("EDGELINK_WS_REPLAY_MAX",), _number(int, 0), 1000,
         "Most events replayed for since_seq.", LIVE),
    Knob("ws_queue_bytes", ("EDGELINK_WS_QUEUE_BYTES",), _number(int, 65536), MIB,
         "Bytes queued per WebSocket client.", LIVE, unit="bytes"),
    Knob("ledger_max_bytes", ("EDGELINK_LEDGER_MAX_BYTES",), _number(int, 16 * MIB), 1024 * MIB,
         "Largest ledger database.", LIVE, unit="bytes"),
    Knob("ledger_full", ("EDGELINK_LEDGER_FULL",), _choice("drop_oldest", "reject"), "drop_oldest",
         "At the ledger bound: drop_oldest or reject.", LIVE),
    Knob("stream_idle", ("EDGELINK_STREAM_IDLE",), _positive_s, 30.0,
         "Idle time after which a streamed reply is cut.", RESTART, unit="s"),
    Knob("edge_id", ("EDGELINK_EDGE_ID",), _str, "", "This gateway's name upstream; empty = the host name.",
         RESTART),
    Knob("forward_url", ("EDGELINK_FORWARD_URL",), _str, "", "Where events are forwarded; empty = off.",
         RESTART, toml="forward.url"),
    Knob("forward_window", ("EDGELINK_FORWARD_WINDOW",), _number(int, 1, 65535), 64,
         "Events in flight to the forward target.", RESTART, toml="forward.window"),
    Knob("forward_window_bytes", ("EDGELINK_FORWARD_WINDOW_BYTES",), _number(int, 64 * KIB), 4 * MIB,
         "Bytes of events in flight to the forward target (at least one event goes out).", RESTART,
         toml="forward.window_bytes", unit="bytes"),
    Knob("forward_ack_timeout", ("EDGELINK_FORWARD_ACK_TIMEOUT",), _positive_s, 10.0,
         "Bound on a broker connect and on the oldest unacknowledged event.", RESTART, toml="forward.ack_timeout",
         unit="s"),
    Knob("forward_types", ("EDGELINK_FORWARD_TYPES",), _names, (),
         "Comma-separated event types forwarded; empty = all.", RESTART, toml="forward.types"),
    Knob("forward_user", ("EDGELINK_FORWARD_USER",), _str, "", "User for the forward target.", RESTART,
         toml="forward.user"),
    Knob("forward_password", ("EDGELINK_FORWARD_PASSWORD",), _str, "", "Password for the forward target.",
         RESTART, toml="forward.password", secret=True),
    Knob("forward_token", ("EDGELINK_FORWARD_TOKEN",), _str, "", "Token for the forward target.", RESTART,
         toml="forward.token", secret=True),
    Knob("forward_ca", ("EDGELINK_FORWARD_CA",), _str, "", "CA file for the forward target's TLS.", RESTART,
         toml="forward.ca"),
    Knob("forward_cert", ("EDGELINK_FORWARD_CERT",), _str, "", "Client certificate file for TLS.", RESTART,
         toml="forward.cert"),
    Knob("forward_key", ("EDGELINK_FORWARD_KEY",), _str, "", "Client key file for TLS.", RESTART,
         toml="forward.key"),
)
KNOB = {k.name: k for k in KNOBS}

# The module table and the intent table are not scalars: a changed module (URL, enabled)
# rebuilds the module clients, a changed intent applies live (handlers read it per request).
MODULES_PIECE = "modules"
DEMO_HOST = "127.0.0.1"  # where `edgelink demo` listens unless --host says otherwise (not EDGELINK_HOST)

# name, the environment name of its URL, default URL (shubniggurath follows SHUB_ENABLED)
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
# Tentáculo Link's other names for a module's place, read when its ``*_URL`` is not set: the
# operator chat router's base URL, then the port on the module's default host (the minimal
# ``.env`` and the compose file move modules by port).
MODULE_BASE_URL_ENV = {"switch": "SWITCH_BASE_URL", "madre": "MADRE_BASE_URL"}
MODULE_PORT_ENV = {name: env_name.replace("_URL", "_PORT") for name, env_name, _ in MODULE_DEFAULTS}
MODULE_ENV_NAMES = frozenset({env_name for _, env_name, _ in MODULE_DEFAULTS}
                             | set(MODULE_BASE_URL_ENV.values()) | set(MODULE_PORT_ENV.values()))
MODULE_KEYS = ("url", "enabled")


@dataclass(frozen=True)
class ModuleConfig:
    name: str
    url: str
    enabled: bool = True

    @functools.cached_property
    def port(self) -> int:
        return urlsplit(self.url).port or 80


@dataclass(frozen=True)
class IntentTarget:
    """Where an intent goes: one entry of the intent table (the TOML ``[routes.<intent>]``
    tables, ``GET /vx11/routes``). ``fallback`` is tried when the primary fails in any way;
    ``stream``: the module's reply may be streamed through."""

    intent: str
    module: str
    endpoint: str
    method: str = "POST"
    timeout: float = 30.0
    description: str = ""
    auth_required: bool = True
    stream: bool = False
    fallback: "IntentTarget | None" = None


INTENT_KEYS = ("module", "endpoint", "method", "timeout", "description", "auth_required", "stream", "fallback")
INTENT_DEFAULTS: tuple[IntentTarget, ...] = (
    IntentTarget("chat", "switch", "/switch/route-v5", "POST", 15.0, "Conversational chat",
                 fallback=IntentTarget("chat", "madre", "/madre/chat", "POST", 5.0, "Chat fallback")),
    IntentTarget("code", "switch", "/switch/route-v5", "POST", 20.0, "Code generation"),
    IntentTarget("audio", "hermes", "/hermes/analyze-audio", "POST", 30.0, "Audio analysis"),
    IntentTarget("analysis", "madre", "/madre/task", "POST", 60.0, "Deep analysis task"),
    IntentTarget("task", "madre", "/madre/task", "POST", 30.0, "Generic task"),
    IntentTarget("spawn", "spawner", "/spawner/spawn", "POST", 30.0, "Spawn a worker"),
    IntentTarget("stream", "switch", "/switch/stream", "POST", 60.0, "Streaming generation", stream=True),
)


def _default(name: str) -> Any:
    return KNOB[name].default


@dataclass(frozen=True)
class Settings:
    """The effective settings: one field per knob, its default read from ``KNOBS``, plus the
    module and intent tables. The fields are spelled out so that type checkers see them;
    tests/test_config.py ties them to ``KNOBS`` (same names, defaults of the declared type)."""

    host: str = _default("host")
    port: int = _default("port")
    token: str = _default("token")
    enable_auth: bool = _default("enable_auth")
    shub_enabled: bool = _default("shub_enabled")
    context7_ttl_seconds: float = _default("context7_ttl_seconds")
    context7_cleanup_interval: float = _default("context7_cleanup_interval")
    context7_max_sessions: int = _default("context7_max_sessions")
    context7_max_messages: int = _default("context7_max_messages")
    context7_max_bytes: int = _default("context7_max_bytes")
    db: str = _default("db")
    ledger_sync: str = _default("ledger_sync")
    retention_events: int = _default("retention_events")
    retention_days: float = _default("retention_days")
    health_timeout: float = _default("health_timeout")
    probe_interval: float = _default("probe_interval")
    breaker_failures: int = _default("breaker_failures")
    breaker_recovery: float = _default("breaker_recovery")
    proxy_timeout: float = _default("proxy_timeout")
    upstream_connect_timeout: float = _default("upstream_connect_timeout")
    upstream_max_reply: int = _default("upstream_max_reply")
    upstream_pool_size: int = _default("upstream_pool_size")
    upstream_pool_idle: float = _default("upstream_pool_idle")
    max_body: int = _default("max_body")
    max_bodies: int = _default("max_bodies")
    max_header: int = _default("max_header")
    max_request_line: int = _default("max_request_line")
    max_connections: int = _default("max_connections")
    keepalive_timeout: float = _default("keepalive_timeout")
    header_timeout: float = _default("header_timeout")
    body_timeout: float = _default("body_timeout")
    send_timeout: float = _default("send_timeout")
    shutdown_grace: float = _default("shutdown_grace")
    write_buffer_high: int = _default("write_buffer_high")
    cors_origins: tuple[str, ...] = _default("cors_origins")
    access_log: bool = _default("access_log")
    log_level: str = _default("log_level")
    ws_max_frame: int = _default("ws_max_frame")
    ws_queue: int = _default("ws_queue")
    ws_ping_interval: float = _default("ws_ping_interval")
    ws_compression: bool = _default("ws_compression")
    ws_replay_max: int = _default("ws_replay_max")
    ws_queue_bytes: int = _default("ws_queue_bytes")
    ledger_max_bytes: int = _default("ledger_max_bytes")
    ledger_full: str = _default("ledger_full")
    stream_idle: float = _default("stream_idle")
    edge_id: str = _default("edge_id")
    forward_url: str = _default("forward_url")
    forward_window: int = _default("forward_window")
    forward_window_bytes: int = _default("forward_window_bytes")
    forward_ack_timeout: float = _default("forward_ack_timeout")
    forward_types: tuple[str, ...] = _default("forward_types")
    forward_user: str = _default("forward_user")
    forward_password: str = _default("forward_password")
    forward_token: str = _default("forward_token")
    forward_ca: str = _default("forward_ca")
    forward_cert: str = _default("forward_cert")
    forward_key: str = _default("forward_key")
    prediction_window: float = _default("prediction_window")
    memory_budget: int = _default("memory_budget")
    client_share: float = _default("client_share")
    memory_soft: int = _default("memory_soft")
    memory_hard: int = _default("memory_hard")
    max_header_fields: int = _default("max_header_fields")
    modules: tuple[ModuleConfig, ...] = ()
    intents: tuple[IntentTarget, ...] = INTENT_DEFAULTS  # the TOML [routes.<intent>] tables
    config_file: str | None = None

    def intent_target(self, intent: str) -> IntentTarget | None:
        for target in self.intents:
            if target.intent == intent:
                return target
        return None

    def problems(self) -> list[str]:
        """Why these settings cannot serve (auth on without a token, an intent sent to an unknown module)."""
        found = []
        if self.max_body > self.max_bodies:
            found.append(f"EDGELINK_MAX_BODY ({self.max_body}) is over EDGELINK_MAX_BODIES ({self.max_bodies}), "
                         "the bytes all bodies together may hold: bodies that large could never be read")
        if self.memory_soft >= self.memory_hard:
            found.append(f"EDGELINK_MEMORY_SOFT ({self.memory_soft}) must be under EDGELINK_MEMORY_HARD "
                         f"({self.memory_hard})")
        if self.enable_auth and not self.token:
            found.append("auth is on (ENABLE_AUTH) but no token is configured: set "
                         "VX11_TENTACULO_LINK_TOKEN or VX11_GATEWAY_TOKEN, or ENABLE_AUTH=false")
        names = {m.name for m in self.modules}
        for t in self.intents:
            for target in (t, t.fallback):
                if target is not None and target.module not in names:
                    found.append(f"routes.{t.intent}: unknown module {target.module!r} "
                                 f"(known: {', '.join(sorted(names))})")
        return found


# ---------------------------------------------------------------------------
# reading


def _parsed(parse: Callable[[Any], Any], raw: Any, where: str, problems: list[str], fallback: Any) -> Any:
    """``parse(raw)``, or ``fallback`` with the problem noted (loading goes on to find more)."""
    try:
        return parse(raw)
    except (ValueError, TypeError) as exc:
        problems.append(f"bad value for {where}: {raw!r} ({exc})")
        return fallback


def _table(value: Any, where: str, problems: list[str], keys: tuple[str, ...] | None = None) -> Mapping[str, Any]:
    """``value`` as a TOML table whose keys are among ``keys``; an empty one after a problem."""
    if not isinstance(value, Mapping):
        problems.append(f"{where} must be a table")
        return {}
    if keys is not None:
        problems.extend(f"{where}.{key}: unknown key (known: {', '.join(keys)})" for key in value if key not in keys)
    return value


_MISSING = object()


def _knob_sections() -> dict[str, tuple[str, ...]]:
    """The TOML tables knobs live in (``forward``) and the keys each holds."""
    sections: dict[str, list[str]] = {}
    for knob in KNOBS:
        section, dot, key = knob.toml.rpartition(".")
        if dot:
            sections.setdefault(section, []).append(key)
    return {section: tuple(keys) for section, keys in sections.items()}


KNOB_SECTIONS = _knob_sections()


def _file_value(data: Mapping[str, Any], knob: Knob) -> Any:
    section, dot, key = knob.toml.rpartition(".")
    table = data.get(section, {}) if dot else data
    return table.get(key, _MISSING) if isinstance(table, Mapping) else _MISSING


def _read_toml(config_file: str | None, problems: list[str]) -> dict[str, Any]:
    if not config_file:
        return {}
    try:
        with open(config_file, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        problems.append(f"cannot read config file {config_file}: {exc.strerror}")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        problems.append(f"config file {config_file} is not valid TOML: {exc}")
    return {}


def _intent_from_toml(intent: str, value: Any, base: IntentTarget | None, problems: list[str],
                      where: str | None = None) -> IntentTarget | None:
    where = where or f"routes.{intent}"
    if not isinstance(value, Mapping):
        problems.append(f"{where} must be a table")
        return base
    table = _table(value, where, problems, INTENT_KEYS)
    values: dict[str, Any] = dataclasses.asdict(base) if base else {"stream": False}
    values.pop("fallback", None)
    values["intent"] = intent
    parsers: dict[str, Callable[[Any], Any]] = {
        "module": _str, "endpoint": _str, "description": _str, "auth_required": _bool, "stream": _bool,
        "timeout": _positive_s,
        "method": lambda raw: _choice("get", "post", "put", "patch", "delete")(raw).upper(),
    }
    for key, parse in parsers.items():
        if key in table:
            values[key] = _parsed(parse, table[key], f"{where}.{key}", problems, values.get(key))
    missing = [key for key in ("module", "endpoint") if values.get(key) is None]
    problems.extend(f"{where}: missing {key}" for key in missing)
    if isinstance(values.get("endpoint"), str) and not values["endpoint"].startswith("/"):
        problems.append(f"{where}.endpoint must start with '/'")
    fallback = base.fallback if base else None
    if "fallback" in table:
        fb = table["fallback"]
        if fb in (False, ""):
            fallback = None
        elif isinstance(fb, Mapping) and "fallback" in fb:
            problems.append(f"{where}.fallback cannot have its own fallback")
            fallback = None
        else:
            fallback = _intent_from_toml(intent, fb, None, problems, f"{where}.fallback")
    if missing:
        return None
    return IntentTarget(fallback=fallback, **values)


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
    problems = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith(("#", ";")):
            continue
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "").isalnum():
            problems.append(f"environment file {path}, line {number}: expected KEY=value")
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    if problems:
        raise ConfigError(problems)
    return values


def load_settings(
    env: Mapping[str, str] | None = None,
    config_file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build Settings from a TOML file, the environment and flag overrides (highest last).
    ``serve``, its reloads and ``edgelink check`` all read settings through this function.

    When ``EDGELINK_ENV_FILE`` names a file, its values are laid over the environment: read
    again on every reload, so edits to it take effect on SIGHUP even where systemd loaded
    the same file into the environment at start. Raises ConfigError with every problem found.
    """
    env = os.environ if env is None else env
    if env.get(ENV_FILE_VAR):
        env = {**env, **read_env_file(env[ENV_FILE_VAR])}
    problems: list[str] = []
    file_data = _read_toml(config_file, problems)
    top_keys = {k.toml.partition(".")[0] for k in KNOBS} | {"modules", "routes"}
    for key in file_data:
        if key not in top_keys:
            problems.append(f"{key}: unknown setting in config file {config_file}")
    for section, keys in KNOB_SECTIONS.items():
        if section in file_data:
            _table(file_data[section], section, problems, keys)

    values: dict[str, Any] = {}
    for knob in KNOBS:
        value = knob.default
        raw = _file_value(file_data, knob)
        if raw is not _MISSING:
            value = _parsed(knob.parse, raw, f"{knob.toml} in {config_file}", problems, value)
        for name in reversed(knob.env):  # the first name listed wins
            if env.get(name, "") != "":
                value = _parsed(knob.parse, env[name], name, problems, value)
        if overrides and overrides.get(knob.name) is not None:
            value = _parsed(knob.parse, overrides[knob.name], f"--{knob.name.replace('_', '-')}", problems, value)
        values[knob.name] = value

    file_modules = _table(file_data.get("modules", {}), "modules", problems, tuple(n for n, _, _ in MODULE_DEFAULTS))
    modules = []
    for name, env_name, default_url in MODULE_DEFAULTS:
        table = _table(file_modules.get(name, {}), f"modules.{name}", problems, MODULE_KEYS)
        url = default_url
        enabled = values["shub_enabled"] if name == "shubniggurath" else True
        if "url" in table:
            url = _parsed(_url, table["url"], f"modules.{name}.url", problems, url)
        if "enabled" in table:
            enabled = _parsed(_bool, table["enabled"], f"modules.{name}.enabled", problems, enabled)
        port_env = MODULE_PORT_ENV[name]
        if env.get(port_env, "") != "":
            port = _parsed(_port, env[port_env], port_env, problems, None)
            if port is not None:
                url = f"http://{urlsplit(default_url).hostname}:{port}"
        for url_env in (MODULE_BASE_URL_ENV.get(name), env_name):  # the first name listed wins
            if url_env and env.get(url_env, "") != "":
                url = _parsed(_url, env[url_env], url_env, problems, url)
        if name == "shubniggurath" and env.get("SHUB_ENABLED", "") != "":
            enabled = values["shub_enabled"]
        modules.append(ModuleConfig(name, url, enabled))

    intents: dict[str, IntentTarget | None] = {t.intent: t for t in INTENT_DEFAULTS}
    for intent, table in _table(file_data.get("routes", {}), "routes", problems).items():
        intents[intent] = _intent_from_toml(intent, table, intents.get(intent), problems)

    settings = Settings(modules=tuple(modules), intents=tuple(t for t in intents.values() if t is not None),
                        config_file=config_file, **values)
    problems.extend(settings.problems())
    if problems:
        raise ConfigError(problems)
    return settings


# ---------------------------------------------------------------------------
# showing


def _without_password(value: Any) -> Any:
    """A URL with its ``user:password@`` password redacted (a broker URL may carry one)."""
    if not isinstance(value, str) or "@" not in value:
        return value
    parts = urlsplit(value)
    if parts.password is None:
        return value
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username}:<redacted>@{host}").geturl()


def _toml_value(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return orjson.dumps(value).decode()  # JSON strings, numbers, booleans, arrays are TOML too


def render(settings: Settings) -> str:
    """The effective settings as a TOML file (``edgelink check --print``), secrets redacted:
    read back, it gives the same settings but for the secrets."""
    lines = [f"# effective settings (config file: {settings.config_file or 'none'})"]
    sections: dict[str, list[str]] = {}
    for knob in KNOBS:
        value = getattr(settings, knob.name)
        shown = '"<redacted>"' if knob.secret and value else _toml_value(_without_password(value))
        section, _, key = knob.toml.rpartition(".")
        sections.setdefault(section, []).append(f"{key} = {shown}")
    lines += sections.pop("")
    for section, entries in sections.items():
        lines += ["", f"[{section}]", *entries]
    for m in settings.modules:
        lines += ["", f"[modules.{m.name}]", f"url = {_toml_value(m.url)}", f"enabled = {_toml_value(m.enabled)}"]
    for t in settings.intents:
        for header, target in ((f"routes.{t.intent}", t), (f"routes.{t.intent}.fallback", t.fallback)):
            if target is None:
                continue
            lines += ["", f"[{header}]"]
            lines += [f"{key} = {_toml_value(getattr(target, key))}" for key in INTENT_KEYS if key != "fallback"]
        if t.fallback is None and any(d.intent == t.intent and d.fallback for d in INTENT_DEFAULTS):
            lines.append("fallback = false")
    return "\n".join(lines) + "\n"


def markdown_table() -> str:
    """The settings list of docs/settings.md."""
    rows = ["| Environment | TOML key | Default | Reload | What |", "|---|---|---|---|---|"]
    for k in KNOBS:
        env = " / ".join(f"`{name}`" for name in k.env)
        rows.append(f"| {env} | `{k.toml}` | {k.shown()} | {k.reload} | {k.doc} |")
    return "\n".join(rows)


def changed(old: Settings, new: Settings) -> Iterator[Knob]:
    """The knobs whose value differs between two settings."""
    return (k for k in KNOBS if getattr(old, k.name) != getattr(new, k.name))
