"""vLLM KV connector: vLLM instances share their prompt KV through lmshare workers.

Loaded by configuration only (vLLM's KV connector v1 API)::

    from vllm.config import KVTransferConfig
    KVTransferConfig(kv_connector="LMShareConnector",
                     kv_connector_module_path="lmshare.integrations.vllm",
                     kv_role="kv_both",
                     kv_connector_extra_config={"worker": "node-a"})

or ``--kv-transfer-config '{"kv_connector":"LMShareConnector","kv_connector_module_path":
"lmshare.integrations.vllm","kv_role":"kv_both","kv_connector_extra_config":{"worker":"node-a"}}'``.

``kv_connector_extra_config`` keys (defaults in brackets):

``worker`` [$LMSHARE_WORKER]
    Name of the lmshare worker on this host (``lmshare worker --name``). Required unless
    ``endpoint`` is given.
``endpoint`` [""]
    The worker's local endpoint (e.g. ``ipc:///run/lmshare/worker-a.sock``) instead of a name.
``peers`` [true]
    Fetch chunks that only other workers hold. ``false`` keeps the cache siloed (local hits only,
    the baseline to compare against).
``chunk_tokens`` [256]
    Tokens per chunk; a multiple of vLLM's ``block_size``. Part of the key namespace: engines
    share KV only with the same chunk size.
``timeout_s`` [10.0]
    Deadline of one call to the worker from the model worker (acquire with peer fetches,
    stores). Should exceed the worker's ``--fetch-timeout``.
``lookup_timeout_s`` [2.0]
    Deadline of one lookup from the scheduler; a late worker means "no hit", never a stall.
``retry_s`` [5.0]
    After the worker failed to answer, how long to skip calls (treat as miss) before trying
    again, so that a dead worker costs at most one deadline per ``retry_s``.
``lease_s`` [30.0]
    How long the worker keeps chunks pinned for a load if the engine dies mid-copy.
``load`` / ``save`` [true / true]
    Load hits / store new chunks. ``save: false`` makes a read-only consumer (as does
    ``kv_role: kv_consumer``; ``kv_producer`` only stores).
``async_save`` [true]
    Hand stores to a background thread after the KV is copied out (the forward loop does not
    wait for the worker's RPCs). ``false`` stores inline.
``same_host_direct`` [true]
    Read chunks that workers on this host hold straight from their pools (mapped read-only;
    page-locked on GPU) instead of having the local worker copy them first. Each such chunk's
    slab generations are checked after the copy and before the forward uses it.
``fetch_batch_chunks`` [8]
    On GPU, chunks beyond the local pool's prefix are acquired in batches of this many: the
    copies of one batch run while the worker fetches the next from peers. 0: one acquire.
``max_pending_saves`` [64]
    Stores queued for the background thread before new ones are dropped (a dropped store is
    only a future miss).
``tenant`` [""]
    Extra namespace: engines with different tenants never share KV. A request's ``cache_salt``
    is added to it, so salted requests only share with the same salt.

How it works (scheduler side, then worker side):

* ``get_num_new_matched_tokens`` computes the request's chained chunk keys under the engine's
  :class:`~lmshare.keys.ModelSignature` (derived from vLLM's config, see
  :mod:`lmshare.integrations.vllm_signature`) and asks the local worker how long a prefix the
  cluster holds (local pool, then peers through the controller). The hit is decided once, here:
  whole chunks, at most ``prompt length - 1`` tokens rounded down to a block. Any error is a
  miss, logged, never raised.
* ``start_load_kv`` acquires those chunks (the worker fetches peer chunks into its pool and pins
  them) and copies them into the request's blocks as whole pages (:mod:`kv_copy`: inline on
  CPU; on CUDA by DMA from the page-locked pool on a side stream, issued layer by layer, and
  ``wait_for_layer_load`` makes each attention layer wait for its own layer only, so the forward
  overlaps the copies of later layers; the leases are released in ``wait_for_save``, once the
  copies are done). Chunks that do not arrive, or
  arrive with the wrong size, are reported through ``get_block_ids_with_load_errors``: vLLM
  recomputes from the first such block (the connector sets ``kv_load_failure_policy`` to
  ``recompute``). Never wrong tokens, only lost time.
* ``wait_for_save`` copies each newly completed full prompt chunk (all layers) out of the blocks
  and stores it with ``put_keys``; each chunk is stored once per request, and chunks that the
  cluster already held at lookup are not stored again.

Logging: the ``lmshare`` logger; unless the process configured logging, the connector prints
lmshare's messages to stderr at ``$LMSHARE_LOG_LEVEL`` (default INFO).

A worker restarted under the same name is noticed before every acquire and store (its pool is
new), and the connector reconnects; a worker that is down means misses, never a stall.

Limits: one KV cache group (plain attention models), no pipeline parallelism, no multimodal or
prompt-embedding requests (they are served without lmshare), only prompt tokens are stored.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from lmshare.client import DEFAULT_LEASE_S, Client, Hit
from lmshare.errors import (
    ConfigError,
    LMShareError,
    RemoteError,
    WorkerRestarted,
    WorkerUnavailable,
)
from lmshare.integrations.kv_copy import (
    AsyncDeviceCopier,
    BlockCopier,
    ChunkSizeError,
    KVGeometry,
    LayoutError,
    PagedBlocks,
    PendingSave,
    buffer_address,
    make_copier,
)
from lmshare.integrations.vllm_signature import derive_signature, lora_identity
from lmshare.keys import DEFAULT_CHUNK_TOKENS, ModelSignature, chunk_keys

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

T = TypeVar("T")


def _setup_logging() -> None:
    """Inside vLLM the connector is lmshare's entry point: unless the application configured
    logging, show lmshare's messages (level from $LMSHARE_LOG_LEVEL, default INFO) the way
    vLLM shows its own."""
    root, ours = logging.getLogger(), logging.getLogger("lmshare")
    if root.handlers or ours.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(
        "%(levelname)s %(asctime)s %(message)s", datefmt="%m-%d %H:%M:%S"))
    ours.addHandler(handler)
    level = os.environ.get("LMSHARE_LOG_LEVEL", "INFO").upper()
    ours.setLevel(level if isinstance(logging.getLevelName(level), int) else logging.INFO)
    ours.propagate = False


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class ConnectorSettings:
    """``kv_connector_extra_config``, validated (see the module docstring)."""

    worker: str = ""
    endpoint: str = ""
    peers: bool = True
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    timeout_s: float = 10.0
    lookup_timeout_s: float = 2.0
    retry_s: float = 5.0
    lease_s: float = DEFAULT_LEASE_S
    load: bool = True
    save: bool = True
    async_save: bool = True
    max_pending_saves: int = 64
    fetch_batch_chunks: int = 8
    same_host_direct: bool = True
    tenant: str = ""

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any] | None, block_size: int
                          ) -> ConnectorSettings:
        extra = dict(extra or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(extra) - set(known))
        if unknown:
            raise ConfigError(f"unknown lmshare connector settings {unknown} in "
                              f"kv_connector_extra_config; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for name, value in extra.items():
            kind = type(known[name].default)
            try:
                if kind is bool:
                    if isinstance(value, str):
                        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                            raise ValueError(value)
                        value = value.lower() in ("true", "1", "yes")
                    values[name] = bool(value)
                else:
                    values[name] = kind(value)
            except (TypeError, ValueError):
                raise ConfigError(f"lmshare connector setting {name}={value!r} must be a "
                                  f"{kind.__name__}") from None
        if not values.get("worker") and not values.get("endpoint"):
            values["worker"] = os.environ.get("LMSHARE_WORKER", "")
        settings = cls(**values)
        if not settings.worker and not settings.endpoint:
            raise ConfigError("the lmshare connector needs the local worker: set "
                              "kv_connector_extra_config {\"worker\": NAME} (the name given to "
                              "`lmshare worker --name`), or LMSHARE_WORKER")
        if settings.chunk_tokens <= 0 or settings.chunk_tokens % block_size:
            raise ConfigError(f"chunk_tokens={settings.chunk_tokens} must be a positive multiple "
                              f"of vLLM's block_size ({block_size})")
        if settings.fetch_batch_chunks < 0:
            raise ConfigError("lmshare connector setting fetch_batch_chunks must be >= 0")
        for name in ("timeout_s", "lookup_timeout_s", "lease_s"):
            if getattr(settings, name) <= 0:
                raise ConfigError(f"lmshare connector setting {name} must be positive")
        return settings


# --------------------------------------------------------------------------- worker link
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
        self.failures = 0
        # Called with each new client / before a client is closed (e.g. to page-lock its pool).
        self.on_connect: Callable[[Client], None] | None = None
        self.on_close: Callable[[Client], None] | None = None

    def _close_client(self, client: Client) -> None:
        try:
            if self.on_close is not None:
                self.on_close(client)
            client.close()
        except Exception:  # noqa: BLE001 - closing a broken client
            log.debug("closing an lmshare client failed", exc_info=True)

    def _connect(self) -> Client:
        with self._lock:
            if self._client is not None:
                return self._client
            if time.monotonic() < self._down_until:
                raise WorkerUnavailable("lmshare worker is marked down; retrying later")
            try:
                self._client = self._factory(worker=self.settings.worker or None,
                                             endpoint=self.settings.endpoint or None,
                                             timeout_s=self.timeout_s)
            except LMShareError as exc:
                self._mark_down_locked(exc)
                raise
            if self.on_connect is not None:
                try:
                    self.on_connect(self._client)
                except Exception:  # noqa: BLE001 - an optimisation, never a reason to fail
                    log.warning("lmshare: setting up the new worker client failed",
                                exc_info=True)
            return self._client

    def _mark_down_locked(self, exc: Exception) -> None:
        self.failures += 1
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


# --------------------------------------------------------------------------- metadata
@dataclass
class LoadSpec:
    """Load chunks ``first_chunk ..`` into blocks: global block ``first_block + i`` of the
    request goes to ``block_ids[i]``."""

    req_id: str
    namespaces: list[bytes]  # per TP rank
    keys: list[list[bytes]]  # per TP rank, chunks first_chunk .. last needed
    first_chunk: int
    first_block: int
    block_ids: list[int]
    local_chunks: int = 0  # of these chunks, how many the local pool held at lookup


@dataclass
class SaveSpec:
    """Store chunks ``first_chunk ..``; chunk ``i`` is made of blocks ``block_ids[i]``."""

    req_id: str
    namespaces: list[bytes]
    keys: list[list[bytes]]  # per TP rank, one per chunk
    first_chunk: int
    block_ids: list[list[int]]


@dataclass
class LMShareMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class LMShareWorkerMetadata(KVConnectorWorkerMetadata):
    """Model worker -> scheduler: the first chunk of each request that failed to load (so the
    scheduler stores it once recomputed), and whether a worker switched lmshare off."""

    failed_chunks: dict[str, int] = field(default_factory=dict)
    disabled: bool = False

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if not isinstance(other, LMShareWorkerMetadata):
            return self
        merged = dict(self.failed_chunks)
        for req_id, chunk in other.failed_chunks.items():
            merged[req_id] = min(chunk, merged.get(req_id, chunk))
        return LMShareWorkerMetadata(merged, self.disabled or other.disabled)


@dataclass
class _RequestState:
    tokens: list[int]
    namespaces: list[bytes]
    keys: list[list[bytes]]  # per rank, every full chunk of the prompt
    lookup_computed: int = 0  # num_computed_tokens the last lookup was made with
    looked_up: bool = False  # the worker counted this request's lookup already
    hit_tokens: int = 0  # prefix tokens the cluster supplies (absolute)
    local_chunks: int = 0
    peer_chunks: int = 0
    saved_upto: int = 0  # chunks below this need no store
    block_ids: list[int] = field(default_factory=list)  # tracked when vLLM gives no block state


# --------------------------------------------------------------------------- connector
def _vllm_version() -> str:
    try:
        from vllm.version import __version__
    except Exception:  # noqa: BLE001
        return "unknown"
    return str(__version__)


def _device_type() -> str:
    try:
        from vllm.platforms import current_platform

        return str(current_platform.device_type)
    except Exception:  # noqa: BLE001
        return "unknown"


def _tp_rank(vllm_config: Any) -> int:
    if int(vllm_config.parallel_config.tensor_parallel_size) == 1:
        return 0
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    return int(get_tensor_model_parallel_rank())


class LMShareConnector(KVConnectorBase_V1):
    """Shares prompt KV between vLLM instances through the local lmshare worker."""

    _cache_hit_source = CacheHitSource.P2P

    @property
    def requires_kv_delivery(self) -> bool:
        # A best-effort cache: a store that does not happen is a future miss, nothing more.
        return False

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        _setup_logging()
        transfer = self._kv_transfer_config
        self.block_size = int(vllm_config.cache_config.block_size)
        self.settings = ConnectorSettings.from_extra_config(
            transfer.kv_connector_extra_config, self.block_size)
        parallel = vllm_config.parallel_config
        if int(getattr(parallel, "pipeline_parallel_size", 1) or 1) > 1:
            raise ConfigError("the lmshare connector does not support pipeline parallelism yet; "
                              "run with pipeline_parallel_size=1 or without LMShareConnector")
        if getattr(transfer, "kv_load_failure_policy", "recompute") != "recompute":
            # A chunk that does not arrive must cost a recompute, never a failed request.
            log.info("lmshare: setting kv_load_failure_policy=recompute (was %s)",
                     transfer.kv_load_failure_policy)
            transfer.kv_load_failure_policy = "recompute"
        self.geometry = KVGeometry.from_kv_cache_config(kv_cache_config)
        if self.geometry.block_size != self.block_size:
            raise ConfigError(f"KV cache block size {self.geometry.block_size} differs from "
                              f"cache_config.block_size {self.block_size}")
        # kv_role: a "kv_consumer" only loads, a "kv_producer" only stores.
        self.load_enabled = self.settings.load and transfer.is_kv_consumer
        self.save_enabled = self.settings.save and transfer.is_kv_producer
        self.chunk_tokens = self.settings.chunk_tokens
        self.blocks_per_chunk = self.chunk_tokens // self.block_size
        self.tp_size = int(parallel.tensor_parallel_size)
        device, version = _device_type(), _vllm_version()
        self._signatures: list[ModelSignature] = [
            derive_signature(vllm_config, kv_cache_config, self.geometry, self.chunk_tokens,
                             rank, device, version, self.settings.tenant)
            for rank in range(self.tp_size)]
        self._namespace_cache: dict[tuple[str, str], list[bytes]] = {}
        self.enabled = True
        log.info("lmshare connector (%s) for worker %s: namespace %s, chunk %d tokens = %d blocks"
                 " of %d layers x %d bytes (%d bytes/chunk), peers=%s",
                 role.name.lower(), self.settings.worker or self.settings.endpoint,
                 self._signatures[0].namespace().hex()[:12], self.chunk_tokens,
                 self.blocks_per_chunk, self.geometry.num_layers, self.geometry.page_bytes,
                 self.geometry.chunk_nbytes(self.blocks_per_chunk), self.settings.peers)

        # scheduler side
        self._states: dict[str, _RequestState] = {}
        self._pending_loads: dict[str, LoadSpec] = {}
        # worker side
        self.tp_rank = 0
        self._copier: BlockCopier | None = None
        self._layer_index = {name: i for i, name in enumerate(self.geometry.layer_names)}
        self._loading_hits: list[Hit] = []  # leased until this step's copies finished
        self._peer_pools: dict[int, Any] = {}  # same-host peers' pools registered with the copier
        self._failed_blocks: set[int] = set()
        self._failed_chunks: dict[str, int] = {}
        self._disabled_reported = False
        self._saver: _Saver | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._link = WorkerLink(self.settings, self.settings.lookup_timeout_s)
        else:
            self.tp_rank = _tp_rank(vllm_config)
            self._link = WorkerLink(self.settings, self.settings.timeout_s)

    # ------------------------------------------------------------------ keys
    @property
    def signature(self) -> ModelSignature:
        return self._signatures[self.tp_rank]

    def _namespaces(self, lora: str, salt: str) -> list[bytes]:
        cached = self._namespace_cache.get((lora, salt))
        if cached is None:
            cached = []
            for sig in self._signatures:
                tenant = f"{sig.tenant}/salt:{salt}" if salt else sig.tenant
                cached.append(dataclasses.replace(sig, lora_adapter=lora,
                                                  tenant=tenant).namespace())
            self._namespace_cache[(lora, salt)] = cached
        return cached

    def _state_for(self, request: Request) -> _RequestState | None:
        state = self._states.get(request.request_id)
        if state is not None:
            return state
        tokens = request.prompt_token_ids
        if tokens is None or getattr(request, "mm_features", None) or \
                getattr(request, "prompt_embeds", None) is not None:
            return None  # multimodal / embeddings: not keyed by token ids alone
        tokens = list(tokens)
        namespaces = self._namespaces(lora_identity(getattr(request, "lora_request", None)),
                                      str(getattr(request, "cache_salt", None) or ""))
        keys = [chunk_keys(ns, tokens, self.chunk_tokens) for ns in namespaces]
        state = _RequestState(tokens, namespaces, keys)
        self._states[request.request_id] = state
        return state

    # ------------------------------------------------------------------ scheduler side
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        try:
            return self._matched_tokens(request, num_computed_tokens), False
        except WorkerUnavailable as exc:  # WorkerLink logs once per outage
            log.debug("lmshare lookup for %s skipped: %s", request.request_id, exc)
            return 0, False
        except Exception as exc:  # noqa: BLE001 - a lookup problem is a miss, never a crash
            log.warning("lmshare lookup for request %s failed (%s); computing it",
                        request.request_id, exc, exc_info=not isinstance(exc, LMShareError))
            return 0, False

    def _matched_tokens(self, request: Request, num_computed_tokens: int) -> int:
        if not self.enabled:
            return 0
        state = self._state_for(request)
        if state is None:
            return 0
        first_chunk = num_computed_tokens // self.chunk_tokens
        state.lookup_computed = num_computed_tokens
        state.hit_tokens = num_computed_tokens
        state.local_chunks = state.peer_chunks = 0
        state.saved_upto = max(state.saved_upto, first_chunk)
        # vLLM computes at least the last prompt token; loads are whole blocks.
        limit = (len(state.tokens) - 1) // self.block_size * self.block_size
        wanted = min(len(state.keys[0]), math.ceil(limit / self.chunk_tokens))
        if not self.load_enabled or limit <= num_computed_tokens or wanted <= first_chunk:
            return 0
        local = peer = None
        first_lookup = not state.looked_up  # vLLM asks again each step it cannot schedule it
        state.looked_up = True
        for namespace, keys in zip(state.namespaces, state.keys):
            rank_local, rank_peer = self._link.call(
                lambda c, ns=namespace, k=keys: c.lookup_keys(
                    ns, k[first_chunk:wanted], peers=self.settings.peers, count=first_lookup))
            if local is None or rank_local + rank_peer < local + peer:
                local, peer = rank_local, rank_peer
        assert local is not None and peer is not None
        present = local + peer
        state.local_chunks, state.peer_chunks = local, peer
        state.saved_upto = max(state.saved_upto, first_chunk + present)
        hit = min((first_chunk + present) * self.chunk_tokens, limit)
        if hit <= num_computed_tokens:
            return 0
        state.hit_tokens = hit
        log.debug("lmshare hit for %s: tokens %d..%d (%d local + %d peer chunks)",
                  request.request_id, num_computed_tokens, hit, local, peer)
        return hit - num_computed_tokens

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int
                                       ) -> dict[CacheHitSource, int]:
        if num_external_tokens <= 0:
            return {}
        state = self._states.get(request.request_id)
        if state is None:
            return {CacheHitSource.P2P: num_external_tokens}
        local = min(num_external_tokens, state.local_chunks * self.chunk_tokens)
        sources = {CacheHitSource.HOST: local, CacheHitSource.P2P: num_external_tokens - local}
        return {k: v for k, v in sources.items() if v > 0}

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            return
        state = self._states.get(request.request_id)
        if state is None:  # cannot happen: we returned 0 for such requests
            return
        start = state.lookup_computed
        end = start + num_external_tokens
        block_ids = list(blocks.get_block_ids()[0])
        first_block, end_block = start // self.block_size, math.ceil(end / self.block_size)
        first_chunk = start // self.chunk_tokens
        last_chunk = math.ceil(end / self.chunk_tokens)
        if start % self.block_size or end_block > len(block_ids) or \
                last_chunk > len(state.keys[0]):
            log.warning("lmshare: unexpected load range %d..%d for %s (%d blocks); skipping it",
                        start, end, request.request_id, len(block_ids))
            return
        self._pending_loads[request.request_id] = LoadSpec(
            req_id=request.request_id, namespaces=state.namespaces,
            keys=[keys[first_chunk:last_chunk] for keys in state.keys],
            first_chunk=first_chunk, first_block=first_block,
            block_ids=block_ids[first_block:end_block], local_chunks=state.local_chunks)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = LMShareMetadata(loads=list(self._pending_loads.values()))
        self._pending_loads.clear()
        if not (self.save_enabled and self.enabled):
            return meta
        try:
            self._plan_saves(scheduler_output, meta)
        except Exception:  # noqa: BLE001 - a planning bug must not stop serving
            log.exception("lmshare: planning stores failed; skipping them this step")
        return meta

    def _plan_saves(self, scheduler_output: SchedulerOutput, meta: LMShareMetadata) -> None:
        scheduled = scheduler_output.num_scheduled_tokens
        block_state = getattr(scheduler_output, "kv_connector_block_state", None)
        progress: list[tuple[str, int]] = []
        for new in scheduler_output.scheduled_new_reqs:
            state = self._states.get(new.req_id)
            if state is not None:
                state.block_ids = list(new.block_ids[0])
                progress.append((new.req_id, new.num_computed_tokens))
        cached = scheduler_output.scheduled_cached_reqs
        for index, req_id in enumerate(cached.req_ids):
            state = self._states.get(req_id)
            if state is None:
                continue
            new_blocks = cached.new_block_ids[index]
            if new_blocks is not None:
                if req_id in cached.resumed_req_ids:
                    state.block_ids = list(new_blocks[0])
                else:
                    state.block_ids.extend(new_blocks[0])
            progress.append((req_id, cached.num_computed_tokens[index]))
        for req_id, computed in progress:
            state = self._states[req_id]
            done = min(computed + scheduled.get(req_id, 0), len(state.tokens))
            done_chunks = min(done // self.chunk_tokens, len(state.keys[0]))
            if done_chunks <= state.saved_upto:
                continue
            block_ids = state.block_ids
            if block_state is not None:
                resolved = block_state.get_block_ids(req_id)
                if resolved is not None:
                    block_ids = list(resolved[0])
            first, end = state.saved_upto, done_chunks
            if len(block_ids) < end * self.blocks_per_chunk:
                log.debug("lmshare: %s has %d blocks, fewer than %d chunks need; not storing",
                          req_id, len(block_ids), end)
                continue
            bpc = self.blocks_per_chunk
            meta.saves.append(SaveSpec(
                req_id=req_id, namespaces=state.namespaces,
                keys=[keys[first:end] for keys in state.keys], first_chunk=first,
                block_ids=[block_ids[c * bpc : (c + 1) * bpc] for c in range(first, end)]))
            state.saved_upto = end

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        worker_meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if not isinstance(worker_meta, LMShareWorkerMetadata):
            return
        if worker_meta.disabled and self.enabled:
            log.error("lmshare switched off for this engine: a model worker cannot copy its KV "
                      "(see its log)")
            self.enabled = False
        for req_id, chunk in worker_meta.failed_chunks.items():
            state = self._states.get(req_id)
            if state is not None:
                state.saved_upto = min(state.saved_upto, chunk)

    def request_finished(self, request: Request, block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        self._states.pop(request.request_id, None)
        self._pending_loads.pop(request.request_id, None)
        return False, None

    # ------------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        try:
            blocks = PagedBlocks.from_kv_caches(self.geometry, kv_caches)
            self._copier = make_copier(blocks)
        except (LayoutError, ConfigError) as exc:
            log.error("lmshare switched off: %s", exc)
            self.enabled = False
            return
        # Register the worker's pool as this process maps it: chunks are read in place (on
        # CUDA the pool is page-locked and loads DMA from it directly).
        self._link.on_connect = self._register_pool
        self._link.on_close = self._unregister_pool
        log.info("lmshare: registered %d layers of KV on %s (%d blocks of %d bytes)",
                 self.geometry.num_layers, blocks.device, self.geometry.num_blocks,
                 self.geometry.page_bytes)

    @staticmethod
    def _pool_buffer(client: Client) -> Any:
        return getattr(client, "pool_buffer", None)  # absent on test doubles

    def _forget_peer_pool(self, buffer: Any) -> None:
        """A same-host peer restarted: stop using (and page-locking) its old pool."""
        address = buffer_address(buffer)
        if self._peer_pools.pop(address, None) is not None and self._copier is not None:
            self._copier.unregister_host(buffer)

    def _register_pool(self, client: Client) -> None:
        if hasattr(client, "on_peer_unmap"):
            client.on_peer_unmap = self._forget_peer_pool
        buffer = self._pool_buffer(client)
        if buffer is not None and self._copier is not None:
            started = time.monotonic()
            if self._copier.register_host(buffer) and \
                    isinstance(self._copier, AsyncDeviceCopier):
                log.info("lmshare: page-locked the worker pool (%d bytes) in %.2fs",
                         buffer.nbytes, time.monotonic() - started)

    def _unregister_pool(self, client: Client) -> None:
        buffer = self._pool_buffer(client)
        if self._copier is not None:
            if buffer is not None:
                self._copier.unregister_host(buffer)
            peers, self._peer_pools = list(self._peer_pools.values()), {}
            for peer_buffer in peers:  # the client's peer mappings close with it
                self._copier.unregister_host(peer_buffer)

    def _fail_load(self, spec: LoadSpec, from_chunk: int) -> None:
        """Report every block of chunks ``from_chunk ..`` of ``spec`` as not loaded."""
        start_block = max(from_chunk * self.blocks_per_chunk, spec.first_block)
        self._failed_blocks.update(spec.block_ids[start_block - spec.first_block :])
        previous = self._failed_chunks.get(spec.req_id, from_chunk)
        self._failed_chunks[spec.req_id] = min(previous, from_chunk)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self._finish_loads()  # normally done by the previous step's wait_for_save
        metadata = self._connector_metadata
        if not isinstance(metadata, LMShareMetadata) or not metadata.loads:
            return
        for spec in metadata.loads:
            try:
                self._load(spec, self._loading_hits)
            except Exception as exc:  # noqa: BLE001 - a failed load is a recompute
                log.warning("lmshare load for %s failed (%s); vLLM recomputes it",
                            spec.req_id, exc, exc_info=not isinstance(exc, LMShareError))
                self._fail_load(spec, spec.first_chunk)
        if self._copier is None:
            return
        try:
            self._copier.loads_done()  # on GPU: copies start, layer by layer
        except Exception:  # noqa: BLE001 - the blocks may be half written: recompute them
            log.exception("lmshare: starting this step's KV copies failed; vLLM recomputes")
            for spec in metadata.loads:
                self._fail_load(spec, spec.first_chunk)
            self._finish_loads()

    def _finish_loads(self) -> None:
        """Once the copies no longer read the pool, release the chunks' leases."""
        if self._copier is not None:
            try:
                self._copier.loads_finished()
            except Exception:  # noqa: BLE001 - leases expire on their own
                log.exception("lmshare: waiting for KV copies failed")
        hits, self._loading_hits = self._loading_hits, []
        for hit in hits:
            hit.release()

    def _load_batches(self, spec: LoadSpec, count: int) -> list[tuple[int, int]]:
        """(first, end) chunk index ranges of ``spec`` to acquire one after the other: with an
        asynchronous copier, the local prefix and then peer chunks in batches, so the copies of
        one batch overlap the fetch of the next; else all at once."""
        batch = self.settings.fetch_batch_chunks
        copier = self._copier
        if not batch or copier is None or not copier.asynchronous or count <= 1:
            return [(0, count)]
        local = min(max(spec.local_chunks, 0), count)
        ranges = [(0, local)] if local else []
        ranges += [(i, min(i + batch, count)) for i in range(local, count, batch)]
        return ranges

    def _load(self, spec: LoadSpec, hits: list[Hit]) -> None:
        copier = self._copier
        if copier is None or not self.enabled:
            self._fail_load(spec, spec.first_chunk)
            return
        namespace, keys = spec.namespaces[self.tp_rank], spec.keys[self.tp_rank]
        bpc = self.blocks_per_chunk
        end_block = spec.first_block + len(spec.block_ids)
        loaded = local = peer = 0
        in_peer_memory: list[tuple[Hit, int, int]] = []  # (hit, index, position in keys)
        for first, end in self._load_batches(spec, len(keys)):
            hit = self._link.call(lambda c, k=keys[first:end]: c.acquire_keys(
                namespace, k, peers=self.settings.peers, lease_s=self.settings.lease_s,
                direct=self.settings.same_host_direct))
            hits.append(hit)  # released once the copies are done (_finish_loads)
            local, peer = local + hit.local_chunks, peer + hit.peer_chunks
            for index in range(len(hit)):
                chunk = spec.first_chunk + first + index
                lo = max(chunk * bpc, spec.first_block)
                hi = min((chunk + 1) * bpc, end_block)
                if hi <= lo:
                    break
                peer_buffer = hit.region_buffer(index)
                if peer_buffer is not None:
                    self._register_peer_pool(peer_buffer)
                    in_peer_memory.append((hit, index, first + index))
                try:
                    copier.load(hit.views(index), lo - chunk * bpc,
                                spec.block_ids[lo - spec.first_block : hi - spec.first_block])
                except ChunkSizeError as exc:
                    log.warning("lmshare: chunk %d of %s is unusable (%s)", chunk, spec.req_id,
                                exc)
                    break
                loaded += 1
            if loaded < end:
                break  # a missing chunk ends the prefix
            if end < len(keys):
                copier.loads_done()  # this batch copies while the next one is fetched
        if in_peer_memory:
            loaded = min(loaded, self._verify_peer_reads(spec, in_peer_memory))
        if loaded < len(keys):
            log.info("lmshare: %s got %d of %d chunks; vLLM recomputes the rest", spec.req_id,
                     loaded, len(keys))
            self._fail_load(spec, spec.first_chunk + loaded)
        else:
            log.debug("lmshare: loaded %d chunks (%d local, %d from peers) for %s", loaded,
                      local, peer, spec.req_id)

    def _verify_peer_reads(self, spec: LoadSpec, reads: list[tuple[Hit, int, int]]) -> int:
        """Chunks read in a same-host peer's pool are pinned there, and the slab generations
        are the proof: finish the copies (before this step's forward can read them), then
        return how many of ``spec``'s chunks are good (the first changed chunk ends them)."""
        copier = self._copier
        if copier is not None and copier.asynchronous:
            copier.loads_done()
            copier.loads_finished()  # the forward waits for these copies, then checks
        for hit, index, position in reads:
            if not hit.verify(index):
                log.warning("lmshare: chunk %d of %s changed in its holder's memory while "
                            "being read; vLLM recomputes from there", spec.first_chunk + position,
                            spec.req_id)
                return position
        return len(spec.keys[self.tp_rank])

    def _register_peer_pool(self, buffer: Any) -> None:
        """Register a same-host peer's pool (read-only) once: chunks are read in place."""
        if self._copier is None:
            return
        address = buffer_address(buffer)
        if address not in self._peer_pools:
            self._peer_pools[address] = buffer
            self._copier.register_host(buffer, read_only=True)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # On GPU the layer's copies run on a side stream: this layer's attention waits for
        # them, later layers keep copying meanwhile. On CPU loads completed in start_load_kv.
        if self._loading_hits and self._copier is not None:
            layer = self._layer_index.get(layer_name)
            if layer is not None:
                self._copier.wait_layer(layer)

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any,
                      **kwargs: Any) -> None:
        return  # whole chunks (all layers) are stored in wait_for_save

    def wait_for_save(self) -> None:
        self._finish_loads()  # the forward is queued: it waited for every layer it read
        metadata = self._connector_metadata
        if not isinstance(metadata, LMShareMetadata) or not metadata.saves:
            return
        copier = self._copier
        if copier is None or not self.enabled:
            return
        for spec in metadata.saves:
            try:
                pending = [copier.save(ids) for ids in spec.block_ids]
            except Exception:  # noqa: BLE001 - a failed store is a future miss
                log.exception("lmshare: copying chunks of %s out failed", spec.req_id)
                continue
            job = _SaveJob(spec.namespaces[self.tp_rank], spec.keys[self.tp_rank], pending,
                           spec.req_id)
            if self.settings.async_save:
                self._saver_thread().submit(job)
            else:
                _store(self._link, job)

    def _saver_thread(self) -> _Saver:
        if self._saver is None:
            self._saver = _Saver(self._link, self.settings.max_pending_saves)
        return self._saver

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        disabled = not self.enabled and not self._disabled_reported
        if not self._failed_chunks and not disabled:
            return None
        self._disabled_reported = self._disabled_reported or disabled
        meta = LMShareWorkerMetadata(self._failed_chunks, disabled)
        self._failed_chunks = {}
        return meta

    def shutdown(self) -> None:
        self._finish_loads()
        if self._saver is not None:
            self._saver.close()
            self._saver = None
        if self._copier is not None:
            self._copier.close()
        self._link.close()


