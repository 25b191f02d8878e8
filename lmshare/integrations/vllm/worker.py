"""The model-worker side of the connector: registers vLLM's KV memory with a block copier,
loads the chunks the scheduler decided on into the request's blocks (reporting the blocks that
did not arrive), copies newly computed chunks out and hands them to the store thread, and tells
the scheduler what failed. Built from plain parts (settings, KV geometry, the TP rank, a worker
link, a copier factory), so it runs and is tested without vLLM's engine."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from lmshare.client import Client, Hit
from lmshare.errors import ConfigError, LMShareError
from lmshare.integrations.kv_copy import (
    AsyncDeviceCopier,
    BlockCopier,
    ChunkSizeError,
    KVGeometry,
    LayoutError,
    PagedBlocks,
    StreamOps,
    buffer_address,
    make_copier,
)
from lmshare.integrations.vllm.link import WorkerLink
from lmshare.integrations.vllm.metadata import LMShareMetadata, LMShareWorkerMetadata, LoadSpec
from lmshare.integrations.vllm.recompute import RecomputeRate
from lmshare.integrations.vllm.saver import Releaser, SaveJob, Saver, store
from lmshare.integrations.vllm.settings import ConnectorSettings

log = logging.getLogger(__name__)


@dataclass
class WorkerSideStats:
    """What this model worker's connector did since it started (summarized in the log)."""

    loaded_chunks: int = 0  # copied into vLLM's blocks
    peer_chunks: int = 0  # of those, from other workers' memory
    failed_chunks: int = 0  # decided as hits but not loaded: recomputed
    stored_chunks: int = 0  # handed to the store thread
    not_saved_chunks: int = 0  # no room to copy them out: future misses

    def minus(self, other: WorkerSideStats) -> WorkerSideStats:
        return WorkerSideStats(*(getattr(self, f.name) - getattr(other, f.name)
                                 for f in fields(self)))


def summary_interval_s() -> float:
    try:
        return max(1.0, float(os.environ.get("LMSHARE_SUMMARY_S", "60")))
    except ValueError:
        return 60.0


