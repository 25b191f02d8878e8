"""The scheduler side of the connector: decides each request's hit (how many prompt tokens the
cluster supplies), turns vLLM's block allocations into loads, plans the stores of newly computed
chunks, and follows each request until it finishes. Built from plain parts (settings, KV
geometry, the engine's signatures, a worker link), so it runs and is tested without vLLM's
engine."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lmshare.errors import LMShareError, WorkerUnavailable
from lmshare.integrations.kv_copy import KVGeometry
from lmshare.integrations.vllm.compat import hit_sources
from lmshare.integrations.vllm.link import WorkerLink
from lmshare.integrations.vllm.metadata import (
    LMShareMetadata,
    LMShareWorkerMetadata,
    LoadSpec,
    SaveSpec,
)
from lmshare.integrations.vllm.settings import ConnectorSettings
from lmshare.integrations.vllm.signature import lora_identity
from lmshare.keys import ModelSignature, chunk_keys
from lmshare.misses import describe_runs

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


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
    holders: list[list[list[str]]] = field(default_factory=list)  # per rank, from the lookup
    saved_upto: int = 0  # chunks below this need no store
    block_ids: list[int] = field(default_factory=list)  # tracked when vLLM gives no block state


class LMShareConnectorScheduler:
    """The connector's scheduler-side logic.

    ``signatures`` are the engine's, one per TP rank (a lookup covers every rank: the hit is the
    shortest rank's). ``settings.load`` / ``settings.save`` are what this engine may do (the
    facade folds vLLM's ``kv_role`` into them). ``link`` defaults to a link to the worker named
    in ``settings`` with the lookup deadline."""

    def __init__(self, settings: ConnectorSettings, geometry: KVGeometry,
                 signatures: Sequence[ModelSignature], link: WorkerLink | None = None) -> None:
        self.settings = settings
        self.geometry = geometry
        self.block_size = geometry.block_size
        self.chunk_tokens = settings.chunk_tokens
        self.blocks_per_chunk = self.chunk_tokens // self.block_size
        self.load_enabled = settings.load
        self.save_enabled = settings.save
        self.enabled = True  # False once a model worker reported that it cannot copy KV
        self._signatures = list(signatures)
        self._link = link or WorkerLink(settings, settings.lookup_timeout_s)
        self._namespace_cache: dict[tuple[str, str], list[bytes]] = {}
        self._signature_of: dict[bytes, ModelSignature] = {}  # sent with lookups now and then
        self._mismatches_logged: set[bytes] = set()  # the controller's diagnosis, logged once
        self._states: dict[str, _RequestState] = {}
        self._pending_loads: dict[str, LoadSpec] = {}
        #: this engine's prefill rate as its model workers measured it (None: not yet)
        self.recompute_tokens_per_s: float | None = None

    # ------------------------------------------------------------------ keys
    def _namespaces(self, lora: str, salt: str) -> list[bytes]:
        cached = self._namespace_cache.get((lora, salt))
        if cached is None:
            cached = []
            for sig in self._signatures:
                tenant = f"{sig.tenant}/salt:{salt}" if salt else sig.tenant
                variant = dataclasses.replace(sig, lora_adapter=lora, tenant=tenant)
                cached.append(variant.namespace())
                if len(self._signature_of) >= 4096:
                    self._signature_of.clear()
                self._signature_of[cached[-1]] = variant
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

    # ------------------------------------------------------------------ vLLM's calls
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int
                                   ) -> tuple[int | None, bool]:
        try:
            return self._matched_tokens(request, num_computed_tokens), False
        except WorkerUnavailable as exc:  # WorkerLink logs once per outage
            log.debug("lmshare lookup for %s skipped (no answer within the %.3gs lookup "
                      "deadline, or the worker is down): %s", request.request_id,
                      self.settings.lookup_timeout_s, exc)
            return 0, False
        except Exception as exc:  # a lookup problem is a miss, never a crash
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
        state.holders = []
        state.saved_upto = max(state.saved_upto, first_chunk)
        # vLLM computes at least the last prompt token; loads are whole blocks.
        limit = (len(state.tokens) - 1) // self.block_size * self.block_size
        wanted = min(len(state.keys[0]), math.ceil(limit / self.chunk_tokens))
        if not self.load_enabled or limit <= num_computed_tokens or wanted <= first_chunk:
            return 0
        first_lookup = not state.looked_up  # vLLM asks again each step it cannot schedule it
        state.looked_up = True
        plans = [self._link.call(lambda c, ns=namespace, k=keys: c.lookup_plan(
                     ns, k[first_chunk:wanted], peers=self.settings.peers, count=first_lookup,
                     chunk_tokens=self.chunk_tokens,
                     # peer chunks are offered only where fetching beats recomputing them
                     recompute_tokens_per_s=self.recompute_tokens_per_s,
                     chunk_bytes=self.geometry.chunk_nbytes(self.blocks_per_chunk),
                     direct=self.settings.same_host_direct,
                     signature=self._signature_of.get(ns),
                     tail_tokens=len(state.tokens) - len(k) * self.chunk_tokens))
                 for namespace, keys in zip(state.namespaces, state.keys)]
        for namespace, plan in zip(state.namespaces, plans):
            if plan.mismatch and namespace not in self._mismatches_logged:
                self._mismatches_logged.add(namespace)
                log.warning("lmshare: KV namespace %s of this engine is shared with no other "
                            "worker: %s", namespace.hex()[:12], plan.mismatch)
        shortest = min(plans, key=len)
        local, peer = shortest.local, shortest.peer
        present = local + peer
        state.local_chunks, state.peer_chunks = local, peer
        if all(len(plan.holders) == len(plan) for plan in plans):  # else loads ask again
            state.holders = [[list(h) for h in plan.holders[:present]] for plan in plans]
        state.saved_upto = max(state.saved_upto, first_chunk + present)
        hit = min((first_chunk + present) * self.chunk_tokens, limit)
        if log.isEnabledFor(logging.DEBUG):  # one line per lookup: the hit, and why not more
            log.debug("lmshare %s for %s: tokens %d..%d of %d (%d local + %d peer chunks); "
                      "chunks missed: %s", "hit" if hit > num_computed_tokens else "miss",
                      request.request_id, num_computed_tokens, max(hit, num_computed_tokens),
                      len(state.tokens), local, peer, describe_runs(shortest.misses))
        if hit <= num_computed_tokens:
            return 0
        state.hit_tokens = hit
        return hit - num_computed_tokens

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int
                                       ) -> dict[Any, int]:
        if num_external_tokens <= 0:
            return {}
        state = self._states.get(request.request_id)
        if state is None:
            return hit_sources(0, num_external_tokens)
        local = min(num_external_tokens, state.local_chunks * self.chunk_tokens)
        return hit_sources(local, num_external_tokens - local)

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
            block_ids=block_ids[first_block:end_block], local_chunks=state.local_chunks,
            holders=[holders[: last_chunk - first_chunk] for holders in state.holders] or None)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> LMShareMetadata:
        meta = LMShareMetadata(loads=list(self._pending_loads.values()),
                               step_tokens=int(getattr(scheduler_output,
                                                       "total_num_scheduled_tokens", 0) or 0))
        self._pending_loads.clear()
        if not (self.save_enabled and self.enabled):
            return meta
        try:
            self._plan_saves(scheduler_output, meta)
        except Exception:  # a planning bug must not stop serving
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
        if worker_meta.recompute_tokens_per_s is not None:
            self.recompute_tokens_per_s = worker_meta.recompute_tokens_per_s
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

    def shutdown(self) -> None:
        self._link.close()
