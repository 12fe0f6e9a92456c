"""The module registry: calls to modules behind their circuit breakers, and health checks.

``Modules`` owns, for every module in ``settings.modules``, its URL, whether it is
enabled, and its breaker (API.md §2), plus one shared ``UpstreamClient``. Handlers call
``await modules.call(...)`` and get a ``ModuleReply`` or a ``ModuleError`` whose ``code``
says why (api/modules.py maps it to the API.md §3 answer):

- breaker open: ``circuit_open`` at once, the module is not contacted;
- connect error, module hung up, bad HTTP, reply over the size limit, reply not JSON:
  ``upstream_unavailable``;
- no reply within the call's timeout: ``upstream_timeout``;
- a disabled module: ``module_disabled``;
- the gateway itself out of file descriptors or buffers (``UpstreamError`` kind ``local``),
  or the reply past the caller's share of the memory account (kind ``account``):
  ``gateway_overloaded``; that says nothing about the module, so its breaker is not told;
- a body that cannot be encoded as JSON: ``invalid_json``, before the breaker is asked.

A reply is parsed only if a byte scan bounds what parsing it costs (``parse_cost_problem``):
8 MiB of ``[[],[],...]`` would build ~250 MiB of Python lists, so a reply with more than
``MAX_REPLY_NODES`` containers and separators is ``upstream_unavailable`` (a failure)
with a detail saying so. Parsing is needed anyway: chat reads the reply, and intents and
proxies must tell JSON from not JSON; they then forward the module's own bytes
(``ModuleReply.raw``) instead of encoding the parsed value again.

Any JSON reply is returned with the module's status, 4xx and 5xx included, for the
handler to forward. What the breaker counts as a failure: every error above, and 5xx.
A 4xx reply is a success for the breaker (the module is up and answering); a 4xx
without a JSON body still answers 502 but does not count.

``await modules.stream(...)`` is the same call for a reply relayed as it arrives: it
returns a ``ModuleStream`` once the module's status and headers are in (within the
timeout), whose ``body()`` yields the chunks. Its breaker verdict is the status line and
the first body byte (which must come within the timeout too, and within the idle bound);
what fails later is the caller's to see, not the breaker's to count.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncGenerator, Callable, Iterator

import orjson

from .account import DECODE, DECODED, STREAMS, Share
from .config import ModuleConfig, Settings
from .gateway.breaker import Breaker
from .gateway.health import HealthCheck, module_fields
from .jsonbounds import outside_strings
from .log import log
from .upstream import Stream, UpstreamClient, UpstreamError

GATEWAY_OVERLOADED = "gateway_overloaded"
# What a relayed stream costs the process besides the slice waiting to be written (its tasks
# and generators, the module connection and its parser, what reading 64 KiB at a time leaves
# in the heap, and what the allocators keep once it is closed), charged to the caller's share
# (piece ``streams``) from the call to the stream's end. Measured with the default settings
# (docs/memory.md): at 48 KiB the account let 478 non-reading streams open, the process peaked
# at 64-67 MiB and kept 62-66 MiB once every caller had gone, so an overload episode could
# outlast the attack for good; at 96 KiB, 311 streams, peak 54 MiB, 54.6 MiB after.
STREAM_STATE = 96 * 1024
DECODE_FACTOR = 2  # bytes held while parsing, per reply byte (orjson builds a long string, then copies it)

# JSON containers and separators a parsed reply may have: each becomes at most one Python
# object of <= ~72 bytes (an empty list and its slot), so parsing costs at most ~9 MiB more
# than the reply's strings.
MAX_REPLY_NODES = 1 << 17


def parse_cost_problem(body: bytes | bytearray) -> str:
    """Why parsing ``body`` would cost too much memory, or ``""`` (a few C-speed scans; a
    reply whose strings hold many commas and colons is counted again without them)."""
    nodes = body.count(b"[") + body.count(b"{") + body.count(b",") + body.count(b":")
    if nodes > MAX_REPLY_NODES and (nodes := len(outside_strings(body, b"[{,:"))) > MAX_REPLY_NODES:
        return f"reply has {nodes} JSON containers and separators, more than the {MAX_REPLY_NODES} parsed"
    return ""


@contextlib.contextmanager
def _encoded(module: str, data: Any, share: Share | None) -> Iterator[bytes]:
    """``data`` encoded as the body for ``module``, held in the caller's share of the account
    (piece ``json_decoded``: the client's JSON once decoded, and this copy of it on its way to
    the module) for as long as the call holds it, and given back on every path."""
    if data is None:
        yield b""
        return
    try:
        body = orjson.dumps(data)
    except orjson.JSONEncodeError as exc:  # nested too deep, for one
        raise ModuleError("invalid_json", module, f"body cannot be forwarded as JSON: {exc}") from None
    if share is None:
        yield body
        return
    if not share.take(DECODED, len(body)):
        raise ModuleError(GATEWAY_OVERLOADED, module, "the body for the module would exceed the memory account "
                                                      "(EDGELINK_MEMORY_BUDGET) or this caller's share of it; retry")
    try:
        yield body
    finally:
        share.give(DECODED, len(body))


# ModuleHealth.status for a health check that got no reply, by UpstreamError.kind.
_UNANSWERED_STATUS = {"connect": "unreachable", "timeout": "timeout"}


class ModuleError(Exception):
    """A call that got no usable reply from ``module``; ``code`` is one of those above."""

    def __init__(self, code: str, module: str, detail: str):
        super().__init__(detail)
        self.code = code
        self.module = module
        self.detail = detail


@dataclass(frozen=True, slots=True)
class ModuleReply:
    status: int
    data: Any  # the parsed JSON body (None for an empty 204)
    latency_ms: float
    raw: bytes | bytearray  # the body as the module sent it, for handlers that only forward it


class ModuleStream:
    """A module's reply being relayed: ``status`` and ``headers`` now, ``body()`` as it
    comes (ModuleError ``upstream_timeout`` / ``upstream_unavailable`` when the module goes
    quiet for ``idle`` seconds or breaks off), ``close()`` when the caller is done with it
    (the generator closes it too)."""

    def __init__(self, modules: "Modules", module: str, ticket: int, stream: Stream, *, call: tuple[str, str],
                 deadline: float, idle: float, started: float, correlation_id: str, share: Share | None = None):
        self.module = module
        self._share = share  # holds STREAM_STATE for this stream until close()
        self._call = call  # (method, path), for the log
        self.status = stream.status
        self.headers = stream.headers
        self.content_type = next((v for k, v in stream.headers if k == b"content-type"), None)
        self._modules = modules
        self._ticket: int | None = ticket
        self._stream = stream
        self._deadline = deadline
        self._idle = idle
        self._started = started
        self._correlation_id = correlation_id
        if stream.status >= 500:
            self._judge(failed=True, outcome="http_5xx")

    async def body(self) -> AsyncGenerator[bytes, None]:
        m = self._modules
        # The first byte is bounded by what is left of the call's timeout as well.
        wait = min(self._idle, max(self._deadline - m._now(), 0.0))
        try:
            while True:
                try:
                    chunk = await self._stream.read(wait)
                except UpstreamError as exc:
                    if self._ticket is not None:
                        self._judge(failed=True, outcome=exc.kind)
                    raise m._failure(self.module, exc, *self._call, self._correlation_id) from None
                if self._ticket is not None:
                    self._judge(failed=False, outcome="ok")
                if chunk is None:
                    return
                wait = self._idle
                yield chunk
        finally:
            self.close()

    def close(self) -> None:
        self._stream.close()
        if self._share is not None:
            self._share.give(STREAMS, STREAM_STATE)
            self._share = None
        if self._ticket is not None:  # over before any verdict (the caller went away)
            self._modules.breakers[self.module].release(self._ticket)
            self._ticket = None

    def _judge(self, *, failed: bool, outcome: str) -> None:
        m, ticket = self._modules, self._ticket
        assert ticket is not None
        self._ticket = None
        m._verdict(self.module, m.breakers[self.module], ticket, failed=failed)
        m._done(self.module, outcome, self._started)


class Modules:
    """``call()`` a module, ``check_all()`` their health, ``breaker_status()``, ``close()``.

    ``observe(module, outcome, seconds)``, if given, is told about every call that was
    let through; outcome is ``ok``, ``http_5xx``, ``not_json``, ``too_costly`` (to parse)
    or an UpstreamError kind (``local`` for the gateway's own limits).
    ``on_breaker(module, old, new)``, if given, is told every change of a breaker's state.
    ``checked(check)``, if given, is told each enabled module's health check of every shared round.
    """

    def __init__(self, settings: Settings, *, observe: Callable[[str, str, float], None] | None = None,
                 on_breaker: Callable[[str, str, str], None] | None = None,
                 checked: Callable[[HealthCheck], None] | None = None,
                 now: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self.settings = settings
        self.registry: dict[str, ModuleConfig] = {m.name: m for m in settings.modules}

        def watch(module: str) -> Callable[[str, str], None] | None:
            return None if on_breaker is None else lambda old, new: on_breaker(module, old, new)
        self.breakers = {m.name: Breaker(settings.breaker_failures, settings.breaker_recovery, now=now, wall=wall,
                                         on_change=watch(m.name))
                         for m in settings.modules if m.enabled}
        self._client = UpstreamClient(settings)
        self._observe = observe
        self._checked = checked
        self._now = now
        self._wall = wall
        self._token = [(b"x-vx11-token", settings.token.encode())] if settings.token else []
        self._round: asyncio.Task[dict[str, HealthCheck]] | None = None
        self._overload_logged: set[str] = set()  # modules whose calls hit a local limit, logged once

    async def call(self, module: str, method: str, path: str, *, json: Any = None,
                   timeout: float, correlation_id: str, share: Share | None = None) -> ModuleReply:
        """Call ``module`` behind its breaker; ``json`` (if not None) is sent as the body. The
        reply's bytes are taken from ``share`` (the caller's part of the memory account)."""
        config = self.registry[module]
        if not config.enabled:
            raise ModuleError("module_disabled", module, f"module {module} is disabled")
        # Encoded before the breaker is asked: a body we cannot send says nothing about the module.
        with _encoded(module, json, share) as body:
            return await self._call(config, module, method, path, body, timeout=timeout,
                                    correlation_id=correlation_id, share=share)

    async def _call(self, config: ModuleConfig, module: str, method: str, path: str, body: bytes, *,
                    timeout: float, correlation_id: str, share: Share | None) -> ModuleReply:
        breaker = self.breakers[module]
        ticket = breaker.allow()
        if ticket is None:
            raise ModuleError("circuit_open", module, f"calls to {module} are refused after {breaker.threshold} "
                                                      f"consecutive failures, until a trial call succeeds")
        headers = self._headers(correlation_id, bool(body))
        started = self._now()
        # The verdict for the breaker; None settles the ticket without one. Every way out of
        # the try (a reply, an error, a local failure, cancellation, a bug) passes the finally.
        failed: bool | None = None
        try:
            try:
                reply = await self._client.request(config.url, method, path, headers=headers, body=body,
                                                   timeout=timeout, share=share)
            except UpstreamError as exc:
                self._done(module, exc.kind, started)
                if exc.kind in ("local", "account"):  # the gateway's own limits, not the module's failure
                    self._overloaded(module, exc)
                    raise ModuleError(GATEWAY_OVERLOADED, module, str(exc)) from None
                failed = True
                log.warning("upstream_failed", module=module, method=method, path=path, kind=exc.kind,
                            error=str(exc), correlation_id=correlation_id)
                if exc.kind == "timeout":
                    raise ModuleError("upstream_timeout", module, str(exc)) from None
                raise ModuleError("upstream_unavailable", module, str(exc)) from None
            latency_ms = round((self._now() - started) * 1000, 3)
            data, problem, costly = None, "", ""
            if reply.status != 204 or reply.body:
                problem = costly = parse_cost_problem(reply.body)
                if not problem:
                    # Parsing costs up to twice the reply while it runs (a long string is built
                    # once, then copied): the account holds that too, for that long. Outside
                    # the caller's share: one parse runs at a time, and a reply within the
                    # reply limit must stay parseable whatever the share.
                    cost = DECODE_FACTOR * len(reply.body)
                    parse = share.account.open(limited=False) if share is not None else None
                    if parse is not None and not parse.take(DECODE, cost):
                        self._done(module, "account", started)
                        self._overloaded(module, UpstreamError("account", "parsing the reply would exceed the "
                                                                          "memory account or this caller's share"))
                        raise ModuleError(GATEWAY_OVERLOADED, module, "parsing the reply would exceed the memory "
                                                                      "account (EDGELINK_MEMORY_BUDGET) or this "
                                                                      "caller's share of it; retry")
                    try:
                        data = orjson.loads(reply.body)
                    except orjson.JSONDecodeError:
                        problem = f"{module} answered HTTP {reply.status} without a JSON body"
                    finally:
                        if parse is not None:
                            parse.close()
            failed = reply.status >= 500
            if problem:
                # a 4xx that is not JSON still shows the module up and answering
                failed = failed or not 400 <= reply.status < 500
                self._done(module, "too_costly" if costly else "not_json", started)
                log.warning("upstream_not_json", module=module, method=method, path=path,
                            http_code=reply.status, detail=problem, correlation_id=correlation_id)
                raise ModuleError("upstream_unavailable", module, problem)
            self._done(module, "http_5xx" if failed else "ok", started)
            self._overload_logged.discard(module)
            return ModuleReply(reply.status, data, latency_ms, reply.body)
        finally:
            if failed is None:
                breaker.release(ticket)
            else:
                self._verdict(module, breaker, ticket, failed=failed)

    async def stream(self, module: str, method: str, path: str, *, json: Any = None, timeout: float,
                     idle: float, correlation_id: str, share: Share | None = None) -> ModuleStream:
        """Call ``module`` behind its breaker for a reply relayed as it arrives; the stream's
        state (``STREAM_STATE``) is taken from ``share`` first and given back when it is closed."""
        # Encoded before the breaker is asked, as in call(): a body we cannot send says nothing.
        with _encoded(module, json, share) as body:
            return await self._stream(module, method, path, body, timeout=timeout, idle=idle,
                                      correlation_id=correlation_id, share=share)

    async def _stream(self, module: str, method: str, path: str, body: bytes, *, timeout: float, idle: float,
                      correlation_id: str, share: Share | None) -> ModuleStream:
        if share is not None and not share.take(STREAMS, STREAM_STATE):
            raise ModuleError(GATEWAY_OVERLOADED, module, "another stream would exceed the memory account "
                                                          "(EDGELINK_MEMORY_BUDGET) or this caller's share of it; retry")
        try:
            config, breaker, ticket = self._admit(module)
        except BaseException:
            if share is not None:
                share.give(STREAMS, STREAM_STATE)
            raise
        headers = self._headers(correlation_id, bool(body), accept=b"text/event-stream, application/json")
        started = self._now()
        try:
            stream = await self._client.stream(config.url, method, path, headers=headers, body=body,
                                               timeout=timeout)
        except BaseException as exc:
            if share is not None:
                share.give(STREAMS, STREAM_STATE)
            if not isinstance(exc, UpstreamError):
                breaker.release(ticket)  # cancelled: this says nothing about the module
                raise
            self._done(module, exc.kind, started)
            if exc.kind == "local":  # our own limit (fds), not the module's failure
                breaker.release(ticket)
                self._overloaded(module, exc)
                raise ModuleError(GATEWAY_OVERLOADED, module, str(exc)) from None
            self._verdict(module, breaker, ticket, failed=True)
            raise self._failure(module, exc, method, path, correlation_id) from None
        return ModuleStream(self, module, ticket, stream, call=(method, path), deadline=started + timeout, idle=idle,
                            started=started, correlation_id=correlation_id, share=share)

    def _admit(self, module: str) -> tuple[ModuleConfig, Breaker, int]:
        """The module's config, breaker and a ticket, or the ModuleError refusing the call."""
        config = self.registry[module]
        if not config.enabled:
            raise ModuleError("module_disabled", module, f"module {module} is disabled")
        breaker = self.breakers[module]
        ticket = breaker.allow()
        if ticket is None:
            raise ModuleError("circuit_open", module, f"calls to {module} are refused after {breaker.threshold} "
                                                      f"consecutive failures, until a trial call succeeds")
        return config, breaker, ticket

    @staticmethod
    def _failure(module: str, exc: UpstreamError, method: str, path: str, correlation_id: str) -> ModuleError:
        """The error for a call that got no usable reply (logged)."""
        log.warning("upstream_failed", module=module, method=method, path=path, kind=exc.kind, error=str(exc),
                    correlation_id=correlation_id)
        if exc.kind == "timeout":
            return ModuleError("upstream_timeout", module, str(exc))
        return ModuleError("upstream_unavailable", module, str(exc))

    async def check_all(self) -> dict[str, dict[str, Any]]:
        """Every module's ModuleHealth (API.md §2), disabled ones included, in registry order."""
        return {name: check.module_health() for name, check in (await self.check_round()).items()}

    async def check_round(self) -> dict[str, HealthCheck]:
        """Check every enabled module's health concurrently; callers arriving during a round share it."""
        if self._round is None:
            self._round = asyncio.create_task(self._run_check_round())
            self._round.add_done_callback(self._round_over)
        # shield: a caller that gives up must not cancel the round the others wait for
        return await asyncio.shield(self._round)

    def breaker_status(self) -> dict[str, Any]:
        """The body of GET /vx11/circuit-breaker/status."""
        return {"status": "ok", "breakers": {name: b.snapshot() for name, b in self.breakers.items()},
                "timestamp": self._wall()}

    async def close(self) -> None:
        """Stop a round of health checks in progress and close pooled connections."""
        if self._round is not None:
            self._round.cancel()
            await asyncio.gather(self._round, return_exceptions=True)
        await self._client.close()

    def _headers(self, correlation_id: str, has_body: bool,
                 accept: bytes = b"application/json") -> list[tuple[bytes, bytes]]:
        headers = [*self._token, (b"x-correlation-id", correlation_id.encode()), (b"accept", accept)]
        if has_body:
            headers.append((b"content-type", b"application/json"))
        return headers

    @staticmethod
    def _verdict(module: str, breaker: Breaker, ticket: int, *, failed: bool) -> None:
        # a change of state is told to on_breaker (the runtime counts and logs it)
        (breaker.record_failure if failed else breaker.record_success)(ticket)

    def _overloaded(self, module: str, exc: UpstreamError) -> None:
        # once per module until a call to it gets through again: a flood must not flood the log
        if module not in self._overload_logged:
            self._overload_logged.add(module)
            log.warning(GATEWAY_OVERLOADED, module=module, error=str(exc))

    def _done(self, module: str, outcome: str, started: float) -> None:
        if self._observe is not None:
            self._observe(module, outcome, self._now() - started)

    def _round_over(self, task: asyncio.Task[dict[str, HealthCheck]]) -> None:
        self._round = None
        if not task.cancelled() and task.exception() is not None:
            log.error("probe_round_failed", error=repr(task.exception()))

    async def check_one(self, name: str, correlation_id: str) -> HealthCheck:
        """One module's health, outside any shared round (for ``edgelink probe``'s progress)."""
        return await self._check(self.registry[name], correlation_id)

    async def _run_check_round(self) -> dict[str, HealthCheck]:
        modules = list(self.registry.values())
        correlation_id = uuid.uuid4().hex
        checks = await asyncio.gather(*(self._check(m, correlation_id) for m in modules))
        if self._checked is not None:
            for m, c in zip(modules, checks):
                if m.enabled:
                    self._checked(c)
        return {m.name: c for m, c in zip(modules, checks)}

    # Health checks do not feed the breakers: a breaker judges the calls it guards, and a
    # dashboard polling /vx11/status must not be what opens or closes routing to a module.
    async def _check(self, module: ModuleConfig, correlation_id: str) -> HealthCheck:
        if not module.enabled:
            return HealthCheck(module.name, "disabled", None, None, module.url, None, port=module.port)
        started = self._now()
        error: str | None
        try:
            reply = await self._client.request(module.url, "GET", "/health",
                                               headers=self._headers(correlation_id, False),
                                               timeout=self.settings.health_timeout)
        except UpstreamError as exc:
            status, http_code, error, snippet = _UNANSWERED_STATUS.get(exc.kind, "error"), None, str(exc), ""
            fields = None
        else:
            ok = 200 <= reply.status < 300
            status, http_code, error = "ok" if ok else "error", reply.status, None if ok else f"HTTP {reply.status}"
            snippet = reply.body[:800].decode("utf-8", "replace")[:200]
            fields = module_fields(reply.body) if ok else None
        latency_ms = round((self._now() - started) * 1000, 3)
        return HealthCheck(module.name, status, http_code, latency_ms, module.url, error, snippet, module.port,
                           module_fields=fields)
