"""Copies between lmshare chunk bytes and vLLM's paged KV blocks, as whole opaque blocks.

vLLM describes its KV memory in ``KVCacheConfig.kv_cache_tensors``: layer ``l``'s page of
block ``b`` is ``page_bytes`` contiguous bytes at ``offset + l * layer_stride + b * block_stride``
in one backing allocation. Inside a page the layout belongs to the attention backend (the CPU
backend, for one, stores K dimension-first and V token-first), so pages are copied as opaque
bytes and never sliced per token.

A chunk of ``n`` blocks is stored as ``[num_layers, n, page_bytes]`` (layer-major): one
contiguous run per layer, which one ``index_select`` / ``index_copy_`` per allocation reads or
writes. The chunk bytes may arrive split into several segments (the pool's slabs).

Two copiers share one small interface (:class:`BlockCopier`):

* :class:`CpuBlockCopier` — the KV lives in host memory: copies run inline.
* :class:`AsyncDeviceCopier` — the KV lives on a GPU: ``non_blocking`` copies from the
  page-locked pool (or pinned staging) on a side stream, issued layer by layer, with one event
  per layer that the compute stream waits for just before that layer's attention. The stream operations sit behind :class:`StreamOps`, so the host-side logic also runs
  (and is unit-tested) with CPU tensors and :class:`InlineStreamOps`.

torch is imported here; lmshare's core modules never import this module.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmshare.errors import ConfigError, LMShareError
from lmshare.pool import fill_views

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview


class LayoutError(LMShareError):
    """vLLM's KV memory does not look the way its KVCacheConfig says (a vLLM version this
    integration does not know). lmshare switches itself off for this engine; upgrade lmshare or
    report the vLLM version."""


class ChunkSizeError(LMShareError):
    """A chunk's byte count does not match this engine's layout: it is treated as missing."""


# --------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Region:
    """One backing allocation holding ``layers`` layers (see KVCacheTensor)."""

    layers: int
    layer_stride: int
    block_stride: int
    offset: int
    size: int


@dataclass(frozen=True)
class KVGeometry:
    """Where every layer's page of every block lives. Same on the scheduler and the workers."""

    page_bytes: int
    num_blocks: int
    block_size: int  # tokens per block
    regions: tuple[Region, ...]
    layer_names: tuple[str, ...]  # in chunk order

    @property
    def num_layers(self) -> int:
        return sum(r.layers for r in self.regions)

    def chunk_nbytes(self, blocks: int) -> int:
        return self.num_layers * blocks * self.page_bytes

    @classmethod
    def from_kv_cache_config(cls, kv_cache_config: Any) -> KVGeometry:
        """From vLLM's ``KVCacheConfig``; raises :class:`ConfigError` for layouts lmshare does
        not handle (several KV cache groups, e.g. hybrid attention/Mamba models)."""
        groups = [g for g in kv_cache_config.kv_cache_groups
                  if getattr(g, "enable_kv_transfer", True)]
        if len(groups) != 1:
            raise ConfigError(
                f"lmshare supports models with exactly one KV cache group (plain attention); "
                f"this model has {len(kv_cache_config.kv_cache_groups)}. Run it without the "
                f"LMShareConnector.")
        spec = groups[0].kv_cache_spec
        page = int(spec.page_size_bytes)
        names = set(groups[0].layer_names)
        regions, order = [], []
        for tensor in kv_cache_config.kv_cache_tensors:
            if getattr(tensor, "host_resident", False):
                continue
            all_layers, layer_stride, block_stride = _placement(tensor, page)
            layers = [n for n in all_layers if n in names]
            if not layers:
                continue
            if len(layers) != len(all_layers):
                raise ConfigError("a KV allocation mixes cache groups; lmshare cannot copy it")
            regions.append(Region(len(layers), layer_stride, block_stride,
                                  int(getattr(tensor, "offset", 0)), int(tensor.size)))
            order.extend(layers)
        if not regions or set(order) != names:
            raise ConfigError("vLLM's KVCacheConfig does not place every attention layer; "
                              "lmshare cannot copy this model's KV")
        geometry = cls(page, int(kv_cache_config.num_blocks), int(spec.block_size),
                       tuple(regions), tuple(order))
        for r in geometry.regions:
            last = r.offset + (r.layers - 1) * r.layer_stride + \
                (geometry.num_blocks - 1) * r.block_stride + page
            if r.block_stride < page or last > r.size:
                raise ConfigError(f"KV allocation {r} does not fit {geometry.num_blocks} blocks "
                                  f"of {page} bytes")
        return geometry


def _placement(tensor: Any, page: int) -> tuple[list[str], int, int]:
    """(layer names, layer stride, block stride) of one ``KVCacheTensor``, by the fields it has.

    Newer vLLM places several same-shaped layers in one allocation (``layers``,
    ``layer_stride``, ``block_stride``). vLLM 0.26 gives one allocation per layer
    (``shared_by``; ``block_stride`` 0 means pages follow each other, > 0 that the layer's
    pages sit ``block_stride`` apart in a packed allocation, from ``offset``)."""
    if hasattr(tensor, "layers"):
        return list(tensor.layers), int(tensor.layer_stride), int(tensor.block_stride)
    if not hasattr(tensor, "shared_by"):
        raise ConfigError("vLLM's KVCacheTensor has neither `layers` nor `shared_by`: a vLLM "
                          "version lmshare does not know; run without the LMShareConnector")
    # Several names share one allocation only when they alias the same bytes (stride 0).
    return list(tensor.shared_by), 0, int(tensor.block_stride) or page


