"""Throughput of the vLLM connector's block copies (lmshare.integrations.kv_copy).

    python benchmarks/kv_copy_bench.py [--device cuda] [--chunks 16]

Lays out a paged KV cache like vLLM does for a Llama-3-8B-shaped model (32 layers, 8 KV heads,
head size 128, bf16, block 16; one allocation, layer-outermost) on the device, then times
*save* (gather a chunk's blocks, all layers, into host bytes) and *load* (host bytes in a pool of
256 KiB slabs, into scattered blocks). Prints GB/s of chunk bytes.

``--overlap`` (CUDA) also times a load followed by a stand-in forward (one MLP block of
``--compute-tokens`` tokens per layer): *serial* waits for every layer's copies before the
forward starts (what a connector without layer-wise waits does), *layered* lets layer ``i``
wait only for its own copies (``wait_layer``, as the connector's ``wait_for_layer_load``).
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
from lmshare.pool import slab_views


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
    p.add_argument("--overlap", action="store_true",
                   help="time loads overlapped with a stand-in forward, layer by layer")
    p.add_argument("--compute-tokens", type=int, default=512)
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
        slab = 256 * 1024  # the pool's slabs; a chunk's adjacent slabs come as one view
        per = -(-chunk_bytes // slab)
        segments = [slab_views(pool, slab, list(range(c * per, (c + 1) * per)), chunk_bytes)
                    for c in range(args.chunks)]
        sync()
        t0 = time.perf_counter()
        for segs, b in zip(segments, ids):
            copier.load(segs, 0, b)
        copier.start_loads()
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
    if args.overlap:
        print(json.dumps(overlap(args, copier, segments, ids, sync)))
    if registered:
        copier.unregister_host(pool)
    copier.close()


def overlap(args, copier, segments, ids, sync) -> dict:
    """Milliseconds of: copies alone, forward alone, copies then forward (serial), and copies
    with the forward waiting layer by layer (layered). Medians of ``--repeat`` runs."""
    if not hasattr(copier, "wait_layer") or not args.device.startswith("cuda"):
        return {"overlap": "needs --device cuda"}
    hidden, inner = 4096, 14336  # a Llama-3-8B MLP block per layer
    weights = [(torch.randn(hidden, inner, dtype=torch.bfloat16, device=args.device) * 0.01,
                torch.randn(inner, hidden, dtype=torch.bfloat16, device=args.device) * 0.01)
               for _ in range(2)]
    x = torch.randn(args.compute_tokens, hidden, dtype=torch.bfloat16, device=args.device)

    def layer_compute(layer: int) -> None:
        up, down = weights[layer % 2]
        torch.nn.functional.silu(x @ up) @ down

    def queue_loads() -> None:
        for segs, b in zip(segments, ids):
            copier.load(segs, 0, b)
        copier.start_loads()

    def copies_only() -> None:
        queue_loads()
        copier.wait_loads()

    def forward_only() -> None:
        for layer in range(args.layers):
            layer_compute(layer)

    def serial() -> None:
        queue_loads()
        copier.wait_loads()  # the forward waits for every layer
        forward_only()

    def layered() -> None:
        queue_loads()
        for layer in range(args.layers):
            copier.wait_layer(layer)
            layer_compute(layer)
        copier.wait_loads()

    results = {}
    for name, fn in (("copies_ms", copies_only), ("forward_ms", forward_only),
                     ("serial_ms", serial), ("layered_ms", layered)):
        times = []
        for _ in range(args.repeat + 1):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - t0) * 1e3)
        results[name] = round(sorted(times[1:])[len(times[1:]) // 2], 2)
    results["compute_tokens"] = args.compute_tokens
    results["layered_vs_serial"] = round(results["serial_ms"] / results["layered_ms"], 2)
    return results


if __name__ == "__main__":
    main()
