"""Run the FastAPI reference peer: ``python -m bench.reference [--host H] [--port P]``.

Settings come from the same environment as edgelink (``TENTACULO_LINK_PORT``,
``VX11_GATEWAY_TOKEN``, ``EDGELINK_DB``, ``EDGELINK_LEDGER_SYNC``, ``MADRE_URL`` ...);
uvicorn's own knobs are set from the matching edgelink settings.
"""

from __future__ import annotations

import argparse

import uvicorn

from edgelink.config import ConfigError, load_settings

from .app import create_app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.reference",
                                     description="Run the FastAPI reference peer of edgelink.")
    parser.add_argument("--host", help="listen address (default EDGELINK_HOST or 0.0.0.0)")
    parser.add_argument("--port", type=int, help="listen port (default TENTACULO_LINK_PORT or 8000)")
    parser.add_argument("--config", help="TOML config file, as for edgelink")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(config_file=args.config, overrides={"host": args.host, "port": args.port})
    except ConfigError as exc:
        parser.exit(2, f"reference: {exc}\n")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        http="httptools",
        loop="uvloop",
        timeout_keep_alive=settings.keepalive_timeout,
        ws_max_size=settings.ws_max_frame,
        ws_ping_interval=settings.ws_ping_interval,
        ws_ping_timeout=settings.ws_ping_interval,  # API.md §6: closed without a pong within one interval
        ws_per_message_deflate=settings.ws_compression,
        access_log=settings.access_log,
        log_level=settings.log_level,
    )


if __name__ == "__main__":
    main()