class LMShareConnectorWorker:
    """The connector's model-worker-side logic, for TP rank ``tp_rank``.

    ``link`` defaults to a link to the worker named in ``settings`` with the model worker's
    deadline; ``copier_factory`` makes the block copier for the registered KV memory (by default
    the one that fits its device); ``summary_s``: seconds between the log's load/store summaries
    (default $LMSHARE_SUMMARY_S or 60)."""

    def __init__(self, settings: ConnectorSettings, geometry: KVGeometry, tp_rank: int = 0,
                 link: WorkerLink | None = None,
                 copier_factory: Callable[[PagedBlocks], BlockCopier] = make_copier,
                 summary_s: float | None = None) -> None:
        self.settings = settings
        self.geometry = geometry
        self.tp_rank = tp_rank
        self.blocks_per_chunk = settings.chunk_tokens // geometry.block_size
        self.enabled = True  # False once the KV memory cannot be copied (see register_kv_caches)
        self._link = link or WorkerLink(settings, settings.timeout_s)
        self._copier_factory = copier_factory
        self._copier: BlockCopier | None = None
        self._layer_index = {name: i for i, name in enumerate(geometry.layer_names)}
        self._loading_hits: list[Hit] = []  # leased until this step's copies finished
        self._peer_pools: dict[int, Any] = {}  # same-host peers' pools registered with the copier
        self._failed_blocks: set[int] = set()
        self._failed_chunks: dict[str, int] = {}
        self._disabled_reported = False
        self._saver: Saver | None = None
        self._releaser: Releaser | None = None
        self._peer_reads: list[tuple[LoadSpec, Hit, int, int]] = []  # checked after the copies
        self._serving = False  # past register_kv_caches: setup from now on runs in background
        self.stats = WorkerSideStats()
        self._recompute: RecomputeRate | None = None  # once the KV memory is known
        self._rate_reported: float | None = None
        self._summarized = WorkerSideStats()
        self._summary_s = summary_interval_s() if summary_s is None else summary_s
        self._summary_at = time.monotonic() + self._summary_s

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        try:
            blocks = PagedBlocks.from_kv_caches(self.geometry, kv_caches)
            self._copier = self._copier_factory(blocks)
            ops = getattr(self._copier, "ops", None)
            self._recompute = RecomputeRate(ops.marker if ops is not None else
                                            StreamOps().marker)
        except (LayoutError, ConfigError) as exc:
            log.error("lmshare switched off: %s", exc)
            self.enabled = False
            return
        # Register the worker's pool as this process maps it: chunks are read in place (on
        # CUDA the pool is page-locked and loads DMA from it directly). Done now, at engine
        # start, so that no request pays for it; a worker reached later is registered in the
        # background (loads copy from unregistered memory meanwhile).
        self._link.on_connect = self._register_pool
        self._link.on_close = self._unregister_pool
        started = time.monotonic()
        try:
            info = self._link.call(lambda c: c.stats())
        except LMShareError as exc:
            log.warning("lmshare: worker %s not reachable at engine start (%s); serving "
                        "without lmshare until it is", self.settings.worker or
                        self.settings.endpoint, exc)
            info = {}
        self._serving = True
        log.info("lmshare connector ready: worker %s, %d layers of KV on %s (%d blocks of %d "
                 "bytes), transports %s, pool registered in %.2fs",
                 info.get("worker_id", self.settings.worker or self.settings.endpoint),
                 self.geometry.num_layers, blocks.device, self.geometry.num_blocks,
                 self.geometry.page_bytes, ",".join(info.get("transports", [])) or "-",
                 time.monotonic() - started)

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
            self._register_host(buffer, read_only=False, what="the worker pool")

    def _register_host(self, buffer: Any, read_only: bool, what: str) -> None:
        """Register host memory with the copier: inline before the engine serves, in a
        background thread once it does (page-locking GiBs takes seconds)."""
        copier = self._copier
        if copier is None:
            return

        def register() -> None:
            started = time.monotonic()
            try:
                done = copier.register_host(buffer, read_only=read_only)
            except Exception:  # loads keep working from unregistered memory
                log.exception("lmshare: registering %s failed", what)
                return
            if done:
                log.info("lmshare: registered %s (%d bytes%s) in %.2fs", what,
                         memoryview(buffer).nbytes,
                         ", page-locked" if isinstance(copier, AsyncDeviceCopier) else "",
                         time.monotonic() - started)

        if not self._serving:
            register()
        else:
            threading.Thread(target=register, name="lmshare-register", daemon=True).start()

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

    def start_load_kv(self, metadata: KVConnectorMetadata | None) -> None:
        """Start loading this step's hits (``metadata``: the scheduler's plan for the step)."""
        self._finish_loads()  # normally done by the previous step's wait_for_save
        if not isinstance(metadata, LMShareMetadata):
            return
        if self._recompute is not None:
            self._recompute.step_started(metadata.step_tokens, bool(metadata.loads))
        if not metadata.loads:
            return
        for spec in metadata.loads:
            try:
                self._load(spec, self._loading_hits)
            except Exception as exc:  # a failed load is a recompute
                log.warning("lmshare load for %s failed (%s); vLLM recomputes it",
                            spec.req_id, exc, exc_info=not isinstance(exc, LMShareError))
                self._fail_load(spec, spec.first_chunk)
        if self._copier is None:
            return
        try:
            self._copier.start_loads()  # on GPU: copies start, layer by layer
        except Exception:  # the blocks may be half written: recompute them
            log.exception("lmshare: starting this step's KV copies failed; vLLM recomputes")
            for spec in metadata.loads:
                self._fail_load(spec, spec.first_chunk)
            self._finish_loads()

    def _finish_loads(self) -> None:
        """Once the copies no longer read the pool: check the chunks read in same-host peers'
        memory (a changed one is reported as a load error: vLLM drops this step's output for
        the request and recomputes from there), then release the chunks' leases off the
        forward loop."""
        if self._copier is not None:
            try:
                self._copier.wait_loads()
            except Exception:  # leases expire on their own
                log.exception("lmshare: waiting for KV copies failed")
        reads, self._peer_reads = self._peer_reads, []
        failed: set[str] = set()
        for spec, hit, index, position in reads:
            if spec.req_id not in failed and not hit.verify(index):
                log.warning("lmshare: chunk %d of %s changed in its holder's memory while "
                            "being read; vLLM recomputes from there",
                            spec.first_chunk + position, spec.req_id)
                self._fail_load(spec, spec.first_chunk + position)
                failed.add(spec.req_id)
        hits, self._loading_hits = self._loading_hits, []
        if hits:
            self._release_thread().submit(hits)

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
        plan = spec.holders[self.tp_rank] if spec.holders else None  # the lookup's holders
        bpc = self.blocks_per_chunk
        end_block = spec.first_block + len(spec.block_ids)
        loaded = local = peer = 0
        batches = self._load_batches(spec, len(keys))
        while batches:
            first, end = batches.pop(0)
            hint = plan[first:end] if plan is not None else None
            hit = self._link.call(lambda c, k=keys[first:end], h=hint: c.acquire_keys(
                namespace, k, peers=self.settings.peers, lease_s=self.settings.lease_s,
                direct=self.settings.same_host_direct, holders=h,
                # a peer announcing another size is refused before anything is reserved
                chunk_bytes=self.geometry.chunk_nbytes(bpc)))
            hits.append(hit)  # released once the copies are done (_finish_loads)
            local, peer = local + hit.local_chunks, peer + hit.peer_chunks
            in_place = 0  # peer chunks read where a same-host peer holds them
            for index in range(len(hit)):
                chunk = spec.first_chunk + first + index
                lo = max(chunk * bpc, spec.first_block)
                hi = min((chunk + 1) * bpc, end_block)
                if hi <= lo:
                    break
                peer_buffer = hit.region_buffer(index)
                if peer_buffer is not None:
                    self._register_peer_pool(peer_buffer)
                    self._peer_reads.append((spec, hit, index, first + index))
                    in_place += 1
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
                if hit.peer_chunks and in_place == hit.peer_chunks:
                    # nothing was fetched: take the rest in one acquire, and let its copies
                    # overlap the forward layer by layer with the others
                    batches = [(end, len(keys))]
                else:
                    copier.start_loads()  # this batch copies while the next one is fetched
        self.stats.loaded_chunks += loaded
        self.stats.peer_chunks += min(peer, loaded)
        if loaded < len(keys):
            self.stats.failed_chunks += len(keys) - loaded
            log.info("lmshare: %s got %d of %d chunks; vLLM recomputes the rest", spec.req_id,
                     loaded, len(keys))
            self._fail_load(spec, spec.first_chunk + loaded)
        else:
            log.debug("lmshare: loaded %d chunks (%d local, %d from peers) for %s", loaded,
                      local, peer, spec.req_id)

    def _register_peer_pool(self, buffer: Any) -> None:
        """Register a same-host peer's pool (read-only) once, in the background: chunks are
        read in place, DMA'd once it is page-locked."""
        if self._copier is None:
            return
        address = buffer_address(buffer)
        if address not in self._peer_pools:
            self._peer_pools[address] = buffer
            self._register_host(buffer, read_only=True, what="a same-host peer's pool")

    def wait_for_layer_load(self, layer_name: str) -> None:
        # On GPU the layer's copies run on a side stream: this layer's attention waits for
        # them, later layers keep copying meanwhile. On CPU loads completed in start_load_kv.
        if self._loading_hits and self._copier is not None:
            layer = self._layer_index.get(layer_name)
            if layer is not None:
                self._copier.wait_layer(layer)

    def _maybe_summarize(self) -> None:
        now = time.monotonic()
        if now < self._summary_at:
            return
        self._summary_at = now + self._summary_s
        delta = self.stats.minus(self._summarized)
        if delta == WorkerSideStats():
            return
        self._summarized = replace(self.stats)
        log.info("lmshare: loaded %d chunks (%d from peers), %d recomputed after a failed load, "
                 "%d stored, %d not saved (no room)", delta.loaded_chunks, delta.peer_chunks,
                 delta.failed_chunks, delta.stored_chunks, delta.not_saved_chunks)

    def wait_for_save(self, metadata: KVConnectorMetadata | None) -> None:
        """The step's forward is queued: release its loads, store its new chunks."""
        self._finish_loads()  # the forward is queued: it waited for every layer it read
        if self._recompute is not None:
            self._recompute.step_ended()
        self._maybe_summarize()
        if not isinstance(metadata, LMShareMetadata) or not metadata.saves:
            return
        copier = self._copier
        if copier is None or not self.enabled:
            return
        try:  # every chunk of the step at once: on GPU a few gather kernels in all
            pending = copier.save_chunks([ids for spec in metadata.saves for ids in spec.block_ids])
        except Exception:  # a failed store is a future miss
            log.exception("lmshare: copying this step's new chunks out failed")
            return
        position = 0
        for spec in metadata.saves:
            chunks = pending[position : position + len(spec.block_ids)]
            position += len(spec.block_ids)
            saved = next((i for i, p in enumerate(chunks) if p is None), len(chunks))
            self.stats.not_saved_chunks += len(chunks) - saved
            for p in chunks[saved:]:  # a prefix is stored up to the first chunk left out
                if p is not None:
                    p.release()
            if not saved:
                continue
            job = SaveJob(spec.namespaces[self.tp_rank], spec.keys[self.tp_rank][:saved],
                          [p for p in chunks[:saved] if p is not None], spec.req_id)
            self.stats.stored_chunks += saved
            if self.settings.async_save:
                self._saver_thread().submit(job)
            else:
                store(self._link, job)

    def _release_thread(self) -> Releaser:
        if self._releaser is None:
            self._releaser = Releaser()
        return self._releaser

    def _saver_thread(self) -> Saver:
        if self._saver is None:
            self._saver = Saver(self._link, self.settings.max_pending_saves)
        return self._saver

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def build_connector_worker_meta(self) -> LMShareWorkerMetadata | None:
        disabled = not self.enabled and not self._disabled_reported
        rate = self._recompute.poll() if self._recompute is not None else None
        news = rate is not None and rate != self._rate_reported
        if not self._failed_chunks and not disabled and not news:
            return None
        self._disabled_reported = self._disabled_reported or disabled
        self._rate_reported = rate
        meta = LMShareWorkerMetadata(self._failed_chunks, disabled, rate if news else None)
        self._failed_chunks = {}
        return meta

    def shutdown(self) -> None:
        self._finish_loads()
        if self._saver is not None:
            self._saver.close()
            self._saver = None
        if self._releaser is not None:
            self._releaser.close()
            self._releaser = None
        if self._copier is not None:
            self._copier.close()
        self._link.close()
