"""Throughput of the vLLM connector's block copies (lmshare.integrations.kv_copy).

    python benchmarks/kv_copy_bench.py [--device cuda] [--chunks 16]

Lays out a paged KV cache like vLLM does for a Llama-3-8B-shaped model (32 layers, 8 KV heads,
head size 128, bf16, block 16; one allocation, layer-outermost) on the device, then times
*save* (gather a chunk's blocks, all layers, into host bytes) and *load* (host bytes, split in
256 KiB segments like pool slabs, into scattered blocks). Prints GB/s of chunk bytes.
"""

from __future__ import annotations

import argparse
import json
import mmap
import random
import time
from types import SimpleNamespace

import torch

from lmshare.integrations.kv_copy import KVGeometry, PagedBlocks, make_copier


def layout(layers: int, blocks: int, block: int, heads: int, head: int, dtype: torch.dtype):
    page = 2 * block * heads * head * torch.finfo(dtype).bits // 8
    names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
    spec = SimpleNamespace(page_size_bytes=page, block_size=block, num_kv_heads=heads,
                           head_size=head, dtype=dtype)
    tensor = SimpleNamespace(size=page * blocks * layers, layers=names,
                             layer_stride=page * blocks, block_stride=page, offset=0)
    group = SimpleNamespace(layer_names=names, kv_cache_spec=spec)
    return SimpleNamespace(num_blocks=blocks, kv_cache_tensors=[tensor],
                           kv_cache_groups=[group]), page


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--blocks", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--registered", action="store_true",
                   help="load from a /dev/shm mapping page-locked with cudaHostRegister, as "
                        "the connector does with the worker pool")
    args = p.parse_args()

    config, page = layout(args.layers, args.blocks, args.block_size, 8, 128, torch.bfloat16)
    geometry = KVGeometry.from_kv_cache_config(config)
    raw = torch.randint(0, 256, (config.kv_cache_tensors[0].size,), dtype=torch.uint8,
                        device=args.device)
    per_layer = page * args.blocks
    caches = {name: raw[i * per_layer : (i + 1) * per_layer].view(torch.bfloat16)
              .view(args.blocks, 2, args.block_size, 8, 128)
              for i, name in enumerate(config.kv_cache_tensors[0].layers)}
    copier = make_copier(PagedBlocks.from_kv_caches(geometry, caches))
    bpc = args.chunk_tokens // args.block_size
    rng = random.Random(0)
    chunk_bytes = geometry.chunk_nbytes(bpc)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    # the "worker pool": a shared mapping the chunks are loaded from
    region = mmap.mmap(-1, chunk_bytes * args.chunks, mmap.MAP_SHARED)
    pool = memoryview(region)
    registered = args.registered and hasattr(copier, "register_host") and \
        copier.register_host(pool)
    save_times, load_times = [], []
    for _ in range(args.repeat):
        ids = [rng.sample(range(args.blocks), bpc) for _ in range(args.chunks)]
        sync()
        t0 = time.perf_counter()
        pendings = [copier.save(b) for b in ids]
        datas = [p.wait() for p in pendings]
        save_times.append(time.perf_counter() - t0)
        for index, d in enumerate(datas):
            pool[index * chunk_bytes : (index + 1) * chunk_bytes] = d
        for pending in pendings:
            pending.release()
        slab = 256 * 1024
        segments = [[pool[c * chunk_bytes + i : c * chunk_bytes + i + slab]
                     for i in range(0, chunk_bytes, slab)] for c in range(args.chunks)]
        sync()
        t0 = time.perf_counter()
        for segs, b in zip(segments, ids):
            copier.load(segs, 0, b)
        copier.loads_done()
        sync()
        load_times.append(time.perf_counter() - t0)
    total = chunk_bytes * args.chunks
    best_save, best_load = min(save_times[1:] or save_times), min(load_times[1:] or load_times)
    print(json.dumps({
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "copier": type(copier).__name__, "registered_pool": bool(registered),
        "chunk_mib": chunk_bytes / 2**20,
        "chunks": args.chunks, "page_kib": page / 1024,
        "save_gbps": round(total / best_save / 1e9, 2),
        "load_gbps": round(total / best_load / 1e9, 2),
        "save_ms_per_chunk": round(best_save / args.chunks * 1e3, 3),
        "load_ms_per_chunk": round(best_load / args.chunks * 1e3, 3),
    }))
    if registered:
        copier.unregister_host(pool)
    copier.close()


if __name__ == "__main__":
    main()