# --------------------------------------------------------------------------- paged views
def _flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 tensor over the whole storage behind ``tensor``."""
    storage = tensor.untyped_storage()
    flat = torch.empty(0, dtype=torch.uint8, device=tensor.device)
    flat.set_(storage, 0, (storage.nbytes(),), (1,))
    return flat


class PagedBlocks:
    """``[layers, num_blocks, page_bytes]`` uint8 views of each backing allocation.

    ``gather(ids)`` returns ``[num_layers, len(ids), page_bytes]`` (contiguous, on the KV's
    device); ``scatter(ids, src)`` writes such a tensor back. Whole pages only.
    """

    def __init__(self, geometry: KVGeometry, flats: Sequence[torch.Tensor]) -> None:
        if len(flats) != len(geometry.regions):
            raise LayoutError("one flat buffer per region is needed")
        self.geometry = geometry
        self.device = flats[0].device
        self._views = []
        page = geometry.page_bytes
        for region, flat in zip(geometry.regions, flats):
            if flat.dtype != torch.uint8 or flat.dim() != 1:
                raise LayoutError("regions must be flat uint8 tensors")
            self._views.append(flat.as_strided(
                (region.layers, geometry.num_blocks, page),
                (region.layer_stride, region.block_stride, 1), region.offset))
        # layer i (chunk order) as [num_blocks, page_bytes]
        self._layer_views = [view[i] for view in self._views for i in range(view.shape[0])]
        # the same as 8-byte words where alignment allows: index kernels move 8 bytes a thread
        self._layer_words = [_as_words(v) for v in self._layer_views]

    @classmethod
    def from_kv_caches(cls, geometry: KVGeometry, kv_caches: dict[str, Any]) -> PagedBlocks:
        """From the tensors vLLM passes to ``register_kv_caches``; checks that every layer's
        tensor starts where the geometry says, so a layout change can never copy wrong bytes."""
        flats, first = [], 0
        for region in geometry.regions:
            names = geometry.layer_names[first : first + region.layers]
            first += region.layers
            tensors = []
            for name in names:
                t = kv_caches.get(name)
                if isinstance(t, (list, tuple)):
                    raise LayoutError(f"layer {name} has several KV tensors; not supported")
                if t is None:
                    raise LayoutError(f"vLLM registered no KV tensor for layer {name}")
                tensors.append(t)
            flat = _flat_bytes(tensors[0])
            if flat.numel() < region.size:
                raise LayoutError(f"KV storage of {names[0]} holds {flat.numel()} bytes, the "
                                  f"config says {region.size}")
            base = flat.data_ptr()
            for index, (name, t) in enumerate(zip(names, tensors)):
                if t.untyped_storage().data_ptr() != base:
                    raise LayoutError(f"layer {name} does not share its region's storage")
                expected = base + region.offset + index * region.layer_stride
                if t.data_ptr() != expected:
                    raise LayoutError(f"layer {name} starts at byte {t.data_ptr() - base}, the "
                                      f"config says {expected - base}")
            flats.append(flat)
        return cls(geometry, flats)

    def _index(self, block_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        if isinstance(block_ids, torch.Tensor):
            return block_ids.to(self.device, torch.int64)
        return torch.tensor(list(block_ids), dtype=torch.int64, device=self.device)

    def gather(self, block_ids: Sequence[int] | torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
        index = self._index(block_ids)
        g = self.geometry
        if out is None:
            out = torch.empty((g.num_layers, index.numel(), g.page_bytes), dtype=torch.uint8,
                              device=self.device)
        first = 0
        for view in self._views:
            layers = view.shape[0]
            torch.index_select(view, 1, index, out=out[first : first + layers])
            first += layers
        return out

    def gather_chunks(self, block_ids: torch.Tensor, out: torch.Tensor) -> None:
        """Chunks of blocks ``block_ids`` (``[chunks, blocks]``, on the KV's device) into
        ``out`` (``[chunks, num_layers, blocks, page_bytes]``: each chunk layer-major and
        contiguous): two kernels per allocation, whatever the number of chunks."""
        first = 0
        for view in self._views:
            layers = view.shape[0]
            words, out_words = _as_words(view), _as_words(out[:, first : first + layers])
            if words is not None and out_words is not None:
                out_words.copy_(words[:, block_ids].transpose(0, 1))
            else:
                out[:, first : first + layers].copy_(view[:, block_ids].transpose(0, 1))
            first += layers

    def scatter(self, block_ids: Sequence[int] | torch.Tensor, src: torch.Tensor) -> None:
        index = self._index(block_ids)
        g = self.geometry
        if tuple(src.shape) != (g.num_layers, index.numel(), g.page_bytes):
            raise ChunkSizeError(f"source shape {tuple(src.shape)} does not match "
                                 f"{(g.num_layers, index.numel(), g.page_bytes)}")
        first = 0
        for view in self._views:
            layers = view.shape[0]
            part = src[first : first + layers]
            if self.device.type == "cpu":
                # On CPU index_copy_ along the block dimension runs at ~2 GB/s; one strided
                # copy per block ([layers, page]) runs at memcpy speed (~18 GB/s measured).
                for position, block in enumerate(index.tolist()):
                    view[:, block].copy_(part[:, position])
            else:
                view.index_copy_(1, index, part)  # one kernel
            first += layers

    def scatter_layer(self, layer: int, block_ids: torch.Tensor, src: torch.Tensor) -> None:
        """Write layer ``layer``'s pages of ``block_ids`` (any shape, on the KV's device) from
        ``src`` (``block_ids.shape + (page_bytes,)``, may be strided): one kernel on a GPU."""
        view = self._layer_views[layer]
        if tuple(src.shape) != (*block_ids.shape, self.geometry.page_bytes):
            raise ChunkSizeError(f"source shape {tuple(src.shape)} does not match "
                                 f"{(*block_ids.shape, self.geometry.page_bytes)}")
        if self.device.type == "cpu":
            flat_src = src.reshape(-1, self.geometry.page_bytes)
            for position, block in enumerate(block_ids.reshape(-1).tolist()):
                view[block].copy_(flat_src[position])
        else:
            words, src_words = self._layer_words[layer], _as_words(src)
            if words is not None and src_words is not None:
                words[block_ids] = src_words  # index_put_: one kernel, strided source allowed
            else:
                view[block_ids] = src


def _as_words(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` (uint8, last dimension contiguous) viewed as int64 words, or None where its
    offset, strides or row length are not multiples of 8 bytes."""
    if t.stride(-1) != 1 or t.shape[-1] % 8 or t.storage_offset() % 8 or \
            any(stride % 8 for stride in t.stride()[:-1]):
        return None
    try:
        return t.view(torch.int64)
    except RuntimeError:
        return None


