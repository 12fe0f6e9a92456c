"""The ``edgelink`` command: serve, demo, probe."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .config import ConfigError, Settings, load_settings


def _load(args: argparse.Namespace) -> Settings:
    return load_settings(config_file=args.config, overrides={"host": args.host, "port": args.port})


def _cmd_serve(args: argparse.Namespace) -> int:
    from .serve import run, serve

    try:
        settings = _load(args)
    except ConfigError as exc:
        raise SystemExit(f"edgelink: {exc}") from None
    run(serve(settings, reload=lambda: _load(args)))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args)


def _cmd_probe(args: argparse.Namespace) -> int:
    from .probe import run_probe

    return run_probe(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgelink", description="Low-power VX11 gateway (Tentáculo Link v7 API).")
    p.add_argument("--version", action="version", version=f"edgelink {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--host", help="listen address (EDGELINK_HOST, default 0.0.0.0)")
        sp.add_argument("--port", help="listen port (TENTACULO_LINK_PORT, default 8000)")
        sp.add_argument("--config", help="TOML config file")

    serve = sub.add_parser("serve", help="run the gateway")
    common(serve)
    serve.set_defaults(func=_cmd_serve)
    demo = sub.add_parser("demo", help="run the gateway with built-in simulated modules on loopback")
    common(demo)
    demo.set_defaults(func=_cmd_demo)
    probe = sub.add_parser("probe", help="probe every module once, record it, print a summary")
    probe.add_argument("--db", help="SQLite file to record into (EDGELINK_DB)")
    probe.add_argument("--report", help="write a Markdown report to this file")
    probe.add_argument("--config", help="TOML config file")
    probe.set_defaults(func=_cmd_probe)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
