"""Copies between chunk bytes and paged KV blocks (CPU tensors; the device copier's host-side
logic runs with InlineStreamOps)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from lmshare.errors import ConfigError  # noqa: E402
from lmshare.integrations.kv_copy import (  # noqa: E402
    AsyncDeviceCopier,
    ChunkSizeError,
    CpuBlockCopier,
    InlineStreamOps,
    KVGeometry,
    LayoutError,
    PagedBlocks,
    make_copier,
)
from lmshare.testing.fake_vllm import (  # noqa: E402
    BLOCKS,
    LAYERS,
    PAGE,
    block_bytes,
    fake_config,
    fake_kv_caches,
)


@pytest.fixture(params=[(True, False), (False, False), (True, True), (False, True)],
                ids=["layer-outermost", "block-outermost", "vllm-0.26-per-layer",
                     "vllm-0.26-packed"])
def setup(request):
    layer_outermost, vllm_026 = request.param
    config = fake_config(layer_outermost=layer_outermost, vllm_026=vllm_026)
    geometry = KVGeometry.from_kv_cache_config(config)
    caches = fake_kv_caches(config)
    return geometry, caches, PagedBlocks.from_kv_caches(geometry, caches), config


def test_geometry():
    geometry = KVGeometry.from_kv_cache_config(fake_config())
    assert geometry.num_layers == LAYERS and geometry.page_bytes == PAGE
    assert geometry.chunk_nbytes(8) == LAYERS * 8 * PAGE
    with pytest.raises(ConfigError, match="one KV cache group"):
        KVGeometry.from_kv_cache_config(fake_config(groups=2))


def test_gather_is_layer_major_whole_pages(setup):
    geometry, caches, blocks, config = setup
    out = blocks.gather([5, 2])
    assert tuple(out.shape) == (LAYERS, 2, PAGE)
    for layer in range(LAYERS):
        assert out[layer, 0].numpy().tobytes() == block_bytes(caches, layer, 5)
        assert out[layer, 1].numpy().tobytes() == block_bytes(caches, layer, 2)


@pytest.mark.parametrize("split", [None, [1], [PAGE // 3, PAGE * 2 + 7]])
def test_cpu_roundtrip_between_engines(setup, split):
    geometry, caches, blocks, config = setup
    src_ids = [3, 9, 4, 1]
    data = CpuBlockCopier(blocks).save(src_ids).wait().tobytes()
    assert len(data) == geometry.chunk_nbytes(4)
    other = fake_kv_caches(config, seed=7)
    before = {b: block_bytes(other, 0, b) for b in range(BLOCKS)}
    copier = CpuBlockCopier(PagedBlocks.from_kv_caches(geometry, other))
    segments = [memoryview(data)] if split is None else \
        [memoryview(data)[a:b] for a, b in zip([0, *split], [*split, len(data)])]
    dst_ids = [10, 11, 0, 15]
    copier.load(segments, 0, dst_ids)
    for layer in range(LAYERS):
        for s, d in zip(src_ids, dst_ids):
            assert block_bytes(other, layer, d) == block_bytes(caches, layer, s)
    for b in set(range(BLOCKS)) - set(dst_ids):
        assert block_bytes(other, 0, b) == before[b]


def test_partial_load_and_bad_sizes(setup):
    geometry, caches, blocks, config = setup
    copier = CpuBlockCopier(blocks)
    data = copier.save([1, 2, 3, 4]).wait().tobytes()
    copier.load([data], 1, [12, 13])  # blocks 1..2 of the chunk
    for layer in range(LAYERS):
        assert block_bytes(caches, layer, 12) == block_bytes(caches, layer, 2)
        assert block_bytes(caches, layer, 13) == block_bytes(caches, layer, 3)
    with pytest.raises(ChunkSizeError):
        copier.load([data[:-1]], 0, [5])
    with pytest.raises(ChunkSizeError):
        copier.load([data], 3, [5, 6])


def test_layout_mismatch_is_refused():
    config = fake_config()
    geometry = KVGeometry.from_kv_cache_config(config)
    caches = fake_kv_caches(config)
    name = next(iter(caches))
    caches[name] = caches[name].clone()  # not a view of the shared allocation
    with pytest.raises(LayoutError):
        PagedBlocks.from_kv_caches(geometry, caches)
    shifted = fake_kv_caches(config)
    last = list(shifted)[-1]
    shifted[last] = list(shifted.values())[0]
    with pytest.raises(LayoutError):
        PagedBlocks.from_kv_caches(geometry, shifted)


def test_make_copier_cpu(setup):
    assert isinstance(make_copier(setup[2]), CpuBlockCopier)


def test_device_copier_host_logic(setup):
    """The pinned-staging + stream copier, run with CPU tensors and inline stream ops."""
    geometry, caches, blocks, config = setup
    copier = AsyncDeviceCopier(blocks, InlineStreamOps())
    pending = copier.save([6, 7])
    data = pending.wait().tobytes()
    assert data == CpuBlockCopier(blocks).save([6, 7]).wait().tobytes()
    pending.release()
    for _ in range(3):
        copier.load([memoryview(data)[:100], memoryview(data)[100:]], 0, [14, 15])
        copier.start_loads()
    for layer in range(LAYERS):
        assert block_bytes(caches, layer, 14) == block_bytes(caches, layer, 6)
    copier.close()
    assert copier.loads_unregistered == 3 and copier.loads_registered == 0
    with pytest.raises(ChunkSizeError):
        copier.load([data[:PAGE]], 0, [1])


def test_device_saves_go_straight_into_the_pool_and_are_bounded(setup):
    """The device copier gathers a step's chunks at once and writes each one into the
    destination slabs (the worker pool) itself; chunks beyond its save budget are skipped,
    and the budget comes back once a save is released."""
    geometry, caches, blocks, config = setup
    chunk = geometry.chunk_nbytes(2)
    copier = AsyncDeviceCopier(blocks, InlineStreamOps(), max_save_bytes=2 * chunk)
    wanted = [[6, 7], [1, 0], [9, 3]]
    pendings = copier.save_chunks(wanted)
    assert pendings[2] is None and copier.saves_dropped == 1
    reference = CpuBlockCopier(blocks)
    for pending, ids in zip(pendings[:2], wanted):
        pool = bytearray(chunk + 64)
        slabs = [memoryview(pool)[64 : 64 + 100], memoryview(pool)[64 + 100 : 64 + chunk]]
        pending.write_into(slabs)
        pending.written()
        assert bytes(pool[64:]) == reference.save(ids).wait().tobytes()
        pending.release()
    (again,) = copier.save_chunks([wanted[2]])
    assert again is not None and again.wait().tobytes() == reference.save(wanted[2]).wait().tobytes()
    again.release()
    copier.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layer_outermost", [True, False])
def test_cuda_copier_roundtrip(layer_outermost):
    """The pinned-staging + side-stream copier on a real GPU."""
    config = fake_config(layer_outermost=layer_outermost)
    geometry = KVGeometry.from_kv_cache_config(config)
    host = fake_kv_caches(config, seed=3)
    gpu = fake_kv_caches(config, seed=3, device="cuda")
    copier = make_copier(PagedBlocks.from_kv_caches(geometry, gpu))
    assert isinstance(copier, AsyncDeviceCopier)
    pending = copier.save([3, 9, 4])
    data = pending.wait().tobytes()
    pending.release()
    assert data == CpuBlockCopier(PagedBlocks.from_kv_caches(geometry, host)).save(
        [3, 9, 4]).wait().tobytes()
    half = len(data) // 2
    for _ in range(2):
        copier.load([memoryview(data)[:half], memoryview(data)[half:]], 1, [20, 21])
        copier.start_loads()
    copier.wait_loads()  # the compute (current) stream now waits for the copies
    torch.cuda.current_stream().synchronize()
    for layer in range(LAYERS):
        assert block_bytes(gpu, layer, 20) == block_bytes(host, layer, 9)
        assert block_bytes(gpu, layer, 21) == block_bytes(host, layer, 4)
        assert block_bytes(gpu, layer, 22) == block_bytes(host, layer, 22)  # untouched
    copier.close()


def _pool_with(data: bytes, offset: int = 4096) -> tuple[bytearray, list[memoryview]]:
    """A stand-in for the worker pool: ``data`` placed at ``offset`` in a larger buffer, and
    slab-sized views of it."""
    pool = bytearray(offset + len(data) + 4096)
    pool[offset : offset + len(data)] = data
    view = memoryview(pool)[offset : offset + len(data)]
    slab = len(data) // 3 + 1
    return pool, [view[i : i + slab] for i in range(0, len(data), slab)]


def test_device_copier_reads_registered_pool_directly(setup):
    geometry, caches, blocks, config = setup
    data = CpuBlockCopier(blocks).save([2, 3]).wait().tobytes()
    copier = AsyncDeviceCopier(blocks, InlineStreamOps(register=True))
    pool, segments = _pool_with(data)
    assert copier.register_host(pool)
    copier.load(segments, 0, [40, 41])
    copier.start_loads()
    assert copier.loads_registered == 1  # straight from the registered pool
    assert block_bytes(caches, 1, 41) == block_bytes(caches, 1, 3)
    copier.load([memoryview(bytes(data))], 0, [42, 43])  # outside the pool
    assert copier.loads_unregistered == 1
    copier.start_loads()
    copier.wait_loads()
    assert block_bytes(caches, 2, 42) == block_bytes(caches, 2, 2)
    copier.unregister_host(pool)
    copier.close()


def _cuda_copier_and_chunk(seed: int, blocks: list[int]):
    """(GPU caches, host caches with the same content, a CUDA copier, the chunk of ``blocks``
    saved from the host caches)."""
    config = fake_config()
    geometry = KVGeometry.from_kv_cache_config(config)
    host = fake_kv_caches(config, seed=seed)
    gpu = fake_kv_caches(config, seed=seed, device="cuda")
    copier = make_copier(PagedBlocks.from_kv_caches(geometry, gpu))
    data = CpuBlockCopier(PagedBlocks.from_kv_caches(geometry, host)).save(blocks).wait()
    return gpu, host, copier, data


def _shm_mapping(tmp_path, data, offset: int, read_only: bool):
    """Like a worker pool: a file in /dev/shm (tmpfs; disk-backed files cannot be registered)
    holding ``data`` at ``offset``, mapped shared (read-only like a peer's pool, or not)."""
    import mmap

    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    path = shm / f"lmshare-test-{os.getpid()}-{int(read_only)}"
    size = 1 << 22
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(offset)
        f.write(data)
    with open(path, "rb" if read_only else "r+b") as f:
        region = mmap.mmap(f.fileno(), size, mmap.MAP_SHARED,
                           mmap.PROT_READ if read_only else mmap.PROT_READ | mmap.PROT_WRITE)
    path.unlink()
    return region


def _finish_and_check(copier, gpu, host, loaded: dict[int, int]) -> None:
    """Start and finish the queued loads; GPU block ``dst`` must equal host block ``src`` for
    each ``dst: src`` of ``loaded``, every chunk read straight from the page-locked mapping."""
    copier.start_loads()
    copier.wait_loads()  # the compute (current) stream now waits for the copies
    torch.cuda.current_stream().synchronize()
    assert copier.loads_unregistered == 0
    for layer in range(LAYERS):
        for dst, src in loaded.items():
            assert block_bytes(gpu, layer, dst) == block_bytes(host, layer, src)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_copier_loads_from_registered_shared_memory(tmp_path):
    gpu, host, copier, data = _cuda_copier_and_chunk(5, [7, 8])
    region = _shm_mapping(tmp_path, data, 8192, read_only=False)
    buffer = memoryview(region)
    assert copier.register_host(buffer)
    view = buffer[8192 : 8192 + len(data)].toreadonly()
    copier.load([view[: len(data) // 2], view[len(data) // 2 :]], 0, [30, 31])
    assert len(copier._registered_runs([view[:100], view[100:]])) == 1  # adjacent: one copy
    _finish_and_check(copier, gpu, host, {30: 7, 31: 8})
    copier.unregister_host(buffer)
    copier.close()
    del view, buffer
    region.close()


def test_cpu_copier_reads_adjacent_slabs_in_place(setup):
    geometry, caches, blocks, config = setup
    data = CpuBlockCopier(blocks).save([5, 6]).wait().tobytes()
    copier = CpuBlockCopier(blocks)
    pool, segments = _pool_with(data)
    assert copier.register_host(pool)
    copier.load(segments, 0, [50, 51])
    assert copier._staging is None  # read in place: no staging copy
    assert block_bytes(caches, 0, 51) == block_bytes(caches, 0, 6)
    scattered = [memoryview(bytes(s)) for s in segments]  # not in the pool: staged
    copier.load(scattered, 0, [52, 53])
    assert copier._staging is not None
    assert block_bytes(caches, 2, 52) == block_bytes(caches, 2, 5)
    copier.unregister_host(pool)
    copier.close()


class _RecordingOps(InlineStreamOps):
    """Inline stream ops that remember, for every recorded event, the bytes of the destination
    blocks at that moment, and which events the compute stream waited for."""

    def __init__(self, caches, blocks: list[int]) -> None:
        super().__init__(register=True)
        self.caches, self.blocks = caches, blocks
        self.snapshots: list[list[list[bytes]]] = []  # per event: per layer: per block
        self.waited: list[int] = []

    def record(self, stream):
        self.snapshots.append([[block_bytes(self.caches, layer, b) for b in self.blocks]
                               for layer in range(LAYERS)])
        ops = self

        class Event:
            number = len(self.snapshots) - 1

            def synchronize(self) -> None:
                pass

            def query(self) -> bool:
                return True

            def wait(self) -> None:
                ops.waited.append(self.number)

        return Event()

    def current_waits_event(self, event) -> None:
        event.wait()


@pytest.mark.parametrize("group", [1, 2, LAYERS], ids=lambda g: f"{g}-layers-a-copy")
def test_device_copier_loads_layer_by_layer(setup, group):
    """Loads are queued, then issued layer group by layer group with one event a layer: when
    layer i's event is recorded, layer i of every loaded block is in place and later layers are
    not yet; the compute stream waits for exactly the layer it asks for."""
    geometry, caches, blocks, config = setup
    source = CpuBlockCopier(blocks)
    first = source.save([2, 3]).wait().tobytes()  # chunk of 2 blocks
    second = source.save([7, 8]).wait().tobytes()
    destination = [60, 61, 62]
    ops = _RecordingOps(caches, destination)
    copier = AsyncDeviceCopier(blocks, ops, max_temp_bytes=group * 3 * PAGE)  # 3 rows
    pool, segments = _pool_with(first)
    assert copier.register_host(pool)  # the first chunk is read in place, split in slabs
    before = [[block_bytes(caches, layer, b) for b in destination] for layer in range(LAYERS)]
    copier.load(segments, 0, [60, 61])
    copier.load([memoryview(second)], 1, [62])  # only the chunk's second block
    assert ops.snapshots == [] and block_bytes(caches, 0, 60) == before[0][0]  # queued
    copier.start_loads()
    expected = [[block_bytes(caches, layer, b) for b in (2, 3, 8)] for layer in range(LAYERS)]
    assert len(ops.snapshots) == LAYERS
    for event, snapshot in enumerate(ops.snapshots):
        for layer in range(LAYERS):
            assert snapshot[layer] == (expected[layer] if layer <= event else before[layer])
    copier.wait_layer(2)
    assert ops.waited == [2]
    copier.wait_loads()  # the compute stream also waits for the last layer
    assert ops.waited == [2, LAYERS - 1]
    copier.wait_layer(0)  # nothing in flight any more
    assert ops.waited == [2, LAYERS - 1]
    copier.unregister_host(pool)
    copier.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_copier_loads_from_a_read_only_peer_mapping(tmp_path):
    """A same-host peer's pool is mapped read-only: it is page-locked with
    cudaHostRegisterReadOnly and loads DMA from it directly."""
    gpu, host, copier, data = _cuda_copier_and_chunk(6, [4, 9])
    region = _shm_mapping(tmp_path, data, 4096, read_only=True)
    buffer = memoryview(region)
    assert copier.register_host(buffer, read_only=True)
    view = buffer[4096 : 4096 + len(data)]
    copier.load([view], 0, [33, 34])
    _finish_and_check(copier, gpu, host, {33: 4, 34: 9})
    copier.unregister_host(buffer)
    copier.close()
    del view, buffer
    region.close()