# --------------------------------------------------------------------------- host bytes
def _as_tensor(buffer: Buffer) -> torch.Tensor:
    """A uint8 CPU tensor over ``buffer`` without copying (read-only buffers are only read)."""
    view = memoryview(buffer).cast("B")
    if view.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": we only read
        return torch.frombuffer(view, dtype=torch.uint8)


def buffer_address(buffer: Buffer) -> int:
    """The address of ``buffer``'s first byte (no export is kept)."""
    import numpy as np

    return int(np.frombuffer(memoryview(buffer).cast("B"), dtype=np.uint8).ctypes.data)


def segments_nbytes(segments: Sequence[Buffer]) -> int:
    return sum(memoryview(s).nbytes for s in segments)


def copy_segments(segments: Sequence[Buffer], out: torch.Tensor) -> torch.Tensor:
    """Concatenate ``segments`` into the flat uint8 CPU tensor ``out``; returns ``out``."""
    runs = [_as_tensor(segment) for segment in segments]
    copy_range(runs, 0, sum(run.numel() for run in runs), out)
    return out


def copy_range(runs: Sequence[torch.Tensor], lo: int, hi: int, out: torch.Tensor) -> None:
    """Copy bytes ``lo .. hi`` of the concatenation of ``runs`` (flat uint8 host tensors) into
    the flat ``out`` (``non_blocking``: on a side stream the copies are asynchronous)."""
    start, written = 0, 0
    for run in runs:
        end = start + run.numel()
        if end > lo and start < hi:
            a, b = max(lo, start) - start, min(hi, end) - start
            out[written : written + b - a].copy_(run[a:b], non_blocking=True)
            written += b - a
        if end >= hi:
            break
        start = end
    if written != hi - lo:
        raise ChunkSizeError(f"bytes {lo}..{hi} are outside a {start}-byte chunk")


class PendingSave:
    """Blocks being copied out of vLLM's KV, to be stored as one chunk.

    The store writes them where they go with :meth:`write_into` (the worker pool's reserved
    slabs: on a GPU, one DMA per run of slabs from device memory), waits with :meth:`written`,
    then calls :meth:`release`. :meth:`wait` gives the bytes as host memory instead (valid until
    :meth:`release`)."""

    def __init__(self, host: torch.Tensor, wait: Callable[[], None] | None = None,
                 release: Callable[[], None] | None = None) -> None:
        self._host = host
        self._wait = wait
        self._release = release

    @property
    def nbytes(self) -> int:
        return self._host.numel()

    def wait(self) -> memoryview:
        if self._wait is not None:
            self._wait()
            self._wait = None
        return memoryview(self._host.numpy()).cast("B")

    def write_into(self, views: Sequence[memoryview]) -> None:
        """Copy the chunk's bytes into ``views`` (in order; their sizes add up to
        :attr:`nbytes`); may return before the copy is done (see :meth:`written`)."""
        fill_views(list(views), self.wait())

    def written(self) -> None:
        """Wait until every :meth:`write_into` copy is done."""

    def release(self) -> None:
        if self._release is not None:
            self.wait()
            self._release()
            self._release = None


