"""The router: an OpenAI-compatible HTTP proxy (aiohttp) in front of vLLM servers.

Requests and responses pass through unchanged (streamed responses chunk by chunk); the router
only picks the backend. A backend that cannot be reached, times out or answers 502/503/504
before the response started is marked down and the request goes to another one; a backend that
fails mid-stream ends the stream with an error event. No backend left: 503 (none is up) or 502
(every one tried failed), with the reasons.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lmshare.router import policy
from lmshare.router.backends import Backend, check_backend, health_loop
from lmshare.router.config import RouterConfig
from lmshare.router.metrics import RouterMetrics
from lmshare.router.policy import Decision, Rotation

log = logging.getLogger(__name__)

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailers", "transfer-encoding", "upgrade", "host", "content-length",
              "accept-encoding", "content-encoding", "server", "date"}
MAX_BUFFERED_REPLY = 64 * 1024 * 1024
ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}


class _BackendFailed(Exception):
    """The backend failed before any byte of the response reached the client."""


def error_reply(status: int, message: str, type_: str, headers: dict | None = None
                ) -> web.Response:
    """An OpenAI-style error body."""
    return web.json_response({"error": {"message": message, "type": type_, "code": status}},
                             status=status, headers=headers)


def _sse_error(message: str) -> bytes:
    payload = {"error": {"message": message, "type": "backend_failed", "code": 502}}
    return f"data: {json.dumps(payload)}\n\n".encode()


class Router:
    """Owns the backends, the policy and the HTTP client session; :meth:`app` serves them."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.backends = [Backend(spec) for spec in config.backends]
        self.metrics = RouterMetrics(self.backends)
        self.rotation = Rotation()
        self.session: aiohttp.ClientSession | None = None
        self.link: Any = None  # AsyncShardLinks, with the prefix policies
        self.tokenizer: Any = None  # router.tokens.Tokenizer once loaded
        self.tokenizer_status = "not needed" if not self._prefix else "not loaded yet"
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="lmshare-router-tokenize")
        self._tasks: list[asyncio.Task] = []
        self.started_at = time.time()

    @property
    def _prefix(self) -> bool:
        return self.config.policy.startswith("prefix")

    # ------------------------------------------------------------------ lifecycle
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes)
        app.router.add_post("/v1/completions", self.handle_generate)
        app.router.add_post("/v1/chat/completions", self.handle_generate)
        app.router.add_get("/v1/models", self.handle_models)
        app.router.add_get("/health", self.handle_health)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get("/router/stats", self.handle_stats)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app: web.Application) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
            auto_decompress=False)
        timeout = min(2.0, self.config.connect_timeout_s)
        await asyncio.gather(*(check_backend(self.session, b, timeout) for b in self.backends))
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(health_loop(
            self.session, self.backends, self.config.health_interval_s, timeout)))
        if self._prefix:
            from lmshare.router.controller_link import AsyncShardLinks

            self.link = AsyncShardLinks(self.config.controller, self.config.key)
            self._tasks.append(loop.create_task(self._signature_loop()))
            self._tasks.append(loop.create_task(self._load_tokenizer()))

    async def _stop(self, app: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()
        if self.link is not None:
            self.link.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _signature_loop(self) -> None:
        from lmshare.router.prefix import refresh_signatures

        while True:
            await refresh_signatures(self.link, self.backends, 1.0)
            await asyncio.sleep(self.config.signature_refresh_s)

    def _tokenizer_name(self) -> str:
        if self.config.tokenizer:
            return self.config.tokenizer
        for backend in self.backends:
            for model in backend.models:
                root = model.get("root")
                return root if isinstance(root, str) and root else model["id"]
        return ""

    async def _load_tokenizer(self) -> None:
        """Load the served model's tokenizer (in a thread); retried until a backend names it."""
        from lmshare.errors import ConfigError
        from lmshare.router.tokens import Tokenizer

        loop = asyncio.get_running_loop()
        while self.tokenizer is None:
            name = self._tokenizer_name()
            if not name:
                self.tokenizer_status = "waiting for a backend to name its model"
            else:
                try:
                    self.tokenizer = await loop.run_in_executor(self._executor, Tokenizer, name)
                    self.tokenizer_status = f"loaded {name}"
                    log.info("router tokenizes with %s", name)
                    return
                except ConfigError as exc:
                    self.tokenizer_status = str(exc)
                    log.error("%s", exc)
                    if self.config.tokenizer:
                        return  # named by hand: retrying will not help
            await asyncio.sleep(self.config.health_interval_s)

    # ------------------------------------------------------------------ routing
    async def _tokens(self, endpoint: str, body: dict) -> list[int] | None:
        if self.tokenizer is None:
            return None
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self.tokenizer.tokens, endpoint,
                                              body)
        except Exception as exc:  # a prompt the tokenizer rejects: route by load
            log.debug("tokenizing failed: %s", exc)
            return None

    async def choose(self, endpoint: str, body: dict, candidates: list[Backend]
                     ) -> tuple[Decision, list[int] | None]:
        """The backend for a request (``candidates`` are up and serve its model)."""
        name = self.config.policy
        if name == "round-robin":
            return policy.round_robin(candidates, self.rotation), None
        if name == "least-loaded":
            return policy.least_loaded(candidates, self.rotation), None
        tokens = await self._tokens(endpoint, body)
        if tokens is None:
            return policy.least_loaded(candidates, self.rotation, policy.NO_TOKENS), None
        from lmshare.router.prefix import lookup_prefix

        answer = await lookup_prefix(self.link, candidates, tokens, self.config.lookup_timeout_s)
        if answer.seconds:
            self.metrics.lookup_seconds.observe(answer.seconds)
        if answer.error:
            return policy.least_loaded(candidates, self.rotation, answer.error), tokens
        margin = self.config.load_margin if name == "prefix+load" else None
        return policy.by_prefix(candidates, answer.held_chunks, answer.chunk_tokens,
                                self.rotation, margin), tokens

    # ------------------------------------------------------------------ handlers
    async def handle_generate(self, request: web.Request) -> web.StreamResponse:
        endpoint = ENDPOINTS[request.path]
        response = await self._generate(request, endpoint)
        self.metrics.requests.labels(endpoint, str(response.status)).inc()
        return response

    async def _generate(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        received = time.monotonic()
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error_reply(413, f"request body larger than {self.config.max_body_bytes} "
                                    "bytes", "invalid_request_error")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return error_reply(400, f"request body is not JSON ({exc})", "invalid_request_error")
        if not isinstance(body, dict):
            return error_reply(400, "request body must be a JSON object", "invalid_request_error")
        model = body.get("model") if isinstance(body.get("model"), str) else None
        up = [b for b in self.backends if b.up]
        candidates = [b for b in up if b.serves(model)]
        if not candidates:
            return self._unavailable(model, up)
        decision, tokens = await self.choose(endpoint, body, candidates)
        self.metrics.decisions.labels(self.config.policy, decision.reason).inc()
        if tokens is not None:
            self.metrics.prefix_tokens.labels("prompt").inc(len(tokens))
            self.metrics.prefix_tokens.labels("held").inc(decision.prefix_tokens)
        cost = (len(tokens) if tokens is not None else len(raw) // 4) + _max_tokens(body)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Accept-Encoding"] = "identity"
        failures: list[str] = []
        tried: set[str] = set()
        backend, reason = decision.backend, decision.reason
        limit = len(self.backends) if self.config.retries < 0 else self.config.retries + 1
        while True:
            try:
                return await self._forward(request, backend, raw, headers, cost, reason,
                                           received)
            except _BackendFailed as exc:
                failures.append(f"{backend.name}: {exc}")
                tried.add(backend.name)
                backend.mark_down(str(exc))
            rest = [b for b in self.backends
                    if b.up and b.serves(model) and b.name not in tried]
            if not rest or len(failures) >= limit:
                break
            self.metrics.retries.inc()
            backend, reason = policy.least_loaded(rest, self.rotation).backend, "retry"
        return error_reply(502, "every backend tried failed: " + "; ".join(failures),
                           "backend_failed")

    def _unavailable(self, model: str | None, up: list[Backend]) -> web.Response:
        if up:
            served = sorted({m["id"] for b in up for m in b.models})
            return error_reply(404, f"no backend that is up serves model {model!r}; served: "
                                    f"{', '.join(served) or 'none'}", "not_found_error")
        reasons = "; ".join(f"{b.name}: {b.reason}" for b in self.backends)
        return error_reply(503, f"no backend is up ({reasons})", "service_unavailable",
                           {"Retry-After": "1"})

    async def _forward(self, request: web.Request, backend: Backend, raw: bytes,
                       headers: dict, cost: int, reason: str, received: float
                       ) -> web.StreamResponse:
        assert self.session is not None
        timeout = aiohttp.ClientTimeout(total=None, connect=self.config.connect_timeout_s,
                                        sock_read=self.config.read_timeout_s)
        backend.in_flight += 1
        backend.in_flight_tokens += cost
        backend.requests += 1
        try:
            try:
                upstream = await self.session.post(f"{backend.url}{request.path_qs}", data=raw,
                                                   headers=headers, timeout=timeout)
            except asyncio.TimeoutError:
                raise _BackendFailed("no answer in time") from None
            except aiohttp.ClientError as exc:
                raise _BackendFailed(f"{exc.__class__.__name__}: {exc}") from None
            try:
                return await self._relay(request, backend, upstream, reason, received)
            finally:
                upstream.close()
        finally:
            backend.in_flight -= 1
            backend.in_flight_tokens -= cost

    async def _relay(self, request: web.Request, backend: Backend,
                     upstream: aiohttp.ClientResponse, reason: str, received: float
                     ) -> web.StreamResponse:
        if upstream.status in (502, 503, 504):
            raise _BackendFailed(f"answered HTTP {upstream.status}")
        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["X-LMShare-Backend"] = backend.name
        headers["X-LMShare-Route"] = reason
        streamed = "text/event-stream" in upstream.headers.get("Content-Type", "")
        try:
            if not streamed:
                parts: list[bytes] = []
                size = 0
                while chunk := await upstream.content.readany():
                    parts.append(chunk)
                    size += len(chunk)
                    if size > MAX_BUFFERED_REPLY:
                        raise _BackendFailed(f"answered more than {MAX_BUFFERED_REPLY} bytes")
                first = b"".join(parts)
            else:
                first = await upstream.content.readany()
        except asyncio.TimeoutError:
            raise _BackendFailed(f"silent for {self.config.read_timeout_s:.0f}s") from None
        except aiohttp.ClientError as exc:
            raise _BackendFailed(f"failed while answering ({exc.__class__.__name__})") from None
        self.metrics.first_byte_seconds.labels(backend.name).observe(time.monotonic() - received)
        if not streamed:
            return web.Response(status=upstream.status, body=first, headers=headers)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        await response.prepare(request)
        try:
            await response.write(first)
            while True:
                try:
                    chunk = await upstream.content.readany()
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    message = (f"backend {backend.name} failed mid-stream "
                               f"({exc.__class__.__name__}); the response is incomplete")
                    log.warning("%s", message)
                    backend.mark_down("failed mid-stream")
                    await response.write(_sse_error(message))
                    break
                if not chunk:
                    break
                await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:
            log.debug("client went away during a stream from %s", backend.name)
        return response

    async def handle_models(self, request: web.Request) -> web.Response:
        up = [b for b in self.backends if b.up]
        if not up:
            return self._unavailable(None, up)
        seen: dict[str, dict] = {}
        for backend in up:
            for model in backend.models:
                seen.setdefault(model["id"], model)
        return web.json_response({"object": "list", "data": list(seen.values())})

    async def handle_health(self, request: web.Request) -> web.Response:
        up = [b.name for b in self.backends if b.up]
        down = {b.name: b.reason for b in self.backends if not b.up}
        return web.json_response({"status": "ok" if up else "unavailable", "up": up,
                                  "down": down}, status=200 if up else 503)

    async def handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    def stats(self) -> dict[str, Any]:
        """What the dashboard's router panel shows (lmshare.stats.RouterStats)."""

        def samples(metric, suffix: str):
            for family in metric.collect():
                for sample in family.samples:
                    if sample.name.endswith(suffix):
                        yield sample

        m = self.metrics
        decisions = {s.labels["reason"]: int(s.value) for s in samples(m.decisions, "_total")}
        tokens = {s.labels["kind"]: int(s.value) for s in samples(m.prefix_tokens, "_total")}
        lookups = next(samples(m.lookup_seconds, "_count")).value
        lookup_sum = next(samples(m.lookup_seconds, "_sum")).value
        return {
            "policy": self.config.policy,
            "requests": int(sum(s.value for s in samples(m.requests, "_total"))),
            "retries": int(next(samples(m.retries, "_total")).value),
            "decisions": decisions, "lookups": int(lookups),
            "lookup_mean_ms": round(lookup_sum / lookups * 1000, 3) if lookups else 0.0,
            "prompt_tokens": tokens.get("prompt", 0), "held_tokens": tokens.get("held", 0),
            "tokenizer": self.tokenizer_status,
            "backends": [{"name": b.name, "url": b.url, "worker": b.spec.worker, "up": b.up,
                          "reason": b.reason, "in_flight": b.in_flight,
                          "in_flight_tokens": b.in_flight_tokens, "requests": b.requests,
                          "failures": b.failures, "namespace": b.namespace.hex(),
                          "chunk_tokens": b.chunk_tokens}
                         for b in self.backends],
        }


def _max_tokens(body: dict) -> int:
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1 << 24:
            return value
    return 16


async def serve(config: RouterConfig, ready: Any = None) -> None:
    """Run the router until cancelled. ``ready(port)`` is called once it listens."""
    from lmshare.errors import ConfigError

    router = Router(config)
    runner = web.AppRunner(router.app(), access_log=None, handle_signals=False,
                           shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {config.host}:{config.port} ({exc.strerror}); "
                          "choose another --port or stop the process using it") from None
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    log.info("lmshare router (%s) on http://%s:%d, backends %s", config.policy, config.host,
             port, ", ".join(f"{b.name}={b.url}" for b in config.backends))
    if ready is not None:
        ready(port)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
