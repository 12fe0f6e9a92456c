"""Forwarding the ledger to a fleet broker (API.md §9): settings checks and engine choice.

The engines' client libraries are optional extras; ``open_engine`` imports the one a URL
needs only when forwarding is configured, so the base install loads neither.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from ..config import ConfigError

if TYPE_CHECKING:
    from ..config import Settings
    from .engine import Engine

EDGE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

# scheme -> (engine name, module in this package, extra, library module the extra installs)
SCHEMES = {
    "nats": ("nats", "nats_engine", "nats", "nats"),
    "tls": ("nats", "nats_engine", "nats", "nats"),
    "mqtt": ("mqtt", "mqtt_engine", "mqtt", "paho.mqtt"),
    "mqtts": ("mqtt", "mqtt_engine", "mqtt", "paho.mqtt"),
}


@dataclass(frozen=True, slots=True)
class Target:
    """Where and how to connect, with the credentials taken out of the URL."""

    scheme: str
    host: str
    port: int
    user: str
    password: str
    token: str
    tls: bool
    ca: str
    cert: str
    key: str
    path: str  # MQTT: "/5" selects MQTT 5, else 3.1.1

    @property
    def safe_url(self) -> str:
        """The URL without credentials, for logs and the status endpoint."""
        suffix = self.path if self.path not in ("", "/") else ""
        return f"{self.scheme}://{self.host}:{self.port}{suffix}"


DEFAULT_PORTS = {"nats": 4222, "tls": 4222, "mqtt": 1883, "mqtts": 8883}


def edge_id(settings: "Settings") -> str:
    """The configured edge id, or the host name with other characters replaced by '-'."""
    if settings.edge_id:
        return settings.edge_id
    return re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:64] or "edge"


def target(settings: "Settings") -> Target:
    """Parse and check the forwarding settings; ConfigError names the bad setting."""
    url = settings.forward_url
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"bad value for EDGELINK_FORWARD_URL: {url!r} ({exc})") from None
    if parts.scheme not in SCHEMES:
        raise ConfigError(f"bad value for EDGELINK_FORWARD_URL: {parts.scheme + '://' if parts.scheme else url!r}"
                          f" is not a known scheme (expected one of {', '.join(s + '://' for s in SCHEMES)})")
    if not parts.hostname:
        raise ConfigError(f"bad value for EDGELINK_FORWARD_URL: no host in {parts.scheme}:// URL")
    return Target(parts.scheme, parts.hostname, port or DEFAULT_PORTS[parts.scheme],
                  unquote(parts.username or "") or settings.forward_user,
                  unquote(parts.password or "") or settings.forward_password,
                  settings.forward_token, parts.scheme in ("tls", "mqtts"),
                  settings.forward_ca, settings.forward_cert, settings.forward_key, parts.path)


def check(settings: "Settings") -> None:
    """The forwarding part of the settings check: edge id, URL scheme, extra installed."""
    if settings.edge_id and not EDGE_ID.fullmatch(settings.edge_id):
        raise ConfigError(f"bad value for EDGELINK_EDGE_ID: {settings.edge_id!r} (1-64 characters of "
                          "A-Z a-z 0-9 _ -)")
    if not settings.forward_url:
        return
    found = target(settings)
    if bool(settings.forward_cert) != bool(settings.forward_key):
        raise ConfigError("EDGELINK_FORWARD_CERT and EDGELINK_FORWARD_KEY go together: set both or neither")
    _, _, extra, library = SCHEMES[found.scheme]
    try:
        found_library = importlib.util.find_spec(library.split(".")[0]) is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as missing
        found_library = False
    if not found_library:
        raise ConfigError(f"EDGELINK_FORWARD_URL {found.scheme}:// needs the '{extra}' extra: "
                          f"pip install 'edgelink[{extra}]'")


def open_engine(settings: "Settings") -> "Engine":
    """The engine for the configured URL (its library imported only now)."""
    found = target(settings)
    _, module, _, _ = SCHEMES[found.scheme]
    return importlib.import_module(f".{module}", __name__).engine(found)