class DevicePendingSave(PendingSave):
    """A chunk gathered into device memory on the copier's save stream; :meth:`write_into`
    copies it device -> host on that stream (from the store's thread), never on the compute
    stream, so the step that computed it does not wait."""

    def __init__(self, copier: AsyncDeviceCopier, device: torch.Tensor) -> None:
        super().__init__(device)
        self._copier = copier
        self._device: torch.Tensor | None = device  # on the save stream, after the gather
        self._host_copy: torch.Tensor | None = None

    def _source(self) -> torch.Tensor:
        if self._device is None:
            raise ValueError("the save was released")
        return self._device

    def write_into(self, views: Sequence[memoryview]) -> None:
        # One copy call per run of slabs and nothing else: on the store thread every CUDA call
        # waits for the GIL, which vLLM's busy loop holds for up to a switch interval.
        source, offset = self._source(), 0
        with self._copier.ops.use(self._copier.save_stream):
            for view in views:
                n = view.nbytes
                _as_tensor(view).copy_(source[offset : offset + n], non_blocking=True)
                offset += n
        self._ticket = self._copier.copies_issued()

    def written(self) -> None:
        ticket = getattr(self, "_ticket", None)
        if ticket is not None:
            self._copier.wait_copies(ticket)  # one wait covers every chunk written so far

    def wait(self) -> memoryview:
        if self._host_copy is None:  # (any thread: the save stream is made current only here)
            host = self._copier.ops.pinned(self._source().numel())
            with self._copier.ops.use(self._copier.save_stream):
                host.copy_(self._source(), non_blocking=True)
                self._copier.ops.record(self._copier.save_stream).synchronize()
            self._host_copy = host
        return memoryview(self._host_copy.numpy()).cast("B")

    def release(self) -> None:
        if self._device is not None:
            self.written()
            nbytes, self._device = self._device.numel(), None
            self._host_copy = None
            self._copier._saved(nbytes)


class BlockCopier(ABC):
    """Copies chunk bytes into vLLM's blocks (loads) and blocks out into host bytes (saves)."""

    #: True where :meth:`start_loads` returns before the copies finish (they overlap other work)
    asynchronous: bool = False

    def __init__(self, blocks: PagedBlocks) -> None:
        self.blocks = blocks
        self.geometry = blocks.geometry
        # registered host ranges (the worker pool): address -> uint8 tensor over the range
        self._registered: dict[int, torch.Tensor] = {}

    # -- the worker pool, registered once: chunks in it are read in place -----------------
    def _pin(self, address: int, nbytes: int, read_only: bool) -> bool:
        return True  # host copies need no page-locking

    def _unpin(self, address: int) -> None:  # noqa: B027 - nothing to undo on the host
        pass

    def register_host(self, buffer: Buffer, read_only: bool = False) -> bool:
        """Register ``buffer`` (the worker pool as the client maps it, or a same-host peer's
        pool mapped ``read_only``): chunks whose slabs lie in it are read in place, adjacent
        slabs as one range (the device copier also page-locks it for direct DMA). Call
        :meth:`unregister_host` before it is unmapped."""
        address, nbytes = buffer_address(buffer), memoryview(buffer).nbytes
        if address in self._registered:
            return True
        if not self._pin(address, nbytes, read_only):
            return False
        # copy on write: loads on other threads iterate the registrations without a lock
        self._registered = {**self._registered, address: _as_tensor(buffer)}
        return True

    def unregister_host(self, buffer: Buffer) -> None:
        address = buffer_address(buffer)
        if address in self._registered:
            self._unpin(address)
            self._registered = {a: t for a, t in self._registered.items() if a != address}

    def _registered_runs(self, segments: Sequence[Buffer]) -> list[torch.Tensor] | None:
        """The segments as views of registered memory, adjacent ones merged; None if any
        segment lies outside registered memory."""
        if not self._registered:
            return None
        runs: list[tuple[torch.Tensor, int, int]] = []  # (base tensor, start, end)
        for segment in segments:
            start = buffer_address(segment)
            end = start + memoryview(segment).nbytes
            for base_address, base in self._registered.items():
                if base_address <= start and end <= base_address + base.numel():
                    lo, hi = start - base_address, end - base_address
                    if runs and runs[-1][0] is base and runs[-1][2] == lo:
                        runs[-1] = (base, runs[-1][1], hi)
                    else:
                        runs.append((base, lo, hi))
                    break
            else:
                return None
        return [base[lo:hi] for base, lo, hi in runs]

    def chunk_blocks(self, nbytes: int) -> int:
        """How many blocks a chunk of ``nbytes`` bytes holds; raises for a foreign size."""
        per_block = self.geometry.num_layers * self.geometry.page_bytes
        if nbytes <= 0 or nbytes % per_block:
            raise ChunkSizeError(f"chunk of {nbytes} bytes is not a whole number of "
                                 f"{per_block}-byte blocks")
        return nbytes // per_block

    def _check(self, nbytes: int, first: int, count: int) -> int:
        per_chunk = self.chunk_blocks(nbytes)
        if first < 0 or count < 0 or first + count > per_chunk:
            raise ChunkSizeError(f"blocks {first}..{first + count} are outside a "
                                 f"{per_chunk}-block chunk")
        return per_chunk

    def _source(self, segments: Sequence[Buffer], staging: torch.Tensor | None
                ) -> torch.Tensor:
        """The chunk as one flat uint8 CPU tensor: the segment itself when there is one,
        else a copy into ``staging``."""
        if len(segments) == 1 and staging is None:
            return _as_tensor(segments[0])
        nbytes = segments_nbytes(segments)
        if staging is None:
            staging = torch.empty(nbytes, dtype=torch.uint8)
        return copy_segments(segments, staging[:nbytes])

    @abstractmethod
    def load(self, segments: Sequence[Buffer], first: int, block_ids: Sequence[int]) -> None:
        """Copy blocks ``first .. first+len(block_ids)`` of a chunk (its bytes in
        ``segments``) into vLLM's blocks ``block_ids`` (or queue the copy until
        :meth:`start_loads`). The segments may be read until :meth:`wait_loads` returns:
        release the chunk's lease after that."""

    def start_loads(self) -> None:  # noqa: B027 - optional hook
        """Every load of this step is queued: start them. Layer ``i`` of the loaded blocks
        may be read once :meth:`wait_layer` ``(i)`` returns (for the CPU copier: at once)."""

    def wait_layer(self, layer: int) -> None:  # noqa: B027 - optional hook
        """Make the compute that follows see layer ``layer`` (chunk order) of every load
        started by :meth:`start_loads`."""

    def wait_loads(self) -> None:  # noqa: B027 - optional hook
        """Make the compute that follows see every load, and wait until no load reads its
        source bytes any more (the chunks' leases may be released after this)."""

    @abstractmethod
    def save(self, block_ids: Sequence[int]) -> PendingSave:
        """Start copying ``block_ids`` (all layers) out; safe to reuse the blocks once this
        returns (for the device copier: once the compute stream passes this point)."""

    def save_chunks(self, chunks: Sequence[Sequence[int]]) -> list[PendingSave | None]:
        """:meth:`save` for each chunk's blocks; None for a chunk the copier has no room
        for now (it is not stored: a future miss)."""
        return [self.save(block_ids) for block_ids in chunks]

    def close(self) -> None:  # noqa: B027 - optional hook
        """Finish outstanding copies and drop buffers."""