# --------------------------------------------------------------------------- stores
@dataclass
class _SaveJob:
    namespace: bytes
    keys: Sequence[bytes]
    pending: list[PendingSave]
    req_id: str


def _store(link: WorkerLink, job: _SaveJob) -> int:
    """Put the job's chunks; failures are logged (a failed store is only a future miss)."""
    try:
        datas = [p.wait() for p in job.pending]
        return link.call(lambda c: c.put_keys(job.namespace, job.keys, datas))
    except RemoteError as exc:
        log.info("lmshare: worker refused to store %d chunks of %s: %s", len(job.keys),
                 job.req_id, exc)
    except WorkerUnavailable as exc:
        log.debug("lmshare: store of %s skipped: %s", job.req_id, exc)
    except Exception:  # noqa: BLE001
        log.exception("lmshare: storing chunks of %s failed", job.req_id)
    finally:
        for p in job.pending:
            p.release()
    return 0


class _Saver:
    """One background thread that stores copied-out chunks in order."""

    _STOP = object()

    def __init__(self, link: WorkerLink, max_pending: int) -> None:
        self._link = link
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, max_pending))
        self.dropped = 0
        self.stored = 0
        self._thread = threading.Thread(target=self._run, name="lmshare-saver", daemon=True)
        self._thread.start()

    def submit(self, job: _SaveJob) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.dropped += 1
            for p in job.pending:
                p.release()
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning("lmshare: store queue full; dropped %d stores so far (the worker "
                            "is slow or down)", self.dropped)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is self._STOP:
                    return
                self.stored += _store(self._link, job)
            finally:
                self._queue.task_done()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued store is done; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def close(self, timeout_s: float = 10.0) -> None:
        try:
            self._queue.put(self._STOP, timeout=timeout_s)
        except queue.Full:
            log.warning("lmshare: store queue did not drain; dropping pending stores")
            return
        self._thread.join(timeout_s)
