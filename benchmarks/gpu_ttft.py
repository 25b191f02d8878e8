"""The GPU proof: time to first token with the prompt's KV recomputed, or loaded from lmshare.

An 8B-shaped Llama (the Llama-3-8B config: hidden 4096, 32 layers, 32 heads, 8 KV heads,
intermediate 14336, vocab 128256, rope_theta 500000) with random bf16 weights, built directly on
the GPU with Hugging Face transformers. For each prompt (random token ids, fixed seed) it times:

* ``recompute`` — full prefill of the prompt, greedy first token.
* ``local`` — the KV of ``prompt[:-1]`` sits in this process's :class:`~lmshare.pool.KVPool`,
  whose shared-memory region is registered as pinned memory (``cudaHostRegister``). Loading is
  asynchronous host→device copies on a side stream, straight from the pool's slabs, in layer
  order (every chunk's first ``--layers-per-copy`` layers — default 4, one copy each — then the
  next group; each layer ends with a CUDA event); the model then runs only the last prompt
  token, and a pre-hook on every decoder layer makes the compute stream wait for that layer's
  event, so the forward pass overlaps the rest of the transfer.
* ``peer-shm`` — the KV lives in *another process's* pool (a holder process that created the
  pool and put the chunks). This process maps the holder's region read-only by path
  (``SharedRegion.attach(..., writable=False)``), registers the mapping as pinned once
  (``cudaHostRegisterReadOnly``; the time is reported separately), asks the holder to pin the
  chunks (a lease: one pipe round trip, inside the timed region) and copies host→device straight
  from the holder's slabs.
* ``peer-tcp`` — the holder serves its pool with :class:`~lmshare.transports.tcp.TcpPeerServer`;
  this process fetches the chunks with :class:`~lmshare.transports.tcp.TcpTransport` and
  ``PoolSink`` into its own registered pool over several loopback connections, and starts each
  chunk's host→device copy as soon as the chunk is committed (pipelined with the later chunks'
  arrival).

Prompts are ``T + 1`` tokens with ``T`` a multiple of the chunk size (256), so the cached prefix
``prompt[:-1]`` is whole chunks — lmshare stores only full chunks.

Chunk layout (the bytes of one 256-token chunk): a C-contiguous tensor of shape
``[layers, 2, kv_heads, 256, head_dim]`` in the KV dtype (bf16), index 0 of the second axis is K,
1 is V. One layer's K and V of a chunk are contiguous (1 MiB on the 8B shape; a chunk is
32 MiB), which is what lets the loader copy layer by layer. Each pool uses one slab per chunk
(slab size = chunk bytes, as the design says: slabs of the namespace's chunk size).

Correctness: every hit must give the same greedy continuation (``--gen-tokens``, default 8) as
a recompute, and the KV it loaded must be bit-identical to the KV prefill produced. The hits run
"prefill(prompt[:-1]) + decode(last token)"; in bf16 a full prefill's last position can differ
from that in the last bits (other GEMM shapes and attention kernels), so hits are compared with
a recompute done the same way (``split``), and whether that equals the full-prefill
continuation is reported too. On an H100 with torch 2.11, PyTorch's default SDPA choice is not
bitwise reproducible from run to run in decode (seen: the same cached decode, fully
synchronised, twice gave logits 0.1 apart, enough to flip a near-tie token of a random-weight
model; the cuDNN backend alone did the same), while the FlashAttention-2 and math backends
were. So each case gets one verification run under the flash backend (references too),
compared exactly; the timed runs use the default backend, and their first tokens are reported
against the split reference's as information.

GPU:  ``python -m benchmarks.gpu_ttft --out results.json``
CPU (CI, tiny and slow): ``python -m benchmarks.gpu_ttft --device cpu --tiny``
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import importlib.util
import json
import multiprocessing as mp
import platform
import queue
import statistics
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine, table
from lmshare.keys import ModelSignature, chunk_keys
from lmshare.pool import KVPool
from lmshare.shm import SharedRegion
from lmshare.transports.base import PeerInfo
from lmshare.transports.tcp import TcpPeerServer, TcpTransport

try:
    from lmshare.worker.peer_fetch import PoolSink
except ModuleNotFoundError:  # a source checkout on PYTHONPATH (not installed): no package-dir map
    _path = Path(__file__).resolve().parents[1] / "worker" / "peer_fetch.py"
    _spec = importlib.util.spec_from_file_location("_lmshare_worker_peer_fetch", _path)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _module
    _spec.loader.exec_module(_module)
    PoolSink = _module.PoolSink

CHUNK_TOKENS = 256
HOST_REGISTER_DEFAULT = 0
HOST_REGISTER_READ_ONLY = 8  # cudaHostRegisterReadOnly
CASES = ("recompute", "local", "peer-shm", "peer-tcp")


# ----------------------------------------------------------------------------- model and layout
@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    rope_theta: float = 500000.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            hidden_size=self.hidden, num_hidden_layers=self.layers,
            num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            intermediate_size=self.intermediate, vocab_size=self.vocab,
            rope_theta=self.rope_theta, max_position_embeddings=131072, rms_norm_eps=1e-5,
            tie_word_embeddings=False, attn_implementation="sdpa")


LLAMA3_8B = ModelSpec("llama-3-8b-shaped", 4096, 32, 32, 8, 14336, 128256)
TINY = ModelSpec("tiny-llama", 256, 2, 4, 2, 512, 4096)


@dataclass(frozen=True)
class ChunkLayout:
    """Bytes of one chunk: ``[layers, 2 (K, V), kv_heads, chunk_tokens, head_dim]``, C order."""

    layers: int
    kv_heads: int
    chunk_tokens: int
    head_dim: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.layers, 2, self.kv_heads, self.chunk_tokens, self.head_dim)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        return self.nbytes // self.chunk_tokens

    def view(self, region: torch.Tensor, offset: int) -> torch.Tensor:
        """The chunk at byte ``offset`` of a uint8 region tensor, as a typed tensor (no copy)."""
        return region[offset : offset + self.nbytes].view(self.dtype).view(self.shape)


def build_model(spec: ModelSpec, device: torch.device, seed: int):
    """Random-weight LlamaForCausalLM built in place on ``device`` in bf16 (no CPU round trip)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = LlamaForCausalLM(spec.config())
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype=torch.bfloat16).eval()