class CpuBlockCopier(BlockCopier):
    """The KV is host memory: every copy runs inline. Save buffers are reused."""

    def __init__(self, blocks: PagedBlocks, pool_bytes: int = 1 << 30) -> None:
        super().__init__(blocks)
        self._staging: torch.Tensor | None = None
        self.pool = HostBufferPool(StreamOps(), pool_bytes)

    def _staging_for(self, nbytes: int) -> torch.Tensor:
        if self._staging is None or self._staging.numel() < nbytes:
            self._staging = torch.empty(nbytes, dtype=torch.uint8)
        return self._staging

    def load(self, segments: Sequence[Buffer], first: int, block_ids: Sequence[int]) -> None:
        nbytes = segments_nbytes(segments)
        per_chunk = self._check(nbytes, first, len(block_ids))
        runs = self._registered_runs(segments)
        if runs is not None and len(runs) == 1:
            src = runs[0]  # the chunk's slabs are adjacent in the pool: read in place
        else:
            staging = None if len(segments) == 1 else self._staging_for(nbytes)
            src = self._source(segments, staging)
        g = self.geometry
        chunk = src.view(g.num_layers, per_chunk, g.page_bytes)
        self.blocks.scatter(block_ids, chunk[:, first : first + len(block_ids)])

    def save(self, block_ids: Sequence[int]) -> PendingSave:
        g = self.geometry
        nbytes = g.chunk_nbytes(len(block_ids))
        buf = self.pool.take(nbytes)
        self.blocks.gather(block_ids, out=buf[:nbytes].view(g.num_layers, len(block_ids),
                                                            g.page_bytes))
        return PendingSave(buf[:nbytes], release=lambda: self.pool.give(buf))

    def close(self) -> None:
        self.pool.clear()
        self._registered.clear()


# --------------------------------------------------------------------------- device copier
class StreamOps:
    """The stream/event operations the device copier needs (CUDA: :class:`CudaStreamOps`)."""

    def new_stream(self) -> Any:
        return None

    def use(self, stream: Any) -> Any:
        """Context manager: make ``stream`` current."""
        import contextlib

        return contextlib.nullcontext()

    def stream_waits_current(self, stream: Any) -> None:
        """``stream`` waits for work queued so far on the current (compute) stream."""

    def current_waits_stream(self, stream: Any) -> None:
        """The current stream waits for work queued so far on ``stream``."""

    def current_waits_event(self, event: Any) -> None:
        """The current stream waits for ``event`` (from :meth:`record`)."""

    def record(self, stream: Any) -> Any:
        """An event marking the work queued so far on ``stream``; has ``synchronize()`` and
        ``query()``."""
        return _DoneEvent()

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def marker(self) -> Any:
        """A point in the compute stream's work, for timing it (see RecomputeRate)."""
        return _WallClockMarker()

    def host_register(self, address: int, nbytes: int, read_only: bool = False) -> bool:
        """Page-lock existing host memory for direct DMA (cudaHostRegister; a read-only
        mapping needs cudaHostRegisterReadOnly); False if not."""
        return False

    def host_unregister(self, address: int) -> None:
        pass


