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

from .config import ConfigError, ModuleConfig, Settings, load_settings
from .gateway.health import HealthCheck
from .ledger import Ledger, LedgerUnusable, foreign_database, write_runtime_truth
from .modules import Modules

GATEWAY_SERVICE = "tentaculo_link"  # the gateway is a VX11 service too, recorded beside the modules


def gateway_url(settings: Settings, port: int) -> str:
    host = "127.0.0.1" if settings.host in ("", "0.0.0.0") else "::1" if settings.host == "::" else settings.host
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def record_round(modules: Modules, ledger: Ledger, gateway: HealthCheck) -> dict[str, HealthCheck]:
    """Probe every module once (one shared round) and record it with ``gateway``, the
    gateway's own state, as the gateway does every probe interval; returns the round."""
    checks = {GATEWAY_SERVICE: gateway, **await modules.probe_round()}
    await record(ledger, checks)
    return checks


def _stamped(checks: dict[str, HealthCheck]) -> list[HealthCheck]:
    """The checks of one round, every one stamped with the same time."""
    checked_at = int(time.time() * 1000)
    return [dataclasses.replace(c, checked_at=checked_at) for c in checks.values()]


async def record(ledger: Ledger, checks: dict[str, HealthCheck]) -> None:
    """Write one round to the health tables."""
    await ledger.record_health(_stamped(checks))


def summary_line(probes: dict[str, HealthCheck]) -> tuple[str, bool]:
    """``9/10 ok (shubniggurath disabled)`` and whether every enabled module is ok."""
    disabled = [n for n, p in probes.items() if p.status == "disabled"]
    enabled = {n: p for n, p in probes.items() if n not in disabled}
    ok = sum(1 for p in enabled.values() if p.status == "ok")
    line = f"{ok}/{len(probes)} ok"
    failing = [f"{n} {p.status}" for n, p in enabled.items() if p.status != "ok"]
    notes = failing + [f"{n} disabled" for n in disabled]
    if notes:
        line += f" ({', '.join(notes)})"
    return line, ok == len(enabled)


def markdown_report(probes: dict[str, HealthCheck], settings: Settings, checked_at: datetime) -> str:
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
        code = "" if p.http_code is None else str(p.http_code)
        latency = "" if p.latency_ms is None else f"{p.latency_ms:.1f}"
        lines.append(f"| {name} | {ports.get(name, '')} | {p.status} | {code} | {latency} | {stamp} |")
    lines += ["", summary_line(probes)[0], ""]
    return "\n".join(lines)


async def _probe_once(settings: Settings, report: str | None, progress: bool) -> int:
    # A database the ledger did not create (VX11's own) gets the runtime-truth tables only.
    ledger = None if await asyncio.to_thread(foreign_database, settings.db) else Ledger.from_settings(settings)
    # The gateway is probed over HTTP like the modules, at the address it listens on.
    gateway = ModuleConfig(GATEWAY_SERVICE, gateway_url(settings, settings.port))
    modules = Modules(dataclasses.replace(settings, modules=(gateway, *settings.modules)))
    try:
        if ledger is not None:
            await ledger.start()
    except LedgerUnusable as exc:
        await modules.close()
        raise SystemExit(f"edgelink probe: {exc}") from None
    try:
        if progress:
            print(f"probing {len(modules.registry)} services (timeout {settings.health_timeout} s)...", flush=True)
        correlation_id = uuid.uuid4().hex
        found: dict[str, HealthCheck] = {}

        async def probe_one(name: str) -> None:
            found[name] = p = await modules.probe(name, correlation_id)
            if progress:  # a line per service as it answers, not after the round
                detail = f"HTTP {p.http_code}" if p.http_code is not None else (p.error or "")
                latency = f"{p.latency_ms:.1f} ms" if p.latency_ms is not None else ""
                print(f"  {name:<14} {p.status:<12} {detail:<24} {latency}", flush=True)

        await asyncio.gather(*(probe_one(name) for name in modules.registry))
        probes = {name: found[name] for name in modules.registry}
        if ledger is None:
            await asyncio.to_thread(write_runtime_truth, settings.db, _stamped(probes))
        else:
            await record(ledger, probes)
    finally:
        await modules.close()
        if ledger is not None:
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