def new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def install_layer(cache, index: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Make ``keys``/``values`` ([1, H, T, D], already on the GPU) layer ``index`` of a
    DynamicCache without a copy (metadata only, so no GPU work is queued here)."""
    layer = cache.layers[index]
    layer.dtype, layer.device = keys.dtype, keys.device
    layer.keys, layer.values = keys, values
    layer.is_initialized = True


class LayerGate:
    """A pre-hook on every decoder layer: while ``events`` is set, the compute stream waits for
    layer i's KV copy event before layer i runs."""

    def __init__(self, model) -> None:
        self.events: list | None = None
        self.handles = [layer.register_forward_pre_hook(self._hook(i))
                        for i, layer in enumerate(model.model.layers)]

    def _hook(self, index: int):
        def hook(module, args):
            if self.events is not None:
                torch.cuda.current_stream().wait_event(self.events[index])
        return hook


def decode(model, token_ids: torch.Tensor, cache) -> int:
    out = model(input_ids=token_ids, past_key_values=cache, use_cache=True)
    return int(out.logits[0, -1].argmax())


def continue_greedy(model, first: int, cache, count: int, device: torch.device) -> list[int]:
    tokens = [first]
    while len(tokens) < count:
        step = torch.tensor([[tokens[-1]]], device=device)
        tokens.append(decode(model, step, cache))
    return tokens


# ----------------------------------------------------------------------------- pinned regions
def region_address(region: SharedRegion) -> int:
    array = np.frombuffer(region.buffer, dtype=np.uint8)
    address = int(array.ctypes.data)
    del array  # no buffer export may outlive this call, or the region cannot close
    return address


def region_tensor(region: SharedRegion) -> torch.Tensor:
    """A uint8 CPU tensor over the whole mapping (by address: it exports no buffer)."""
    raw = (ctypes.c_ubyte * region.size).from_address(region_address(region))
    return torch.frombuffer(raw, dtype=torch.uint8)


def _cudart_call(name: str, *args) -> int:
    try:
        function = getattr(torch.cuda.cudart(), name)
    except (AttributeError, RuntimeError):
        from cuda.bindings import runtime  # the cuda-bindings package, where torch lacks it

        return int(getattr(runtime, name)(*args)[0])
    return int(function(*args))


def _clear_cuda_error() -> None:
    """A failed cudaHostRegister leaves its error as the 'last error'; clear it (best effort)."""
    with contextlib.suppress(Exception):
        from cuda.bindings import runtime

        runtime.cudaGetLastError()


def host_register(region: SharedRegion, read_only: bool) -> dict:
    """cudaHostRegister the whole mapping; returns the flags used and the seconds it took."""
    address = region_address(region)
    tried = [HOST_REGISTER_READ_ONLY] if read_only else []
    tried.append(HOST_REGISTER_DEFAULT)
    errors = []
    for flags in tried:
        started = time.perf_counter()
        err = _cudart_call("cudaHostRegister", address, region.size, flags)
        seconds = time.perf_counter() - started
        if err == 0:
            return {"address": address, "bytes": region.size, "flags": flags,
                    "seconds": seconds, "registered": True}
        errors.append(f"flags={flags}: cudaError {err}")
        _clear_cuda_error()
    print(f"warning: cudaHostRegister of {region.path} failed ({'; '.join(errors)}); copies "
          "from it are pageable (slow)", file=sys.stderr)
    return {"address": address, "bytes": region.size, "flags": None, "seconds": 0.0,
            "registered": False, "errors": errors}


def host_unregister(info: dict) -> None:
    if info.get("registered"):
        _cudart_call("cudaHostUnregister", info["address"])


# ----------------------------------------------------------------------------- the loader
class KVLoader:
    """Host → device copies of chunks into a preallocated KV cache, on a side stream.

    Chunks land in a staging buffer ``[chunks, layers, 2, H, C, D]`` (one contiguous copy per
    chunk, or per chunk and layer); one device-side permute per layer then writes the cache
    tensor ``[layers, 2, H, T, D]``, and a CUDA event per layer says that layer is ready.
    """

    def __init__(self, layout: ChunkLayout, chunks: int, device: torch.device) -> None:
        self.layout = layout
        self.chunks = chunks
        self.cuda = device.type == "cuda"
        L, _, H, C, D = layout.shape
        self.staging = torch.empty((chunks, L, 2, H, C, D), dtype=layout.dtype, device=device)
        self.kv = torch.empty((L, 2, H, chunks * C, D), dtype=layout.dtype, device=device)
        self._kv_split = [self.kv[layer].view(2, H, chunks, C, D) for layer in range(L)]
        self._dst = [[self.staging[c, layer] for c in range(chunks)] for layer in range(L)]
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.events = [torch.cuda.Event() for _ in range(L)] if self.cuda else None

    def _on_side(self):
        return torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()

    def begin(self) -> None:
        """Order this load after whatever the compute stream did with the buffers before."""
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream())

    def load_layer_major(self, sources: list[torch.Tensor], layers_per_copy: int = 1,
                         finish: bool = True) -> None:
        """Every chunk's first ``layers_per_copy`` layers (one copy a chunk: a chunk's layers
        are contiguous), then the next group, ...: the forward can start on layer 0 early."""
        self.begin()
        with self._on_side():
            for first in range(0, self.layout.layers, layers_per_copy):
                end = min(first + layers_per_copy, self.layout.layers)
                if end - first == 1:
                    row = self._dst[first]
                    for chunk, source in enumerate(sources):
                        row[chunk].copy_(source[first], non_blocking=True)
                else:
                    for chunk, source in enumerate(sources):
                        self.staging[chunk, first:end].copy_(source[first:end],
                                                             non_blocking=True)
                if finish:
                    for layer in range(first, end):
                        self._finish_layer(layer)

    def copy_chunk(self, chunk: int, source: torch.Tensor) -> None:
        with self._on_side():
            self.staging[chunk].copy_(source, non_blocking=True)

    def finish(self) -> None:
        with self._on_side():
            for layer in range(self.layout.layers):
                self._finish_layer(layer)

    def _finish_layer(self, layer: int) -> None:
        self._kv_split[layer].copy_(self.staging[:, layer].permute(1, 2, 0, 3, 4))
        if self.cuda:
            self.events[layer].record(self.stream)

    def cache(self, model):
        cache = new_cache(model)
        for layer in range(self.layout.layers):
            install_layer(cache, layer, self.kv[layer, 0].unsqueeze(0),
                          self.kv[layer, 1].unsqueeze(0))
        return cache


