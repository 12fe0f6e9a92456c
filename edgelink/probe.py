"""Runtime truth (API.md §7): one health round recorded in the ledger, and ``edgelink probe``.

The gateway calls ``record_round`` every ``EDGELINK_PROBE_INTERVAL`` seconds; the
``probe`` command runs one round by itself, writes the same tables, a Markdown report and
a summary line, and exits 0 only when every enabled module answered ok.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
import uuid
from datetime import datetime, timezone
from urllib.parse import urlsplit

from .config import ConfigError, ModuleConfig, Settings, load_settings
from .gateway.modules import Modules, Probe
from .ledger import Ledger, ProbeRecord


GATEWAY_SERVICE = "tentaculo_link"  # the gateway is a VX11 service too, recorded beside the modules


def gateway_url(settings: Settings, port: int) -> str:
    host = "127.0.0.1" if settings.host in ("", "0.0.0.0") else "::1" if settings.host == "::" else settings.host
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def record_round(modules: Modules, ledger: Ledger, gateway: Probe) -> dict[str, Probe]:
    """Probe every module once (one shared round) and record it with ``gateway``, the
    gateway's own state, as the gateway does every probe interval; returns the round."""
    probes = {GATEWAY_SERVICE: gateway, **await modules.probe_round()}
    await record(modules, ledger, probes)
    return probes


async def record(modules: Modules, ledger: Ledger, probes: dict[str, Probe]) -> None:
    """Write one round to the health tables."""
    ports = {m.name: m.port for m in modules.registry.values()}
    if GATEWAY_SERVICE not in ports:
        ports[GATEWAY_SERVICE] = urlsplit(probes[GATEWAY_SERVICE].health["url"]).port
    checked_at = int(time.time() * 1000)
    await ledger.record_health(
        ProbeRecord(name, ports.get(name), p.health["status"], p.health["http_code"], p.health["latency_ms"],
                    p.health["url"], p.health["error"], p.snippet, checked_at)
        for name, p in probes.items())


def summary_line(probes: dict[str, Probe]) -> tuple[str, bool]:
    """``9/10 ok (shubniggurath disabled)`` and whether every enabled module is ok."""
    disabled = [n for n, p in probes.items() if p.health["status"] == "disabled"]
    enabled = {n: p for n, p in probes.items() if n not in disabled}
    ok = sum(1 for p in enabled.values() if p.health["status"] == "ok")
    line = f"{ok}/{len(probes)} ok"
    failing = [f"{n} {p.health['status']}" for n, p in enabled.items() if p.health["status"] != "ok"]
    notes = failing + [f"{n} disabled" for n in disabled]
    if notes:
        line += f" ({', '.join(notes)})"
    return line, ok == len(enabled)


def markdown_report(probes: dict[str, Probe], settings: Settings, checked_at: datetime) -> str:
    ports = {m.name: m.port for m in settings.modules}
    ports[GATEWAY_SERVICE] = settings.port
    stamp = checked_at.isoformat(timespec="seconds").replace("+00:00", "Z")
    lines = [
        "# edgelink module health",
        "",
        f"Checked at {stamp}, health timeout {settings.health_timeout} s.",
        "",
        "| service | port | status | HTTP code | latency (ms) | checked at |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in probes.items():
        h = p.health
        code = "" if h["http_code"] is None else str(h["http_code"])
        latency = "" if h["latency_ms"] is None else f"{h['latency_ms']:.1f}"
        lines.append(f"| {name} | {ports.get(name, '')} | {h['status']} | {code} | {latency} | {stamp} |")
    lines += ["", summary_line(probes)[0], ""]
    return "\n".join(lines)


async def _probe_once(settings: Settings, report: str | None, progress: bool) -> int:
    ledger = Ledger.from_settings(settings)
    # The gateway is probed over HTTP like the modules, at the address it listens on.
    gateway = ModuleConfig(GATEWAY_SERVICE, gateway_url(settings, settings.port))
    modules = Modules(dataclasses.replace(settings, modules=(gateway, *settings.modules)))
    await ledger.start()
    try:
        if progress:
            print(f"probing {len(modules.registry)} services (timeout {settings.health_timeout} s)...", flush=True)
        correlation_id = uuid.uuid4().hex
        found: dict[str, Probe] = {}

        async def probe_one(name: str) -> None:
            found[name] = probe = await modules.probe(name, correlation_id)
            if progress:  # a line per service as it answers, not after the round
                h = probe.health
                detail = f"HTTP {h['http_code']}" if h["http_code"] is not None else (h["error"] or "")
                latency = f"{h['latency_ms']:.1f} ms" if h["latency_ms"] is not None else ""
                print(f"  {name:<14} {h['status']:<12} {detail:<24} {latency}", flush=True)

        await asyncio.gather(*(probe_one(name) for name in modules.registry))
        probes = {name: found[name] for name in modules.registry}
        await record(modules, ledger, probes)
    finally:
        await modules.close()
        await ledger.close()
    if report:
        with open(report, "w", encoding="utf-8") as fh:
            fh.write(markdown_report(probes, settings, datetime.now(timezone.utc)))
    line, all_ok = summary_line(probes)
    print(line)
    return 0 if all_ok else 1


def run_probe(args: argparse.Namespace) -> int:
    overrides = {"db": args.db}
    try:
        # One round needs no token of its own to listen with; modules get it if set.
        settings = load_settings(config_file=args.config, overrides={**overrides, "enable_auth": "false"})
    except ConfigError as exc:
        raise SystemExit(f"edgelink: {exc}") from None
    return asyncio.run(_probe_once(settings, args.report, sys.stdout.isatty()))
