"""The ``edgelink`` command: serve, check, demo, probe, forward rewind."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .config import DEMO_HOST, KNOB, ConfigError, Settings, load_settings, render
from .log import PRIORITIES


def _problem_lines(prefix: str, problems: list[str]) -> str:
    """One line a problem; under journald each starts with ``<3>`` (err) so that
    ``journalctl -p warning`` shows why a start or reload was refused (log.py does the same)."""
    mark = PRIORITIES["error"] if os.environ.get("JOURNAL_STREAM") else ""
    return "\n".join(f"{mark}{prefix}: {problem}" for problem in problems)


def _load(args: argparse.Namespace) -> Settings:
    """The settings, read the same way by serve, its reloads and check."""
    return load_settings(config_file=args.config, overrides={"host": args.host, "port": args.port})


def _cmd_serve(args: argparse.Namespace) -> int:
    from .serve import run, serve

    try:
        settings = _load(args)
    except ConfigError as exc:
        raise SystemExit(_problem_lines("edgelink", exc.problems)) from None
    run(serve(settings, reload=lambda: _load(args)))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    """Validate without binding or opening the ledger: ``ok``, or one problem a line."""
    from . import forward

    try:
        settings = _load(args)
        forward.check(settings)  # as serve does at start: edge id, URL scheme, the extra installed
    except ConfigError as exc:
        print(_problem_lines("edgelink check", exc.problems), file=sys.stderr)
        return 1
    print(render(settings) if args.print else "ok", end="" if args.print else "\n")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def _cmd_probe(args: argparse.Namespace) -> int:
    from .probe import run_probe

    return run_probe(args)


def _cmd_forward_rewind(args: argparse.Namespace) -> int:
    """Ask the running gateway (the settings' host and port, with its token) to forward
    again from ``--from-seq`` (or the oldest stored event); prints its JSON answer."""
    import http.client
    import json

    try:
        settings = _load(args)
    except ConfigError as exc:
        raise SystemExit("\n".join(f"edgelink: {problem}" for problem in exc.problems)) from None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(settings.host, settings.host)
    body = json.dumps({} if args.from_seq is None else {"from_seq": args.from_seq})
    headers = {"Content-Type": "application/json"}
    if settings.token:
        headers["X-VX11-Token"] = settings.token
    conn = http.client.HTTPConnection(host, settings.port, timeout=30)
    try:
        conn.request("POST", "/vx11/forward/rewind", body=body, headers=headers)
        reply = conn.getresponse()
        text = reply.read().decode(errors="replace")
    except OSError as exc:
        print(f"edgelink forward rewind: no gateway answered at {host}:{settings.port}: {exc}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    if reply.status != 200:
        print(f"edgelink forward rewind: the gateway answered {reply.status}: {text}", file=sys.stderr)
        return 1
    print(text)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgelink", description="Low-power VX11 gateway (Tentáculo Link v7 API).")
    p.add_argument("--version", action="version", version=f"edgelink {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, host: str = f"listen address ({KNOB['host'].quote()})") -> None:
        sp.add_argument("--host", help=host)
        sp.add_argument("--port", help=f"listen port ({KNOB['port'].quote()})")
        sp.add_argument("--config", help="TOML config file")

    serve = sub.add_parser("serve", help="run the gateway")
    common(serve)
    serve.set_defaults(func=_cmd_serve)
    check = sub.add_parser("check", help="validate the settings as serve would read them, then exit")
    common(check)
    check.add_argument("--print", action="store_true", help="print the effective settings (secrets redacted)")
    check.set_defaults(func=_cmd_check)
    demo = sub.add_parser("demo", help="run the gateway with built-in simulated modules on loopback")
    common(demo, host=f"listen address (default {DEMO_HOST}: the demo is for this machine)")
    demo.set_defaults(func=_cmd_demo)
    probe = sub.add_parser("probe", help="probe every module once, record it, print a summary")
    probe.add_argument("--db", help="SQLite file to record into (EDGELINK_DB)")
    probe.add_argument("--report", help="write a Markdown report to this file")
    probe.add_argument("--config", help="TOML config file")
    probe.set_defaults(func=_cmd_probe)
    fwd = sub.add_parser("forward", help="ask the running gateway about forwarding")
    fwd_sub = fwd.add_subparsers(dest="forward_command", required=True)
    rewind = fwd_sub.add_parser("rewind", help="forward again from a seq (a broker lost messages it had acked)")
    common(rewind)
    rewind.add_argument("--from-seq", type=int, help="the first seq to send again (default: the oldest stored)")
    rewind.set_defaults(func=_cmd_forward_rewind)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