# ----------------------------------------------------------------------------- holder process
def _holder_main(conn, capacity: int, slab_bytes: int, namespace: bytes) -> None:
    """Another process: owns a KVPool, serves it over TCP, pins entries for same-host readers."""
    pool = KVPool(capacity, slab_bytes, name="gpu-ttft-holder")
    touch = np.frombuffer(pool.region.buffer, dtype=np.uint8)
    touch.fill(0)  # fault every page in now: readers register the mapping once, up front
    del touch

    def source(key):
        entry = pool.pin(key)
        if entry is None:
            return None
        return pool.views(entry), lambda: pool.unpin(entry)

    server = TcpPeerServer(source, host="127.0.0.1", port=0).start()
    held: list[bytes] = []
    leases: dict[int, list] = {}
    conn.send({"path": str(pool.region.path), "size": pool.region.size, "port": server.port})
    try:
        while True:
            message = conn.recv()
            op = message["op"]
            try:
                if op == "load":
                    for key in held:
                        pool.remove(key)
                    held.clear()
                    src = SharedRegion.attach(message["path"], message["size"], writable=False)
                    for key, offset, nbytes in message["items"]:
                        pool.put(namespace, key, src.buffer[offset : offset + nbytes])
                        held.append(key)
                    src.close()
                    conn.send({"loaded": len(held)})
                elif op == "pin":
                    entries = []
                    for key in message["keys"]:
                        entry = pool.pin(key)
                        if entry is None:
                            break
                        entries.append(entry)
                    if len(entries) < len(message["keys"]) or any(len(e.slabs) != 1
                                                                  for e in entries):
                        for entry in entries:
                            pool.unpin(entry)
                        conn.send({"error": "missing or multi-slab entry"})
                        continue
                    token = len(leases) + 1
                    while token in leases:
                        token += 1
                    leases[token] = entries
                    conn.send({"lease": token,
                               "offsets": [e.slabs[0] * pool.slab_bytes for e in entries]})
                elif op == "unpin":
                    for entry in leases.pop(message["lease"]):
                        pool.unpin(entry)
                    conn.send({"ok": True})
                elif op == "stop":
                    conn.send({"ok": True})
                    break
                else:
                    conn.send({"error": f"unknown op {op!r}"})
            except Exception:
                conn.send({"error": traceback.format_exc()})
    finally:
        server.stop(drain_timeout_s=1.0)
        pool.close()


