"""vLLM KV connector: vLLM instances share their prompt KV through lmshare workers.

Loaded by configuration only (vLLM's KV connector v1 API)::

    from vllm.config import KVTransferConfig
    KVTransferConfig(kv_connector="LMShareConnector",
                     kv_connector_module_path="lmshare.integrations.vllm",
                     kv_role="kv_both",
                     kv_connector_extra_config={"worker": "node-a"})

or ``--kv-transfer-config '{"kv_connector":"LMShareConnector","kv_connector_module_path":
"lmshare.integrations.vllm","kv_role":"kv_both","kv_connector_extra_config":{"worker":"node-a"}}'``.

``kv_connector_extra_config`` keys: the table in README.md ("Attach vLLM"), their defaults
those of :class:`~lmshare.integrations.vllm.settings.ConnectorSettings`.

How it works (scheduler side, then worker side):

* ``get_num_new_matched_tokens`` computes the request's chained chunk keys under the engine's
  :class:`~lmshare.keys.ModelSignature` (derived from vLLM's config, see
  :mod:`lmshare.integrations.vllm.signature`) and asks the local worker how long a prefix the
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

Logging: the ``lmshare`` logger; unless the process gave it handlers, the connector prints
lmshare's messages to stderr (vLLM's log) at ``$LMSHARE_LOG_LEVEL`` (default INFO): one line when
the engine is ready (worker, namespace, transports, pool registration time), a summary of loads
and stores every ``$LMSHARE_SUMMARY_S`` seconds (default 60) while there is traffic, and one
line per request at DEBUG.

A worker restarted under the same name is noticed before every acquire and store (its pool is
new), and the connector reconnects; a worker that is down means misses, never a stall.

Layout (the shape of vLLM's own connectors): :class:`LMShareConnector` here is the facade vLLM
loads; it builds the shared parts and hands each call to the scheduler side
(:mod:`~lmshare.integrations.vllm.scheduler`) or the model-worker side
(:mod:`~lmshare.integrations.vllm.worker`), which pass each other
:mod:`~lmshare.integrations.vllm.metadata`. Also :mod:`~lmshare.integrations.vllm.settings`
(these keys), :mod:`~lmshare.integrations.vllm.link` (the worker client with its circuit
breaker), :mod:`~lmshare.integrations.vllm.saver` (the store thread) and
:mod:`~lmshare.integrations.vllm.signature` (the namespace from vLLM's config).

Limits: one KV cache group (plain attention models), no pipeline parallelism, no multimodal or
prompt-embedding requests (they are served without lmshare), only prompt tokens are stored.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from lmshare.errors import ConfigError
from lmshare.integrations.kv_copy import KVGeometry
from lmshare.integrations.vllm.compat import CacheHitSource
from lmshare.integrations.vllm.link import WorkerLink
from lmshare.integrations.vllm.metadata import (
    LMShareMetadata,
    LMShareWorkerMetadata,
    LoadSpec,
    SaveSpec,
)
from lmshare.integrations.vllm.scheduler import LMShareConnectorScheduler
from lmshare.integrations.vllm.settings import ConnectorSettings
from lmshare.integrations.vllm.signature import derive_signature
from lmshare.integrations.vllm.worker import LMShareConnectorWorker
from lmshare.keys import ModelSignature

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

__all__ = [
    "ConnectorSettings",
    "LMShareConnector",
    "LMShareConnectorScheduler",
    "LMShareConnectorWorker",
    "LMShareMetadata",
    "LMShareWorkerMetadata",
    "LoadSpec",
    "SaveSpec",
    "WorkerLink",
]

log = logging.getLogger(__name__)


def _setup_logging() -> None:
    """Inside vLLM the connector is lmshare's entry point: unless the application gave the
    ``lmshare`` logger handlers of its own, show lmshare's messages (level from
    $LMSHARE_LOG_LEVEL, default INFO) in vLLM's log the way vLLM shows its own. (The root
    logger is no guide: libraries vLLM loads configure it at WARNING.)"""
    ours = logging.getLogger("lmshare")
    if ours.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(
        "%(levelname)s %(asctime)s %(message)s", datefmt="%m-%d %H:%M:%S"))
    ours.addHandler(handler)
    level = os.environ.get("LMSHARE_LOG_LEVEL", "INFO").upper()
    ours.setLevel(level if isinstance(logging.getLevelName(level), int) else logging.INFO)
    ours.propagate = False


def _vllm_version() -> str:
    try:
        from vllm.version import __version__
    except Exception:
        return "unknown"
    return str(__version__)


def _device_type() -> str:
    try:
        from vllm.platforms import current_platform

        return str(current_platform.device_type)
    except Exception:
        return "unknown"


def _tp_rank(vllm_config: Any) -> int:
    if int(vllm_config.parallel_config.tensor_parallel_size) == 1:
        return 0
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    return int(get_tensor_model_parallel_rank())


class LMShareConnector(KVConnectorBase_V1):
    """Shares prompt KV between vLLM instances through the local lmshare worker: validates the
    configuration, derives the engine's signatures and hands each of vLLM's calls to
    :class:`LMShareConnectorScheduler` (scheduler role) or :class:`LMShareConnectorWorker`
    (model-worker role)."""

    _cache_hit_source = CacheHitSource.P2P if CacheHitSource is not None else None

    @property
    def requires_kv_delivery(self) -> bool:
        # A best-effort cache: a store that does not happen is a future miss, nothing more.
        return False

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        _setup_logging()
        transfer = self._kv_transfer_config
        block_size = int(vllm_config.cache_config.block_size)
        settings = ConnectorSettings.from_extra_config(
            transfer.kv_connector_extra_config, block_size)
        parallel = vllm_config.parallel_config
        if int(getattr(parallel, "pipeline_parallel_size", 1) or 1) > 1:
            raise ConfigError("the lmshare connector does not support pipeline parallelism yet; "
                              "run with pipeline_parallel_size=1 or without LMShareConnector")
        if getattr(transfer, "kv_load_failure_policy", "recompute") != "recompute":
            # A chunk that does not arrive must cost a recompute, never a failed request.
            log.info("lmshare: setting kv_load_failure_policy=recompute (was %s)",
                     transfer.kv_load_failure_policy)
            transfer.kv_load_failure_policy = "recompute"
        geometry = KVGeometry.from_kv_cache_config(kv_cache_config)
        if geometry.block_size != block_size:
            raise ConfigError(f"KV cache block size {geometry.block_size} differs from "
                              f"cache_config.block_size {block_size}")
        # kv_role: a "kv_consumer" only loads, a "kv_producer" only stores.
        self.settings = dataclasses.replace(
            settings, load=settings.load and transfer.is_kv_consumer,
            save=settings.save and transfer.is_kv_producer)
        self.geometry = geometry
        chunk_tokens = settings.chunk_tokens
        device, version = _device_type(), _vllm_version()
        self.signatures: list[ModelSignature] = [
            derive_signature(vllm_config, kv_cache_config, geometry, chunk_tokens, rank, device,
                             version, settings.tenant)
            for rank in range(int(parallel.tensor_parallel_size))]
        blocks_per_chunk = chunk_tokens // block_size
        log.info("lmshare connector (%s) for worker %s: namespace %s, chunk %d tokens = %d blocks"
                 " of %d layers x %d bytes (%d bytes/chunk), peers=%s",
                 role.name.lower(), settings.worker or settings.endpoint,
                 self.signatures[0].namespace().hex()[:12], chunk_tokens, blocks_per_chunk,
                 geometry.num_layers, geometry.page_bytes,
                 geometry.chunk_nbytes(blocks_per_chunk), settings.peers)
        self.connector_scheduler: LMShareConnectorScheduler | None = None
        self.connector_worker: LMShareConnectorWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.connector_scheduler = LMShareConnectorScheduler(
                self.settings, geometry, self.signatures)
        else:
            self.connector_worker = LMShareConnectorWorker(
                self.settings, geometry, _tp_rank(vllm_config))

    @property
    def signature(self) -> ModelSignature:
        """This process's signature (its TP rank's; the scheduler's is rank 0's)."""
        worker = self.connector_worker
        return self.signatures[worker.tp_rank if worker is not None else 0]

    @property
    def scheduler(self) -> LMShareConnectorScheduler:
        assert self.connector_scheduler is not None, "a scheduler-side call on a model worker"
        return self.connector_scheduler

    @property
    def worker(self) -> LMShareConnectorWorker:
        assert self.connector_worker is not None, "a model-worker call on the scheduler"
        return self.connector_worker

    # ------------------------------------------------------------------ scheduler side
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int
                                       ) -> dict[Any, int]:
        return self.scheduler.get_external_cache_hit_sources(request, num_external_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self.scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if self.connector_scheduler is not None:
            self.connector_scheduler.update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]
                         ) -> tuple[bool, dict[str, Any] | None]:
        if self.connector_scheduler is None:
            return False, None
        return self.connector_scheduler.request_finished(request, block_ids)

    # ------------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self.worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self.worker.start_load_kv(self._connector_metadata)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any,
                      **kwargs: Any) -> None:
        return  # whole chunks (all layers) are stored in wait_for_save

    def wait_for_save(self) -> None:
        self.worker.wait_for_save(self._connector_metadata)

    def get_block_ids_with_load_errors(self) -> set[int]:
        if self.connector_worker is None:
            return set()
        return self.connector_worker.get_block_ids_with_load_errors()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        if self.connector_worker is None:
            return None
        return self.connector_worker.build_connector_worker_meta()

    def shutdown(self) -> None:
        if self.connector_worker is not None:
            self.connector_worker.shutdown()
        if self.connector_scheduler is not None:
            self.connector_scheduler.shutdown()