class _WallClockMarker:
    """Work on the host is done when it is issued: the wall clock times it."""

    def __init__(self) -> None:
        self.at = 0.0

    def record(self) -> None:
        self.at = time.perf_counter()

    def done(self) -> bool:
        return True

    def seconds_since(self, other: _WallClockMarker) -> float:
        return self.at - other.at


class _CudaMarker:
    def __init__(self) -> None:
        self.event = torch.cuda.Event(enable_timing=True)

    def record(self) -> None:
        self.event.record()  # on the current (compute) stream

    def done(self) -> bool:
        return bool(self.event.query())

    def seconds_since(self, other: _CudaMarker) -> float:
        return other.event.elapsed_time(self.event) / 1000.0


class _DoneEvent:
    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class InlineStreamOps(StreamOps):
    """Stream ops for CPU tensors: everything is already complete (used by the unit tests).
    ``register`` makes host registration succeed, to exercise the direct-copy path."""

    def __init__(self, register: bool = False) -> None:
        self.register = register

    def host_register(self, address: int, nbytes: int, read_only: bool = False) -> bool:
        return self.register


class CudaStreamOps(StreamOps):  # pragma: no cover - needs a GPU
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def new_stream(self) -> Any:
        return torch.cuda.Stream(device=self.device)

    def use(self, stream: Any) -> Any:
        return torch.cuda.stream(stream)

    def stream_waits_current(self, stream: Any) -> None:
        stream.wait_stream(torch.cuda.current_stream(self.device))

    def current_waits_stream(self, stream: Any) -> None:
        torch.cuda.current_stream(self.device).wait_stream(stream)

    def current_waits_event(self, event: Any) -> None:
        torch.cuda.current_stream(self.device).wait_event(event)

    def record(self, stream: Any) -> Any:
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def marker(self) -> Any:
        return _CudaMarker()

    def host_register(self, address: int, nbytes: int, read_only: bool = False) -> bool:
        # flags 0: cudaHostRegisterDefault; 8: cudaHostRegisterReadOnly (a peer's pool,
        # mapped read-only: the device only reads it)
        code = torch.cuda.cudart().cudaHostRegister(address, nbytes, 8 if read_only else 0)
        if int(code) != 0:
            log.warning("cudaHostRegister of %d bytes failed (%s); loads go through staging",
                        nbytes, code)
            return False
        return True

    def host_unregister(self, address: int) -> None:
        torch.cuda.cudart().cudaHostUnregister(address)


class HostBufferPool:
    """Reusable host buffers (pinned for the device copier: pinning is slow; fresh pages cost
    page faults). Keeps up to ``max_bytes`` of free buffers. Thread-safe: stores give buffers
    back from the saver thread."""

    def __init__(self, ops: StreamOps, max_bytes: int = 1 << 30) -> None:
        self._ops = ops
        self._free: list[torch.Tensor] = []
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self.allocated = 0

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            best = None
            for index, buf in enumerate(self._free):
                if buf.numel() >= nbytes and (best is None
                                              or buf.numel() < self._free[best].numel()):
                    best = index
            if best is not None:
                return self._free.pop(best)
            self.allocated += 1
        return self._ops.pinned(nbytes)

    def give(self, buf: torch.Tensor) -> None:
        with self._lock:
            kept = sum(b.numel() for b in self._free)
            if kept + buf.numel() <= self._max_bytes:
                self._free.append(buf)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


@dataclass
class _QueuedLoad:
    """A chunk's load, queued until :meth:`AsyncDeviceCopier.start_loads`."""

    runs: list[torch.Tensor]  # the chunk's bytes in order, where they lie (pool or peer pool)
    per_chunk: int  # blocks in the chunk
    first: int  # first block of the chunk to load
    block_ids: list[int]  # destination blocks