class Holder:
    def __init__(self, capacity: int, slab_bytes: int, namespace: bytes) -> None:
        context = mp.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_holder_main, name="lmshare-gpu-ttft-holder",
                                       args=(child, capacity, slab_bytes, namespace), daemon=True)
        self.process.start()
        child.close()
        if not self.conn.poll(120):
            raise RuntimeError("the holder process did not start")
        info = self.conn.recv()
        self.path, self.size, self.port = info["path"], info["size"], info["port"]

    def call(self, op: str, **fields) -> dict:
        self.conn.send({"op": op, **fields})
        reply = self.conn.recv()
        if "error" in reply:
            raise RuntimeError(f"holder {op} failed: {reply['error']}")
        return reply

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.call("stop")
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.terminate()


class NotifyingSink:
    """PoolSink that also reports each finished chunk, so its copy can start at once."""

    def __init__(self, pool: KVPool, namespace: bytes, done: queue.SimpleQueue) -> None:
        self.inner = PoolSink(pool, namespace)
        self.done = done

    def begin(self, key: bytes, nbytes: int):
        return self.inner.begin(key, nbytes)

    def end(self, key: bytes, ok: bool) -> None:
        self.inner.end(key, ok)
        self.done.put((key, ok))


# ----------------------------------------------------------------------------- the benchmark
@dataclass
class Setup:
    model: object
    gate: LayerGate | None
    device: torch.device
    layout: ChunkLayout
    namespace: bytes
    local: KVPool
    local_t: torch.Tensor
    fetched: KVPool
    fetched_t: torch.Tensor
    peer_t: torch.Tensor
    holder: Holder
    transport: TcpTransport
    peer: PeerInfo
    executor: ThreadPoolExecutor
    streams: int
    layers_per_copy: int
    repeats: int
    gen_tokens: int
    verify_backend: object  # () -> context manager: the attention backend for verification


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(setup: Setup, case, reference: list[int], loader: KVLoader | None,
            reference_kv: torch.Tensor) -> dict:
    """A verification run under the deterministic attention backend (its continuation checked
    against ``reference``, its loaded KV against prefill's), one warm-up under the timing
    backend, then the timed runs."""
    model, device = setup.model, setup.device
    result: dict = {}
    with setup.verify_backend():
        sync(device)
        started = time.perf_counter()
        first, cache, cleanup = case()
        result["verify_ms"] = (time.perf_counter() - started) * 1e3
        tokens = continue_greedy(model, first, cache, setup.gen_tokens, device)
        result["tokens"] = tokens
        result["match"] = tokens == reference
        if loader is not None:
            sync(device)
            result["kv_identical"] = bool(torch.equal(loader.kv, reference_kv))
        del cache
        if cleanup is not None:
            cleanup()
    samples, firsts = [], []
    for run in range(setup.repeats + 1):
        sync(device)
        started = time.perf_counter()
        first, cache, cleanup = case()
        elapsed = (time.perf_counter() - started) * 1e3
        if run == 0:
            result["warmup_ms"] = elapsed
        else:
            samples.append(elapsed)
            firsts.append(first)
        del cache
        if cleanup is not None:
            cleanup()
    result["samples_ms"] = samples
    result["timed_first_tokens"] = firsts
    result["ttft_ms"] = statistics.median(samples)
    return result


