"""What the two sides of the connector pass each other: the scheduler's per-step plan
(:class:`LMShareMetadata`: loads and stores) and the model workers' report back
(:class:`LMShareWorkerMetadata`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)


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
    # per TP rank, per chunk: where the lookup found it ([]: the local pool, else the workers
    # holding it), so that the load fetches without asking the controller again
    holders: list[list[list[str]]] | None = None


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
    step_tokens: int = 0  # tokens the step computes (for the recompute rate)


@dataclass
class LMShareWorkerMetadata(KVConnectorWorkerMetadata):
    """Model worker -> scheduler: the first chunk of each request that failed to load (so the
    scheduler stores it once recomputed), and whether a worker switched lmshare off."""

    failed_chunks: dict[str, int] = field(default_factory=dict)
    disabled: bool = False
    recompute_tokens_per_s: float | None = None  # measured prefill rate (None: no news)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if not isinstance(other, LMShareWorkerMetadata):
            return self
        merged = dict(self.failed_chunks)
        for req_id, chunk in other.failed_chunks.items():
            merged[req_id] = min(chunk, merged.get(req_id, chunk))
        rates = [r for r in (self.recompute_tokens_per_s, other.recompute_tokens_per_s)
                 if r is not None]  # ranks compute together: the slowest sets the pace
        return LMShareWorkerMetadata(merged, self.disabled or other.disabled,
                                     min(rates) if rates else None)
