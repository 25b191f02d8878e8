"""Backends as the router sees them: up or down, and how loaded (requests and tokens in flight)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field

import aiohttp

from lmshare.router.config import BackendSpec

log = logging.getLogger(__name__)

MAX_MODELS_BYTES = 1024 * 1024


@dataclass
class Backend:
    """One backend's live state. Only the router's event loop touches it."""

    spec: BackendSpec
    up: bool = True
    reason: str = "not checked yet"  # why it is down ('' when up)
    down_since: float = 0.0
    in_flight: int = 0
    in_flight_tokens: int = 0
    requests: int = 0
    failures: int = 0
    models: list[dict] = field(default_factory=list)  # /v1/models "data" entries
    # the lmshare KV namespace and chunk size of the engine (learned from its worker)
    namespace: bytes = b""
    chunk_tokens: int = 0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def url(self) -> str:
        return self.spec.url

    def load(self) -> tuple[int, int]:
        return (self.in_flight, self.in_flight_tokens)

    def mark_down(self, reason: str) -> None:
        if self.up:
            log.warning("backend %s (%s) is down: %s", self.name, self.url, reason)
            self.down_since = time.time()
        self.up, self.reason = False, reason
        self.failures += 1

    def mark_up(self) -> None:
        if not self.up:
            log.info("backend %s (%s) is up again", self.name, self.url)
        self.up, self.reason = True, ""

    def serves(self, model: str | None) -> bool:
        """Whether it serves ``model`` (True while its model list is unknown)."""
        if not model or not self.models:
            return True
        return any(m.get("id") == model for m in self.models)


def _model_entries(payload: object) -> list[dict]:
    """The ``data`` list of a /v1/models answer, checked (it comes from the network)."""
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        return []
    return [m for m in payload["data"][:256]
            if isinstance(m, dict) and isinstance(m.get("id"), str)]


async def check_backend(session: aiohttp.ClientSession, backend: Backend,
                        timeout_s: float) -> None:
    """Probe ``/v1/models`` (which also says what the backend serves); marks it up or down."""
    try:
        async with session.get(f"{backend.url}/v1/models",
                               timeout=aiohttp.ClientTimeout(total=timeout_s)) as reply:
            if reply.status != 200:
                backend.mark_down(f"/v1/models answered HTTP {reply.status}")
                return
            body = await reply.content.read(MAX_MODELS_BYTES)
        try:
            models = _model_entries(json.loads(body))
        except ValueError:
            backend.mark_down("/v1/models answered something that is not JSON")
            return
        backend.models = models
        backend.mark_up()
    except asyncio.TimeoutError:
        backend.mark_down(f"no answer to /v1/models within {timeout_s:.1f}s")
    except aiohttp.ClientError as exc:
        backend.mark_down(f"cannot reach it ({exc.__class__.__name__}: {exc})")


async def health_loop(session: aiohttp.ClientSession, backends: list[Backend],
                      interval_s: float, timeout_s: float) -> None:
    """Probe every backend each ``interval_s`` until cancelled."""
    while True:
        await asyncio.gather(*(check_backend(session, b, timeout_s) for b in backends))
        await asyncio.sleep(interval_s)