def run_size(setup: Setup, cached_tokens: int, seed: int) -> dict:
    model, device, layout = setup.model, setup.device, setup.layout
    chunks = cached_tokens // CHUNK_TOKENS
    generator = torch.Generator().manual_seed(seed + cached_tokens)
    prompt = torch.randint(0, model.config.vocab_size, (cached_tokens + 1,), generator=generator)
    ids = prompt.to(device).unsqueeze(0)
    last = ids[:, -1:]
    keys = chunk_keys(setup.namespace, prompt[:-1].tolist(), CHUNK_TOKENS)
    assert len(keys) == chunks
    index = {key: i for i, key in enumerate(keys)}
    row: dict = {"prompt_tokens": cached_tokens + 1, "cached_tokens": cached_tokens,
                 "chunks": chunks, "kv_bytes": chunks * layout.nbytes}

    def log(text: str) -> None:
        print(f"[{cached_tokens + 1} tokens] {text}", file=sys.stderr, flush=True)

    # References (deterministic attention backend): full prefill, and prefill(prompt[:-1]) +
    # decode(last), each greedy. The second one's prefix KV is what the pools hold.
    with setup.verify_backend():
        cache = new_cache(model)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        full = continue_greedy(model, int(out.logits[0, -1].argmax()), cache, setup.gen_tokens,
                               device)
        del out, cache
        cache = new_cache(model)
        model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True, logits_to_keep=1)
        reference_kv = torch.stack([torch.stack((layer.keys[0], layer.values[0]))
                                    for layer in cache.layers])  # [L, 2, H, T, D]
        split = continue_greedy(model, decode(model, last, cache), cache, setup.gen_tokens,
                                device)
        del cache
    row["reference_full"], row["reference_split"] = full, split
    row["full_equals_split"] = full == split
    log(f"references done (full == split: {full == split})")

    # Store the prefix KV in the local pool, chunk by chunk, then hand it to the holder.
    L, _, H, C, D = layout.shape
    host = (reference_kv.view(L, 2, H, chunks, C, D).permute(3, 0, 1, 2, 4, 5).contiguous()
            .cpu())
    for key in setup.local.entries_by_namespace().get(setup.namespace, []):
        setup.local.remove(key)
    items = []
    for i, key in enumerate(keys):
        setup.local.put(setup.namespace, key, host[i].view(torch.uint8).numpy())
        entry = setup.local.pin(key)
        assert entry is not None and len(entry.slabs) == 1
        items.append((key, entry.slabs[0] * setup.local.slab_bytes, entry.nbytes))
        setup.local.unpin(entry)
    del host
    setup.holder.call("load", path=str(setup.local.region.path), size=setup.local.region.size,
                      items=items)
    log(f"stored {chunks} chunks of {layout.nbytes} bytes locally and in the holder")

    loader = KVLoader(layout, chunks, device)
    gate = setup.gate

    def hit_forward() -> tuple[int, object]:
        cache = loader.cache(model)
        if gate is not None:
            gate.events = loader.events
        try:
            first = decode(model, last, cache)
        finally:
            if gate is not None:
                gate.events = None
        return first, cache

    def recompute():
        cache = new_cache(model)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return int(out.logits[0, -1].argmax()), cache, None

    def local_hit():
        entries = [setup.local.pin(key) for key in keys]
        if any(entry is None for entry in entries):
            raise RuntimeError("local pool lost a chunk")
        base = setup.local.slab_bytes
        loader.load_layer_major([layout.view(setup.local_t, e.slabs[0] * base) for e in entries],
                                setup.layers_per_copy)
        first, cache = hit_forward()
        return first, cache, lambda: [setup.local.unpin(entry) for entry in entries]

    def peer_shm_hit():
        lease = setup.holder.call("pin", keys=keys)
        loader.load_layer_major([layout.view(setup.peer_t, off) for off in lease["offsets"]],
                                setup.layers_per_copy)
        first, cache = hit_forward()
        return first, cache, lambda: setup.holder.call("unpin", lease=lease["lease"])

    def tcp_fetch(done: queue.SimpleQueue) -> list:
        deadline = time.monotonic() + 120
        groups = [keys[s :: setup.streams] for s in range(setup.streams)]
        return [setup.executor.submit(setup.transport.fetch, setup.peer, group,
                                      NotifyingSink(setup.fetched, setup.namespace, done),
                                      deadline)
                for group in groups if group]

    def clear_fetched(entries) -> None:
        for entry in entries:
            setup.fetched.unpin(entry)
        for key in keys:
            setup.fetched.remove(key)

    def peer_tcp_hit():
        done: queue.SimpleQueue = queue.SimpleQueue()
        futures = tcp_fetch(done)
        loader.begin()
        entries = []
        base = setup.fetched.slab_bytes
        for _ in range(chunks):
            key, ok = done.get(timeout=120)
            if not ok:
                raise RuntimeError("a fetched chunk failed")
            entry = setup.fetched.pin(key)
            entries.append(entry)
            loader.copy_chunk(index[key], layout.view(setup.fetched_t, entry.slabs[0] * base))
        loader.finish()
        if sum(future.result() for future in futures) != chunks:
            raise RuntimeError("the TCP fetch came back short")
        first, cache = hit_forward()
        return first, cache, lambda: clear_fetched(entries)

    with torch.inference_mode():
        row["recompute"] = measure(setup, recompute, full, None, reference_kv)
        row["recompute_split_reference"] = split
        log(f"recompute {row['recompute']['ttft_ms']:.1f} ms")
        for name, case in (("local", local_hit), ("peer-shm", peer_shm_hit),
                           ("peer-tcp", peer_tcp_hit)):
            try:
                row[name] = measure(setup, case, split, loader, reference_kv)
            except Exception:  # keep the other cases' numbers; the run still fails at the end
                row[name] = {"error": traceback.format_exc(), "match": False,
                             "kv_identical": False, "ttft_ms": float("nan")}
                log(f"{name} FAILED:\n{row[name]['error']}")
                continue
            log(f"{name} {row[name]['ttft_ms']:.1f} ms, match {row[name]['match']}, "
                f"kv identical {row[name]['kv_identical']}")
        try:
            row["bandwidth_GBps"] = bandwidths(setup, loader, keys, chunks)
        except Exception:
            row["bandwidth_GBps"] = {"error": traceback.format_exc()}
            log(f"bandwidth FAILED:\n{row['bandwidth_GBps']['error']}")
    for name in CASES:
        row[name]["speedup"] = row["recompute"]["ttft_ms"] / row[name]["ttft_ms"]
    return row


