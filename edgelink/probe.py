"""``edgelink probe`` (API.md §7): one round of health checks of every module and of the
gateway, run by itself and recorded in the same tables the gateway records into every
``EDGELINK_PROBE_INTERVAL`` (runtime_truth.py); a Markdown report and a summary line; exit 0
only when every enabled module answered ok.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import uuid
from datetime import datetime, timezone

from .config import ConfigError, ModuleConfig, Settings, load_settings
from .gateway.health import HealthCheck
from .ledger import Ledger, LedgerUnusable, foreign_database, write_runtime_truth
from .modules import Modules
from .runtime_truth import GATEWAY_SERVICE, gateway_url, record, stamped


def summary_line(checks: dict[str, HealthCheck]) -> tuple[str, bool]:
    """``9/10 ok (shubniggurath disabled)`` and whether every enabled module is ok."""
    disabled = [n for n, c in checks.items() if c.status == "disabled"]
    enabled = {n: c for n, c in checks.items() if n not in disabled}
    ok = sum(1 for c in enabled.values() if c.status == "ok")
    line = f"{ok}/{len(checks)} ok"
    failing = [f"{n} {c.status}" for n, c in enabled.items() if c.status != "ok"]
    notes = failing + [f"{n} disabled" for n in disabled]
    if notes:
        line += f" ({', '.join(notes)})"
    return line, ok == len(enabled)


def markdown_report(checks: dict[str, HealthCheck], settings: Settings, checked_at: datetime) -> str:
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
    for name, c in checks.items():
        code = "" if c.http_code is None else str(c.http_code)
        latency = "" if c.latency_ms is None else f"{c.latency_ms:.1f}"
        lines.append(f"| {name} | {ports.get(name, '')} | {c.status} | {code} | {latency} | {stamp} |")
    lines += ["", summary_line(checks)[0], ""]
    return "\n".join(lines)


async def _probe_once(settings: Settings, report: str | None, progress: bool) -> int:
    # A database the ledger did not create (VX11's own) gets the runtime-truth tables only.
    ledger = None if await asyncio.to_thread(foreign_database, settings.db) else Ledger.from_settings(settings)
    # The gateway is checked over HTTP like the modules, at the address it listens on.
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

        async def check_one(name: str) -> None:
            found[name] = c = await modules.check_one(name, correlation_id)
            if progress:  # a line per service as it answers, not after the round
                detail = f"HTTP {c.http_code}" if c.http_code is not None else (c.error or "")
                latency = f"{c.latency_ms:.1f} ms" if c.latency_ms is not None else ""
                print(f"  {name:<14} {c.status:<12} {detail:<24} {latency}", flush=True)

        await asyncio.gather(*(check_one(name) for name in modules.registry))
        checks = {name: found[name] for name in modules.registry}
        if ledger is None:
            await asyncio.to_thread(write_runtime_truth, settings.db, stamped(checks))
        else:
            await record(ledger, checks)
    finally:
        await modules.close()
        if ledger is not None:
            await ledger.close()
    if report:
        with open(report, "w", encoding="utf-8") as fh:
            fh.write(markdown_report(checks, settings, datetime.now(timezone.utc)))
    line, all_ok = summary_line(checks)
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
