"""The connector's link to the local lmshare worker: a lazily connected client with a circuit
breaker, shared by the calls of one side (scheduler or model worker)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from lmshare.client import Client
from lmshare.errors import LMShareError, WorkerRestarted, WorkerUnavailable
from lmshare.integrations.vllm.settings import ConnectorSettings

log = logging.getLogger(__name__)

T = TypeVar("T")


class WorkerLink:
    """A lazily connected :class:`Client` with a circuit breaker: after the worker fails to
    answer, calls are refused at once (as :class:`WorkerUnavailable`) for ``retry_s``."""

    def __init__(self, settings: ConnectorSettings, timeout_s: float,
                 client_factory: Callable[..., Client] = Client) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self._factory = client_factory
        self._client: Client | None = None
        self._down_until = 0.0
        self._lock = threading.Lock()
        # Called with each new client / before a client is closed (e.g. to page-lock its pool).
        self.on_connect: Callable[[Client], None] | None = None
        self.on_close: Callable[[Client], None] | None = None

    def _close_client(self, client: Client) -> None:
        try:
            if self.on_close is not None:
                self.on_close(client)
            client.close()
        except Exception:  # closing a broken client
            log.debug("closing an lmshare client failed", exc_info=True)

    def _connect(self) -> Client:
        with self._lock:
            if self._client is not None:
                return self._client
            if time.monotonic() < self._down_until:
                raise WorkerUnavailable("lmshare worker is marked down; retrying later")
            try:
                key = {"key_file": self.settings.key_file} if self.settings.key_file else {}
                self._client = self._factory(worker=self.settings.worker or None,
                                             endpoint=self.settings.endpoint or None,
                                             timeout_s=self.timeout_s, **key)
            except LMShareError as exc:
                self._mark_down_locked(exc)
                raise
            if self.on_connect is not None:
                try:
                    self.on_connect(self._client)
                except Exception:  # an optimisation, never a reason to fail
                    log.warning("lmshare: setting up the new worker client failed",
                                exc_info=True)
            return self._client

    def _mark_down_locked(self, exc: Exception) -> None:
        if time.monotonic() >= self._down_until:
            log.warning("lmshare worker %s unavailable (%s); serving without lmshare for %.0fs",
                        self.settings.worker or self.settings.endpoint, exc,
                        self.settings.retry_s)
        self._down_until = time.monotonic() + self.settings.retry_s
        client, self._client = self._client, None
        if client is not None:
            self._close_client(client)

    def call(self, fn: Callable[[Client], T]) -> T:
        """Run ``fn`` with the client. A worker restarted under the same name (a new pool)
        refuses calls that name pool slabs (``WorkerRestarted``): reconnect once and retry."""
        client = self._connect()
        try:
            try:
                return fn(client)
            except WorkerRestarted:
                log.info("lmshare worker %s was restarted; reconnecting",
                         self.settings.worker or self.settings.endpoint)
                with self._lock:
                    if self._client is client:
                        self._client = None
                self._close_client(client)
                client = self._connect()
                return fn(client)
        except WorkerUnavailable as exc:
            with self._lock:
                if self._client is client:
                    self._mark_down_locked(exc)
            raise

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            self._close_client(client)