def bandwidths(setup: Setup, loader: KVLoader, keys: list[bytes], chunks: int) -> dict:
    """Pure copy rates (GB/s, 1e9 bytes): host→device from each pinned region, and TCP fetch."""
    layout, device = setup.layout, setup.device
    nbytes = chunks * layout.nbytes

    def timed(action) -> float:
        runs = []
        for _ in range(3):
            sync(device)
            started = time.perf_counter()
            action()
            sync(device)
            runs.append(time.perf_counter() - started)
        return nbytes / statistics.median(runs) / 1e9

    local = [setup.local.pin(key) for key in keys]
    base = setup.local.slab_bytes
    local_src = [layout.view(setup.local_t, e.slabs[0] * base) for e in local]
    lease = setup.holder.call("pin", keys=keys)
    peer_src = [layout.view(setup.peer_t, off) for off in lease["offsets"]]

    def chunk_major(sources):
        loader.begin()
        for chunk, source in enumerate(sources):
            loader.copy_chunk(chunk, source)

    def layer_major(sources, group=1):
        loader.load_layer_major(sources, group, finish=False)

    def fetch_only():
        done: queue.SimpleQueue = queue.SimpleQueue()
        deadline = time.monotonic() + 120
        groups = [keys[s :: setup.streams] for s in range(setup.streams)]
        futures = [setup.executor.submit(setup.transport.fetch, setup.peer, group,
                                         NotifyingSink(setup.fetched, setup.namespace, done),
                                         deadline) for group in groups if group]
        if sum(future.result() for future in futures) != chunks:
            raise RuntimeError("the TCP fetch came back short")
        for key in keys:
            setup.fetched.remove(key)

    try:
        result = {
            "h2d_local_chunk_major": timed(lambda: chunk_major(local_src)),
            "h2d_local_layer_major": timed(lambda: layer_major(local_src)),
            "h2d_local_layer_group": timed(lambda: layer_major(local_src, setup.layers_per_copy)),
            "h2d_peer_chunk_major": timed(lambda: chunk_major(peer_src)),
            "h2d_peer_layer_major": timed(lambda: layer_major(peer_src)),
            "h2d_peer_layer_group": timed(lambda: layer_major(peer_src, setup.layers_per_copy)),
            "tcp_fetch": timed(fetch_only),
        }
    finally:
        for entry in local:
            setup.local.unpin(entry)
        setup.holder.call("unpin", lease=lease["lease"])
    return result


# ----------------------------------------------------------------------------- report
def _rate(bandwidth: dict, name: str, digits: int = 1) -> str:
    value = bandwidth.get(name)
    return f"{value:.{digits}f}" if isinstance(value, float) else "failed"


