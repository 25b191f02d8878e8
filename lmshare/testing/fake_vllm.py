"""Fake vLLM KV memory for unit tests: a ``KVCacheConfig``-shaped object and per-layer KV
tensors laid out like vLLM's attention backends (``[num_blocks, kv_heads, block_size,
2 * head_size]`` per layer). ``vllm_026=False``: newer vLLM's ``KVCacheTensor`` (one allocation,
``layers`` with strides); ``vllm_026=True``: vLLM 0.26's (``shared_by``, one allocation per layer,
or one packed allocation with per-layer ``offset`` and ``block_stride``). Needs torch."""

from __future__ import annotations

from types import SimpleNamespace

import torch

LAYERS, BLOCKS, BLOCK, HEADS, HEAD = 3, 64, 32, 2, 8
DTYPE = torch.bfloat16
PAGE = HEADS * BLOCK * 2 * HEAD * 2  # bytes of one layer's block (bf16)


def fake_config(layer_outermost: bool = True, groups: int = 1, vllm_026: bool = False
                ) -> SimpleNamespace:
    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    spec = SimpleNamespace(page_size_bytes=PAGE, block_size=BLOCK, num_kv_heads=HEADS,
                           head_size=HEAD, dtype=DTYPE)
    if vllm_026:
        if layer_outermost:  # one allocation per layer, pages one after the other
            tensors = [SimpleNamespace(size=PAGE * BLOCKS, shared_by=[name], offset=0,
                                       block_stride=0) for name in names]
        else:  # one packed allocation: block b holds every layer's page
            tensors = [SimpleNamespace(size=PAGE * BLOCKS * LAYERS, shared_by=[name],
                                       offset=index * PAGE, block_stride=PAGE * LAYERS)
                       for index, name in enumerate(names)]
    else:
        if layer_outermost:
            layer_stride, block_stride = PAGE * BLOCKS, PAGE
        else:
            layer_stride, block_stride = PAGE, PAGE * LAYERS
        tensors = [SimpleNamespace(size=PAGE * BLOCKS * LAYERS, layers=names,
                                   layer_stride=layer_stride, block_stride=block_stride,
                                   offset=0, host_resident=False)]
    group = SimpleNamespace(layer_names=names, kv_cache_spec=spec, enable_kv_transfer=True)
    return SimpleNamespace(num_blocks=BLOCKS, kv_cache_tensors=tensors,
                           kv_cache_groups=[group] * groups, kv_cache_layout="LBHNC")


def _random_bytes(size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, (size,), dtype=torch.uint8, generator=generator)


def fake_kv_caches(config: SimpleNamespace, seed: int = 0, device: str = "cpu"
                   ) -> dict[str, torch.Tensor]:
    """Per-layer KV tensors as vLLM registers them: [num_blocks, heads, block, 2 * head] views
    of the allocations ``config`` describes, filled with random bytes."""
    generator = torch.Generator().manual_seed(seed)
    elem = torch.finfo(DTYPE).bits // 8
    shape = (BLOCKS, HEADS, BLOCK, 2 * HEAD)
    inner = (BLOCK * 2 * HEAD, 2 * HEAD, 1)
    caches: dict[str, torch.Tensor] = {}
    first = config.kv_cache_tensors[0]
    if hasattr(first, "layers"):
        raw = _random_bytes(first.size, generator).to(device)
        for index, name in enumerate(first.layers):
            caches[name] = torch.as_strided(
                raw.view(DTYPE), shape, (first.block_stride // elem, *inner),
                index * first.layer_stride // elem)
        return caches
    packed = _random_bytes(first.size, generator).to(device) if first.block_stride else None
    for tensor in config.kv_cache_tensors:
        raw = packed if packed is not None else _random_bytes(tensor.size, generator).to(device)
        stride = (tensor.block_stride or PAGE) // elem
        for name in tensor.shared_by:
            caches[name] = torch.as_strided(raw.view(DTYPE), shape, (stride, *inner),
                                            tensor.offset // elem)
    return caches


def block_bytes(caches: dict[str, torch.Tensor], layer: int, block: int) -> bytes:
    t = list(caches.values())[layer][block]
    return t.contiguous().view(torch.uint8).cpu().numpy().tobytes()