class AsyncDeviceCopier(BlockCopier):
    """The KV is device memory: loads are asynchronous copies on a side stream, layer by layer,
    overlapped with the forward.

    Loads: :meth:`load` queues a chunk. Its bytes are read in place when they lie in host memory
    registered with :meth:`register_host` (the worker's shared pool, page-locked with
    cudaHostRegister: measured on an H100 at 54 GB/s vs 7 GB/s unregistered), else copied
    from where they lie through the driver (slower; a pool whose registration is still under
    way). :meth:`start_loads` issues, on the side stream and after
    the compute stream's pending work (such as block zeroing), the step's copies layer group by
    layer group: the group's layers of every queued chunk go host → device in one copy a chunk
    (a chunk is layer-major, so a run of its layers is contiguous) into a temporary device
    buffer of at most ``max_temp_bytes`` (which sets the group size), each layer is scattered
    into its blocks (one kernel a layer), and an event marks layer ``i`` ready. :meth:`wait_layer` makes the compute stream wait for that event only,
    so attention of layer 0 runs while later layers are still copying. :meth:`wait_loads`
    waits until the copies no longer read the pool (then leases may go).

    Saves (:meth:`save_chunks`): a save stream waits for the compute stream (the forward that
    wrote the KV) and gathers the step's chunks into device memory (bounded by
    ``max_save_bytes``); the compute stream waits for that gather only. The store thread then
    copies each chunk device -> host straight into the worker pool's reserved slabs
    (:meth:`DevicePendingSave.write_into`, page-locked pool: DMA at full speed), so neither a
    pinned staging buffer nor a host memcpy stands between the forward and the pool.
    """

    asynchronous = True

    def __init__(self, blocks: PagedBlocks, ops: StreamOps | None = None,
                 max_temp_bytes: int = 256 << 20, max_save_bytes: int = 4 << 30) -> None:
        super().__init__(blocks)
        self.max_temp_bytes = max_temp_bytes  # device memory for loads in flight, per group
        self.max_save_bytes = max_save_bytes  # device memory for gathered chunks to store
        self.ops = ops if ops is not None else CudaStreamOps(blocks.device)
        self.stream = self.ops.new_stream()  # loads
        self.save_stream = self.ops.new_stream()  # gathers and device -> host copies of saves
        self._save_lock = threading.Lock()
        self._save_bytes = 0
        self._save_keep: list[tuple[Any, list[torch.Tensor]]] = []  # index tensors in use
        self._copies_issued = self._copies_done = 0
        self.saves_dropped = 0
        self._in_flight: list[tuple[Any, list[torch.Tensor]]] = []  # (event, keep alive)
        self._queued: list[_QueuedLoad] = []
        self._layer_events: list[Any] = []  # of the loads started by start_loads
        self._reads_pool = False  # started loads read registered (leased) memory
        self.loads_registered = 0  # chunks DMA'd from page-locked memory
        self.loads_unregistered = 0  # chunks copied from memory not page-locked (yet)

    def _pin(self, address: int, nbytes: int, read_only: bool) -> bool:
        return self.ops.host_register(address, nbytes, read_only)

    def _unpin(self, address: int) -> None:
        self.wait_loads()
        self._reclaim(wait=True)
        self.ops.host_unregister(address)

    def _reclaim(self, wait: bool = False) -> None:
        still = []
        for event, keep in self._in_flight:
            if wait:
                event.synchronize()
            elif not event.query():
                still.append((event, keep))
        self._in_flight = still

    def load(self, segments: Sequence[Buffer], first: int, block_ids: Sequence[int]) -> None:
        nbytes = segments_nbytes(segments)
        per_chunk = self._check(nbytes, first, len(block_ids))
        runs = self._registered_runs(segments)
        if runs is None:
            # Memory not page-locked (yet): copied from where it lies, through the driver
            # (slower, synchronous), rather than paying for pinned staging inside a request.
            runs = [_as_tensor(segment) for segment in segments]
            self.loads_unregistered += 1
        else:
            self.loads_registered += 1
        self._reclaim()
        self._queued.append(_QueuedLoad(runs, per_chunk, first, list(block_ids)))

    def start_loads(self) -> None:
        if not self._queued:
            return
        # Called again in a step (batches), the new events come after the earlier loads on the
        # side stream: waiting for the new layer-i event also waits for every earlier load.
        queued, self._queued = self._queued, []
        g, page, device = self.geometry, self.geometry.page_bytes, self.blocks.device
        # Loads of equal block count form a batch: one scatter kernel per layer and batch.
        by_count: dict[int, list[_QueuedLoad]] = {}
        for q in queued:
            by_count.setdefault(len(q.block_ids), []).append(q)
        batches = [(loads, torch.tensor([q.block_ids for q in loads], dtype=torch.int64))
                   for loads in by_count.values()]
        rows = sum(len(q.block_ids) for q in queued)
        # Layers per host->device copy: as many as the temporary device buffer allows (fewer,
        # larger copies), but at least one so that layer 0 is ready early.
        group = max(1, min(g.num_layers, self.max_temp_bytes // max(1, rows * page)))
        self.ops.stream_waits_current(self.stream)
        events: list[Any] = []
        with self.ops.use(self.stream):
            indexes = [index.to(device, non_blocking=True) for _, index in batches]
            for first_layer in range(0, g.num_layers, group):
                end_layer = min(g.num_layers, first_layer + group)
                temps = [self._copy_layers(loads, first_layer, end_layer) for loads, _ in batches]
                for layer in range(first_layer, end_layer):
                    for temp, index in zip(temps, indexes):
                        self.blocks.scatter_layer(layer, index, temp[:, layer - first_layer])
                    events.append(self.ops.record(self.stream))
        self._layer_events = events
        self._reads_pool = True
        self._in_flight.append((events[-1], [index for _, index in batches] + indexes))

    def _copy_layers(self, loads: list[_QueuedLoad], first_layer: int, end_layer: int
                     ) -> torch.Tensor:
        """Host -> device copies of layers ``first_layer .. end_layer`` of ``loads`` (equal
        block counts) into a new ``[loads, layers, blocks, page]`` device tensor."""
        page, count = self.geometry.page_bytes, len(loads[0].block_ids)
        temp = torch.empty((len(loads), end_layer - first_layer, count, page), dtype=torch.uint8,
                           device=self.blocks.device)
        for position, q in enumerate(loads):
            if count == q.per_chunk:  # a whole chunk: its layers are one contiguous run
                copy_range(q.runs, first_layer * count * page, end_layer * count * page,
                           temp[position].view(-1))
                continue
            for layer in range(first_layer, end_layer):
                lo = (layer * q.per_chunk + q.first) * page
                copy_range(q.runs, lo, lo + count * page,
                           temp[position, layer - first_layer].view(-1))
        return temp

    def wait_layer(self, layer: int) -> None:
        if layer < len(self._layer_events):
            self.ops.current_waits_event(self._layer_events[layer])

    def wait_loads(self) -> None:
        if self._queued:
            self.start_loads()
        if not self._layer_events:
            return
        last = self._layer_events[-1]
        self.ops.current_waits_event(last)  # also covers layers nobody waited for
        if self._reads_pool:
            last.synchronize()  # the copies read leased pool memory: finish before release
            self._reads_pool = False
        self._layer_events = []

    def save(self, block_ids: Sequence[int]) -> PendingSave:
        (pending,) = self.save_chunks([block_ids])
        if pending is None:
            raise LMShareError(f"no device memory left for saves ({self.max_save_bytes} bytes "
                               f"in flight)")
        return pending

    def save_chunks(self, chunks: Sequence[Sequence[int]]) -> list[PendingSave | None]:
        """Gather the chunks on the save stream into device memory (a few kernels for all of
        them), then let the compute stream go on once the gather has read the blocks: the
        device -> host copies happen later, in :meth:`DevicePendingSave.write_into`, while the
        next steps run. At most ``max_save_bytes`` of gathered chunks wait for their store;
        chunks beyond that are not saved (None)."""
        g, out = self.geometry, []
        by_count: dict[int, list[int]] = {}
        for position, block_ids in enumerate(chunks):
            by_count.setdefault(len(block_ids), []).append(position)
        results: list[PendingSave | None] = [None] * len(chunks)
        self.ops.stream_waits_current(self.save_stream)  # the forward that wrote the KV
        with self.ops.use(self.save_stream):
            for count, positions in by_count.items():
                nbytes = g.chunk_nbytes(count)
                taken = self._reserve_save_bytes(nbytes, len(positions))
                positions = positions[:taken]
                if not positions:
                    continue
                index = torch.tensor([list(chunks[p]) for p in positions], dtype=torch.int64)
                device_index = index.to(self.blocks.device, non_blocking=True)
                gathered = torch.empty((len(positions), g.num_layers, count, g.page_bytes),
                                       dtype=torch.uint8, device=self.blocks.device)
                self.blocks.gather_chunks(device_index, gathered)
                out.append((positions, gathered.view(len(positions), -1), [index, device_index]))
        event = self.ops.record(self.save_stream)
        # The next kernels on the compute stream (which may overwrite these blocks) wait for
        # the gather only, not for any copy to the host.
        self.ops.current_waits_event(event)
        for positions, gathered, keep in out:
            for row, position in enumerate(positions):
                results[position] = DevicePendingSave(self, gathered[row])
            self._save_keep.append((event, keep))
        self._save_keep = [(e, k) for e, k in self._save_keep if not e.query()]
        return results

    def copies_issued(self) -> int:
        """A ticket for the device -> host copies issued so far on the save stream."""
        with self._save_lock:
            self._copies_issued += 1
            return self._copies_issued

    def wait_copies(self, ticket: int) -> None:
        """Wait until the copies up to ``ticket`` are done (one synchronization for many)."""
        with self._save_lock:
            if ticket <= self._copies_done:
                return
            issued = self._copies_issued
        self.ops.record(self.save_stream).synchronize()
        with self._save_lock:
            self._copies_done = max(self._copies_done, issued)

    def _reserve_save_bytes(self, nbytes: int, count: int) -> int:
        """How many of ``count`` chunks of ``nbytes`` fit under ``max_save_bytes``; counts
        them as in flight."""
        with self._save_lock:
            room = max(0, self.max_save_bytes - self._save_bytes) // max(1, nbytes)
            taken = min(count, room)
            self._save_bytes += taken * nbytes
            if taken < count:
                self.saves_dropped += count - taken
                if self.saves_dropped == count - taken or self.saves_dropped % 100 == 0:
                    log.warning("lmshare: %d bytes of saves wait for the worker; not saving %d "
                                "chunks (%d so far)", self._save_bytes, count - taken,
                                self.saves_dropped)
        return taken

    def _saved(self, nbytes: int) -> None:
        with self._save_lock:
            self._save_bytes -= nbytes

    def close(self) -> None:
        self.wait_loads()
        self._reclaim(wait=True)
        for address in list(self._registered):
            self.ops.host_unregister(address)
        self._registered.clear()


def make_copier(blocks: PagedBlocks) -> BlockCopier:
    """The copier for the KV's device: inline for CPU, pinned + streams for CUDA."""
    if blocks.device.type == "cpu":
        return CpuBlockCopier(blocks)
    if blocks.device.type == "cuda":  # pragma: no cover - needs a GPU
        return AsyncDeviceCopier(blocks, CudaStreamOps(blocks.device))
    raise ConfigError(f"lmshare cannot copy KV on device type {blocks.device.type!r} yet "
                      f"(cpu and cuda are supported)")