def report(results: dict) -> str:
    group = results["layers_per_copy"]
    rows, checks, rates = [], [], []
    for row in results["rows"]:
        cells = [row["prompt_tokens"], f"{row['kv_bytes'] / 1e9:.3f}"]
        for name in CASES:
            case = row[name]
            if "error" in case:
                cells.append("failed")
            elif name == "recompute":
                cells.append(f"{case['ttft_ms']:.1f}")
            else:
                cells.append(f"{case['ttft_ms']:.1f} ({case['speedup']:.1f}x)")
        rows.append(cells)
        expected = row["reference_split"][0]
        agree = [f"{sum(t == expected for t in row[n].get('timed_first_tokens', []))}/"
                 f"{len(row[n].get('timed_first_tokens', []))}" for n in CASES[1:]]
        checks.append([row["prompt_tokens"], "yes" if row["full_equals_split"] else "NO"]
                      + [("yes" if row[n]["match"] else "NO") + " / "
                         + ("yes" if row[n]["kv_identical"] else "NO") for n in CASES[1:]]
                      + [", ".join(agree)])
        bw = row["bandwidth_GBps"]
        rates.append([row["prompt_tokens"]]
                     + [_rate(bw, f"h2d_{where}_{how}") for where in ("local", "peer")
                        for how in ("chunk_major", "layer_group", "layer_major")]
                     + [_rate(bw, "tcp_fetch", 2)])
    reg = results["registration"]
    if reg:
        registration = "Registration (cudaHostRegister, once per mapping, not in TTFT): " + ", ".join(
            f"{name} {info['bytes'] / 2**30:.2f} GiB in {info['seconds'] * 1e3:.1f} ms"
            + (f" (flags {info['flags']})" if info.get("registered") else " (FAILED: pageable)")
            for name, info in reg.items())
    else:
        registration = "Registration: none (CPU run)."
    lines = [
        f"Device: {results['device_name']}  ",
        f"Host: {results['machine']}  ",
        f"Date: {results['date']}  ",
        f"Command: `{results['command']}`  ",
        f"Model: {results['model']}, random bf16 weights; torch {results['torch']}, "
        f"transformers {results['transformers']}; chunk = {CHUNK_TOKENS} tokens = "
        f"{results['chunk_bytes'] / 2**20:.2f} MiB; TTFT = median of {results['repeats']} runs "
        "after a warm-up. Hits load the KV of prompt[:-1] and run only the last token "
        f"(local and shm hits copy {group} layer(s) of a chunk per copy, layer groups in order, "
        "overlapped with the forward; the TCP hit copies each chunk as it lands).",
        "",
        table(["prompt tokens", "KV GB", "recompute ms", "local hit ms (speed-up)",
               "same-host peer (shm) ms (speed-up)", "TCP peer ms (speed-up)"], rows),
        "",
        "Copy bandwidth, GB/s = 1e9 B/s (host→device from the registered local pool and from "
        f"the peer's mapping: one copy a chunk, one per chunk and {group} layers, one per chunk "
        f"and layer; TCP: fetch into the local pool over {results['tcp_streams']} loopback "
        "connections):",
        "",
        table(["prompt tokens", "local chunk", f"local {group}-layer", "local 1-layer",
               "peer chunk", f"peer {group}-layer", "peer 1-layer", "TCP fetch"], rates),
        "",
        f"Correctness. Greedy continuation ({results['gen_tokens']} tokens) equal to "
        "recompute's / loaded KV bit-identical to prefill's, from a verification run of each "
        f"case under the {results['verify_backend']} attention backend (timed runs use "
        f"{results['timing_backend']}, which on the GPU is not bitwise reproducible run to run, "
        "so a near-tie token can flip even between two recomputes). Hits are compared with "
        "prefill(prompt[:-1]) + decode(last token); the second column says whether that equals "
        "a full prefill's continuation. Last column: how many timed runs' first tokens equal the "
        "split reference's (local, peer-shm, peer-tcp):",
        "",
        table(["prompt tokens", "full prefill == split"]
              + [f"{n} match / KV identical" for n in CASES[1:]]
              + ["timed first token == split's"], checks),
        "",
        registration,
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true",
                        help="a 2-layer tiny Llama and 512/1024-token prefixes (CPU CI)")
    parser.add_argument("--tokens", default=None,
                        help="cached prefix lengths, multiples of 256, comma-separated "
                             "(prompt = prefix + 1); default 4096,16384,32768 (tiny: 512,1024)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gen-tokens", type=int, default=8)
    parser.add_argument("--tcp-streams", type=int, default=4)
    parser.add_argument("--layers-per-copy", type=int, default=4,
                        help="hit loads copy this many layers of a chunk per copy (>= 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", default=None, help="also write the report here")
    parser.add_argument("--render", default=None, metavar="JSON",
                        help="print the report of a saved --out file and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        print(report(json.loads(Path(args.render).read_text())))
        return 0
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    spec = TINY if args.tiny else LLAMA3_8B
    default = "512,1024" if args.tiny else "4096,16384,32768"
    sizes = [int(x) for x in (args.tokens or default).split(",")]
    if any(size <= 0 or size % CHUNK_TOKENS for size in sizes):
        raise SystemExit(f"--tokens must be positive multiples of {CHUNK_TOKENS}")
    if args.repeats < 3 and not args.tiny:
        print("note: fewer than 3 timed repeats", file=sys.stderr)
    started = time.perf_counter()

    import transformers

    model = build_model(spec, device, args.seed)
    layout = ChunkLayout(spec.layers, spec.kv_heads, CHUNK_TOKENS, spec.head_dim, torch.bfloat16)
    capacity = max(sizes) // CHUNK_TOKENS * layout.nbytes
    namespace = ModelSignature(
        model=spec.name, revision=f"random-seed-{args.seed}", kv_dtype="bfloat16",
        kv_layout=f"layers={spec.layers},kv_heads={spec.kv_heads},head_dim={spec.head_dim},"
                  "chunk=[L,2,H,C,D]", chunk_tokens=CHUNK_TOKENS).namespace()
    print(f"model built in {time.perf_counter() - started:.1f} s; chunk {layout.nbytes} bytes; "
          f"pools of {capacity / 2**30:.2f} GiB", file=sys.stderr, flush=True)

    local = KVPool(capacity, layout.nbytes, name="gpu-ttft-local")
    fetched = KVPool(capacity, layout.nbytes, name="gpu-ttft-fetched")
    holder = Holder(capacity, layout.nbytes, namespace)
    peer_region = SharedRegion.attach(holder.path, holder.size, writable=False)
    registration: dict = {}
    if cuda:
        registration["local pool"] = host_register(local.region, read_only=False)
        registration["fetch pool"] = host_register(fetched.region, read_only=False)
        registration["peer mapping (read-only)"] = host_register(peer_region, read_only=True)
    if cuda:  # PyTorch's default SDPA choice (cuDNN on Hopper) is not bitwise reproducible
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def verify_backend():
            return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    else:
        verify_backend = contextlib.nullcontext
    transport = TcpTransport()
    executor = ThreadPoolExecutor(args.tcp_streams, thread_name_prefix="gpu-ttft-fetch")
    setup = Setup(model=model, gate=LayerGate(model) if cuda else None, device=device,
                  layout=layout, namespace=namespace, local=local,
                  local_t=region_tensor(local.region), fetched=fetched,
                  fetched_t=region_tensor(fetched.region), peer_t=region_tensor(peer_region),
                  holder=holder, transport=transport,
                  peer=PeerInfo("holder", "127.0.0.1", holder.port), executor=executor,
                  streams=args.tcp_streams, layers_per_copy=args.layers_per_copy,
                  repeats=args.repeats, verify_backend=verify_backend, gen_tokens=args.gen_tokens)
    command = "python -m benchmarks.gpu_ttft " + " ".join(sys.argv[1:] if argv is None else argv)
    results = {
        "command": command.strip(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "device_name": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.machine()})",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "model": f"{spec.name} (hidden {spec.hidden}, {spec.layers} layers, {spec.heads} heads, "
                 f"{spec.kv_heads} KV heads, intermediate {spec.intermediate}, vocab {spec.vocab})",
        "chunk_tokens": CHUNK_TOKENS, "chunk_bytes": layout.nbytes,
        "chunk_layout": "[layers, 2 (K,V), kv_heads, chunk_tokens, head_dim] bf16, C order",
        "repeats": args.repeats, "gen_tokens": args.gen_tokens, "tcp_streams": args.tcp_streams,
        "layers_per_copy": args.layers_per_copy,
        "timing_backend": "PyTorch's default SDPA choice",
        "verify_backend": "flash (FlashAttention-2 SDPA)" if cuda else "default (CPU)",
        "registration": {name: {k: v for k, v in info.items() if k != "address"}
                         for name, info in registration.items()},
        "rows": [],
    }
    try:
        with torch.inference_mode():
            for size in sizes:
                results["rows"].append(run_size(setup, size, args.seed))
                if args.out:  # partial results survive a later failure
                    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
                if cuda:
                    torch.cuda.empty_cache()  # the last size's loader buffers
    finally:
        executor.shutdown(wait=True)
        transport.close()
        del setup
        for info in registration.values():
            host_unregister(info)
        holder.stop()
        peer_region.close()
        local.close()
        fetched.close()
    results["seconds"] = time.perf_counter() - started
    text = report(results)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    ok = all(row[name]["match"] and row[name]["kv_identical"]
             for row in results["rows"] for name in CASES[1:])
    if not ok:
        print("FAILED: a hit's continuation or KV differs from recompute", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
