"""Fake vLLM KV memory for unit tests: a ``KVCacheConfig``-shaped object and per-layer KV
tensors that are views of one allocation, laid out like vLLM's CPU attention backend
(``[num_blocks, kv_heads, block_size, 2 * head_size]`` per layer). Needs torch."""

from __future__ import annotations

from types import SimpleNamespace

import torch

LAYERS, BLOCKS, BLOCK, HEADS, HEAD = 3, 64, 32, 2, 8
DTYPE = torch.bfloat16
PAGE = HEADS * BLOCK * 2 * HEAD * 2  # bytes of one layer's block (bf16)


def fake_config(layer_outermost: bool = True, groups: int = 1) -> SimpleNamespace:
    names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
    if layer_outermost:
        layer_stride, block_stride = PAGE * BLOCKS, PAGE
    else:
        layer_stride, block_stride = PAGE, PAGE * LAYERS
    spec = SimpleNamespace(page_size_bytes=PAGE, block_size=BLOCK, num_kv_heads=HEADS,
                           head_size=HEAD, dtype=DTYPE)
    tensor = SimpleNamespace(size=PAGE * BLOCKS * LAYERS, layers=names,
                             layer_stride=layer_stride, block_stride=block_stride, offset=0,
                             host_resident=False)
    group = SimpleNamespace(layer_names=names, kv_cache_spec=spec, enable_kv_transfer=True)
    return SimpleNamespace(num_blocks=BLOCKS, kv_cache_tensors=[tensor],
                           kv_cache_groups=[group] * groups, kv_cache_layout="LBHNC")


def fake_kv_caches(config: SimpleNamespace, seed: int = 0, device: str = "cpu"
                   ) -> dict[str, torch.Tensor]:
    """Per-layer views of one allocation, like vLLM's CPU backend:
    [num_blocks, heads, block, 2 * head] per layer."""
    tensor = config.kv_cache_tensors[0]
    raw = torch.empty(tensor.size, dtype=torch.uint8)
    generator = torch.Generator().manual_seed(seed)
    raw.copy_(torch.randint(0, 256, (tensor.size,), dtype=torch.uint8, generator=generator))
    raw = raw.to(device)
    caches = {}
    elem = torch.finfo(DTYPE).bits // 8
    for index, name in enumerate(tensor.layers):
        caches[name] = torch.as_strided(
            raw.view(DTYPE), (BLOCKS, HEADS, BLOCK, 2 * HEAD),
            (tensor.block_stride // elem, BLOCK * 2 * HEAD, 2 * HEAD, 1),
            index * tensor.layer_stride // elem)
    return caches


def block_bytes(caches: dict[str, torch.Tensor], layer: int, block: int) -> bytes:
    t = list(caches.values())[layer][block]
    return t.contiguous().view(torch.uint8).cpu().numpy().tobytes()
