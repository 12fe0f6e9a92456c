"""``edgelink demo``: the gateway plus simulated VX11 modules on loopback.

The modules answer ``/health`` and the endpoints the route table and proxies call with
plausible JSON, so a newcomer sees a whole working system from one command. They run on
the gateway's own HTTP server, in the same process, on ports the kernel picks.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from typing import Any, AsyncGenerator, Callable, Coroutine

import orjson

from .config import DEMO_HOST, ENV_FILE_VAR, MODULE_DEFAULTS, ConfigError, Settings, load_settings
from .http.messages import HTTPError, Request, Response, StreamingResponse, error_response, json_response
from .http.server import HttpServer
from .log import log

DEMO_TOKEN = "demo-token"
WORD_INTERVAL = 0.08  # seconds between the words of a simulated streamed reply


def _body(req: Request) -> dict[str, Any]:
    """The request's JSON object (none is ``{}``), or the gateway's own 400/422."""
    return req.json_object() if req.body.strip() else {}


def _chat_reply(module: str) -> Callable[[Request], Any]:
    def reply(req: Request) -> Any:
        message = str(_body(req).get("message", ""))[:200]
        return {"response": f"[{module}] you said: {message}", "model_used": f"{module}-demo-local",
                "tokens": len(message.split())}
    return reply


# (module, method, path) -> a function of the request returning the JSON reply
_ENDPOINTS: dict[tuple[str, str, str], Callable[[Request], Any]] = {
    ("switch", "POST", "/switch/route-v5"): _chat_reply("switch"),
    ("madre", "POST", "/madre/chat"): _chat_reply("madre"),
    ("madre", "POST", "/madre/task"): lambda req: {"status": "accepted", "task_id": os.urandom(6).hex()},
    ("hermes", "POST", "/hermes/analyze-audio"): lambda req: {"status": "ok", "transcript": "(silence)"},
    ("hermes", "GET", "/hermes/resources"): lambda req: {"cpu_percent": round(random.uniform(5, 40), 1),
                                                         "memory_mb": random.randint(200, 900)},
    ("hormiguero", "GET", "/queen/status"): lambda req: {"queen": "alive", "ants": random.randint(3, 12)},
    ("hormiguero", "GET", "/report"): lambda req: {"items": [{"id": i, "state": "done"} for i in
                                                             range(min(int(req.query.get("limit", "50") or 50), 5))]},
    ("spawner", "POST", "/spawner/spawn"): lambda req: {"status": "spawned", "pid": random.randint(1000, 9999)},
    ("shubniggurath", "POST", "/shub/dashboard"): lambda req: {"status": "ok", "tracks": 0},
}


async def _words(text: str) -> AsyncGenerator[bytes, None]:
    """The reply as SSE, a word at a time, as a model router streams tokens."""
    words = text.split()
    for i, word in enumerate(words):
        await asyncio.sleep(WORD_INTERVAL)
        last = i == len(words) - 1
        event = {"text": word if last else word + " ", **({"model_used": "switch-demo-stream"} if last else {})}
        yield b"data: %s\n\n" % orjson.dumps(event)
    yield b"data: [DONE]\n\n"


_STREAM = ("switch", "POST", "/switch/stream")  # answered by _stream_reply, not _ENDPOINTS


def _stream_reply(req: Request) -> Response:
    message = str(_body(req).get("message", ""))[:200]
    return StreamingResponse(200, b"", [(b"cache-control", b"no-cache")], b"text/event-stream",
                             chunks=_words(f"[switch] streaming word by word, you said: {message}"))


class DemoModule:
    """A simulated module: the dispatcher its own HttpServer calls."""

    def __init__(self, name: str):
        self.name = name

    async def handle(self, req: Request) -> Response:
        if req.method == "GET" and req.path == "/health":
            return json_response({"status": "ok", "module": self.name, "uptime_s": round(time.monotonic(), 1)})
        try:
            if (self.name, req.method, req.path) == _STREAM:
                return _stream_reply(req)
            endpoint = _ENDPOINTS.get((self.name, req.method, req.path))
            if endpoint is None:
                return error_response(404, "not_found", module=self.name)
            return json_response(endpoint(req))
        except HTTPError as exc:  # a body that is not JSON, or not an object
            exc.extra["module"] = self.name
            return exc.response()

    def respond(self, req: Request) -> Coroutine[Any, Any, Response]:
        return self.handle(req)  # run in a task by the server

    def websocket(self, req: Request) -> Response:
        return error_response(404, "not_found", module=self.name)

    def admit(self, req: Request) -> Response | None:
        if req.method == "GET" and req.path == "/health" or (self.name, req.method, req.path) in (*_ENDPOINTS, _STREAM):
            req.admitted = (self.name, req.method, req.path)  # the server holds the body of admitted routes only
            return None
        return error_response(404, "not_found", module=self.name)

    def refused(self, budget: str) -> None:
        """Demo modules keep no metrics; the server has logged the refusal."""


async def start_modules(settings: Settings) -> tuple[dict[str, str], list[HttpServer]]:
    """Start every module on 127.0.0.1 with a kernel-chosen port; returns their URLs."""
    urls: dict[str, str] = {}
    servers = []
    for name, _, _ in MODULE_DEFAULTS:
        server = HttpServer(DemoModule(name), settings)
        await server.start("127.0.0.1", 0)
        servers.append(server)
        urls[name] = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    return urls, servers


def probe_env_file(settings: Settings, port: int, urls: dict[str, str]) -> str:
    """Write the settings ``edgelink probe`` needs to probe this demo (its modules' URLs, the
    gateway's address, the same ledger) as an environment file beside the ledger; returns
    its path. Probe reads it through EDGELINK_ENV_FILE like any environment file."""
    path = os.path.abspath(f"{settings.db}-probe.env")
    lines = [f"{env_name}={urls[name]}" for name, env_name, _ in MODULE_DEFAULTS]
    lines += [f"SHUB_ENABLED={'true' if settings.shub_enabled else 'false'}", f"TENTACULO_LINK_PORT={port}",
              f"EDGELINK_HOST={settings.host}", f"EDGELINK_DB={os.path.abspath(settings.db)}"]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write("# written by edgelink demo for `edgelink probe`; removed when the demo stops\n")
        fh.write("\n".join(lines) + "\n")
    return path


def _command() -> str:
    """This program as the user started it (``.venv/bin/edgelink``, or ``python -m edgelink``)."""
    if os.path.basename(sys.argv[0]) == "edgelink":
        return sys.argv[0]
    return f"{sys.executable} -m edgelink"


def banner(settings: Settings, port: int, modules: int, probe_env: str) -> str:
    """What a newcomer needs on the first screen: where the console and docs are, an event
    that shows up live, the WebSocket, a chat, a probe of every module."""
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    base, token = f"http://{host}:{port}", settings.token
    auth = f"-H 'X-VX11-Token: {token}' " if settings.enable_auth else ""
    event = orjson.dumps({"source": "demo", "type": "system.alert", "broadcast": True,
                          "payload": {"alert_id": "hello-1", "severity": "low", "message": "hello from the demo",
                                      "timestamp": int(time.time() * 1000)}}).decode()
    ws_token = f"?token={token}" if settings.enable_auth else ""
    return (f"\nedgelink demo: gateway on {base} with {modules} simulated modules"
            + (f", token {token}" if settings.enable_auth else "") + ".\n"
            f"  console   {base}/console   (sign in with the token)\n"
            f"  API docs  {base}/docs      (\"try it\" with the token)\n"
            f"  an event the console shows live (\"broadcast\": true sends it to /ws):\n"
            f"    curl {auth}-H 'Content-Type: application/json' -d '{event}' {base}/events/ingest\n"
            f"  live events over WebSocket: ws://{host}:{port}/ws{ws_token}\n"
            f"  chat:  curl {auth}-H 'Content-Type: application/json' -d '{{\"message\":\"hello\"}}' "
            f"{base}/operator/chat\n"
            f"  probe every module once:  {ENV_FILE_VAR}={probe_env} {_command()} probe\n"
            f"Stop with Ctrl-C.\n")


def run_demo(args: argparse.Namespace) -> int:
    from .serve import run, serve

    env = dict(os.environ)
    env.setdefault("VX11_GATEWAY_TOKEN", DEMO_TOKEN)
    env.setdefault("SHUB_ENABLED", "true")
    env.setdefault("EDGELINK_PROBE_INTERVAL", "10")
    try:
        base = load_settings(env=env, config_file=args.config,
                             overrides={"host": args.host or DEMO_HOST, "port": args.port})
    except ConfigError as exc:
        raise SystemExit(f"edgelink: {exc}") from None

    async def main() -> None:
        urls, servers = await start_modules(base)
        env.update({env_name: urls[name] for name, env_name, _ in MODULE_DEFAULTS})

        def load() -> Settings:
            """The demo's settings, read again on SIGHUP: the config file may change, the
            simulated modules stay where they are."""
            return load_settings(env=env, config_file=args.config,
                                 overrides={"host": args.host or DEMO_HOST, "port": args.port})

        settings = load()
        log.info("demo_modules_started", modules=urls)

        written: list[str] = []

        def ready(runtime: Any) -> None:
            written.append(probe_env_file(settings, runtime.port, urls))
            print(banner(settings, runtime.port, len(urls), written[0]), flush=True)

        try:
            await serve(settings, reload=load, on_ready=ready)
        finally:
            for server in servers:
                await server.shutdown(0)
            for path in written:
                os.unlink(path)

    run(main())
    return 0
