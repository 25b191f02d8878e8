import hashlib
import os
import random
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lmshare.errors import ConfigError, EntryTooLarge, PoolFullError
from lmshare.pool import KVPool, slab_runs, slab_views

NS = b"n" * 16
SLAB = 1024


def key(i: int) -> bytes:
    return hashlib.blake2b(str(i).encode(), digest_size=16).digest()


def payload(i: int, size: int) -> bytes:
    """Bytes that name their key everywhere, so torn or foreign reads are detectable."""
    block = hashlib.blake2b(str(i).encode(), digest_size=32).digest()
    return (block * (size // 32 + 1))[:size]


@pytest.fixture
def pool(shm_dir):
    p = KVPool(64 * SLAB, SLAB, name="t")
    yield p
    p.close()


def test_reserved_entries_are_invisible_until_commit(pool):
    r = pool.reserve(NS, key(1), 3000)
    r.write(payload(1, 3000))
    assert not pool.contains(key(1)) and pool.read(key(1)) is None
    assert r.commit()
    assert pool.read(key(1)) == payload(1, 3000)
    assert len(r.slabs) == 3


def test_abort_returns_slabs_and_duplicate_commit_is_dropped(pool):
    before = pool.stats().slabs_free
    r = pool.reserve(NS, key(1), 5000)
    r.abort()
    assert pool.stats().slabs_free == before
    assert pool.put(NS, key(2), b"a" * 10)
    assert not pool.put(NS, key(2), b"b" * 10)  # first commit wins
    assert pool.read(key(2)) == b"a" * 10
    assert pool.stats().slabs_free == before - 1


def test_lru_evicts_oldest_and_never_a_pinned_entry(pool):
    for i in range(64):
        pool.put(NS, key(i), payload(i, SLAB))
    pinned = pool.pin(key(0))  # oldest, but pinned
    pool.pin(key(1)) and pool.unpin(pool.pin(key(1)))  # touch 1: now recent
    pool.put(NS, key(100), payload(100, SLAB))
    assert pool.contains(key(0)) and pool.contains(key(1))
    assert not pool.contains(key(2))  # the least recently used unpinned entry
    pool.unpin(pinned)
    pool.unpin(pool.pin(key(1)))


def test_full_of_pinned_entries_is_a_clear_error(pool):
    pins = []
    for i in range(64):
        pool.put(NS, key(i), payload(i, SLAB))
        pins.append(pool.pin(key(i)))
    with pytest.raises(PoolFullError, match="pinned"):
        pool.reserve(NS, key(999), 10)
    with pytest.raises(EntryTooLarge, match="--cache-size"):
        pool.reserve(NS, key(998), 65 * SLAB)
    for p in pins:
        pool.unpin(p)
    assert pool.stats().slabs_free == 0 and pool.stats().pinned_entries == 0


def test_bad_sizes(shm_dir):
    with pytest.raises(ConfigError, match="smaller than one slab"):
        KVPool(100, SLAB)


def test_many_threads_reading_writing_evicting(shm_dir):
    """No torn read, exact byte accounting, no leaked slab, under heavy churn."""
    pool = KVPool(48 * SLAB, SLAB, name="churn")
    errors: list[str] = []
    reads = [0]
    stop = time.monotonic() + 3.0
    sizes = {i: random.Random(i).randint(1, 4 * SLAB) for i in range(200)}

    def writer(seed: int) -> None:
        rnd = random.Random(seed)
        while time.monotonic() < stop:
            i = rnd.randrange(200)
            try:
                reservation = pool.reserve(NS, key(i), sizes[i])
            except PoolFullError:
                continue
            data = payload(i, sizes[i])
            buffers = reservation.buffers()
            offset = 0
            for view in buffers:  # fill slowly, slab by slab, to widen race windows
                view[:] = data[offset: offset + view.nbytes]
                offset += view.nbytes
                time.sleep(0)
            if rnd.random() < 0.1:
                reservation.abort()
            else:
                reservation.commit()

    def reader(seed: int) -> None:
        rnd = random.Random(seed)
        while time.monotonic() < stop:
            i = rnd.randrange(200)
            entry = pool.pin(key(i))
            if entry is None:
                continue
            try:
                first = b"".join(pool.views(entry))
                time.sleep(0)
                second = b"".join(pool.views(entry))
            finally:
                pool.unpin(entry)
            if first != payload(i, sizes[i]) or second != first:
                errors.append(f"torn or foreign read of {i}")
            reads[0] += 1

    def evictor() -> None:
        rnd = random.Random(7)
        while time.monotonic() < stop:
            pool.remove(key(rnd.randrange(200)))

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(4)]
    threads += [threading.Thread(target=reader, args=(s,)) for s in range(4)]
    threads.append(threading.Thread(target=evictor))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert reads[0] > 100
    stats = pool.stats()
    entries = pool.entries_by_namespace().get(NS, [])
    assert stats.entries == len(entries)
    assert stats.used_bytes == sum(sizes[i] for i in range(200) if key(i) in set(entries))
    slabs_in_entries = sum(pool.slabs_for(sizes[i]) for i in range(200) if key(i) in set(entries))
    assert stats.slabs_free + slabs_in_entries == stats.slabs_total  # no leak
    assert stats.reserved_bytes == 0 and stats.pinned_entries == 0
    assert stats.admits - stats.evictions == stats.entries
    pool.close()


class PoolMachine(RuleBasedStateMachine):
    """Property test: the pool agrees with a model dictionary, and slabs are conserved."""

    def __init__(self):
        super().__init__()
        self.pool = KVPool(16 * 64, 64, name=f"sm-{os.getpid()}-{id(self)}")
        self.model: dict[int, bytes] = {}
        self.pins = []

    @rule(i=st.integers(0, 30), size=st.integers(0, 200))
    def put(self, i, size):
        data = payload(i, size)
        try:
            added = self.pool.put(NS, key(i), data)
        except PoolFullError:
            assert all(e.pins for e in self.pins) and self.pins
            return
        if added:
            self.model[i] = data
        # entries the pool evicted leave the model
        for j in list(self.model):
            if not self.pool.contains(key(j)):
                del self.model[j]

    @rule(i=st.integers(0, 30))
    def pin(self, i):
        entry = self.pool.pin(key(i))
        assert (entry is not None) == (i in self.model)
        if entry is not None:
            self.pins.append(entry)

    @precondition(lambda self: self.pins)
    @rule()
    def unpin(self):
        self.pool.unpin(self.pins.pop())

    @invariant()
    def pinned_entries_survive_and_bytes_match(self):
        for entry in self.pins:
            assert self.pool.contains(entry.key)
        for i, data in self.model.items():
            assert self.pool.read(key(i)) == data
        stats = self.pool.stats()
        assert stats.used_bytes == sum(len(d) for d in self.model.values())
        used = sum(self.pool.slabs_for(len(d)) for d in self.model.values())
        assert stats.slabs_free + used == stats.slabs_total

    def teardown(self):
        for entry in self.pins:
            self.pool.unpin(entry)
        self.pool.close()


PoolMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=40, deadline=None)
test_pool_state_machine = PoolMachine.TestCase


def test_an_entry_written_after_an_eviction_gets_adjacent_slabs(pool):
    for i in range(16):
        pool.put(NS, key(i), payload(i, 4 * SLAB))  # 64 slabs: full
    pool.remove(key(3))
    r = pool.reserve(NS, key(99), 4 * SLAB)
    assert r.slabs == sorted(r.slabs) and r.slabs[-1] - r.slabs[0] == 3
    r.abort()


def test_views_are_one_per_run_of_adjacent_slabs(pool):
    pool.put(NS, key(1), payload(1, 3 * SLAB + 5))
    pool.put(NS, key(2), payload(2, 2 * SLAB))
    entry = pool.pin(key(1))
    views = pool.views(entry)
    assert [v.nbytes for v in views] == [3 * SLAB + 5]  # fresh pool: adjacent slabs, one view
    assert bytes(views[0]) == payload(1, 3 * SLAB + 5)
    pool.unpin(entry)
    from lmshare.pool import slab_views

    region = memoryview(bytearray(range(256)) * 4)  # 1 KiB, slabs of 100 bytes
    parts = slab_views(region, 100, [4, 5, 1, 2, 3, 9], 530)
    assert [v.nbytes for v in parts] == [200, 300, 30]
    assert b"".join(parts) == bytes(region[400:600]) + bytes(region[100:400]) + \
        bytes(region[900:930])


@given(st.lists(st.integers(0, 63), min_size=1, max_size=12, unique=True), st.data())
def test_slab_runs_cover_an_entry_in_order_for_every_reader(slabs, data):
    """One slab-run computation serves the pool's views and UCX's GET pieces: both cover
    exactly the entry's bytes, slab by slab, in entry order."""
    from lmshare.transports.ucx import _pieces

    slab = 16
    nbytes = data.draw(st.integers(1, len(slabs) * slab))
    region = bytes(range(256)) * 4  # 64 slabs of 16 bytes, each byte telling its offset
    expected = b"".join(region[s * slab:(s + 1) * slab] for s in slabs)[:nbytes]
    runs = slab_runs(slabs, slab, nbytes)
    assert sum(size for _, size in runs) == nbytes
    assert b"".join(slab_views(memoryview(region), slab, slabs, nbytes)) == expected
    destination = [memoryview(bytearray(n)) for n in _split(nbytes, data)]
    base = 1 << 20
    pieces = _pieces(slabs, slab, base, nbytes, destination)
    for view, address in pieces:
        view[:] = region[address - base:address - base + view.nbytes]
    assert b"".join(bytes(d) for d in destination) == expected


def _split(total: int, data) -> list[int]:
    cuts = sorted(data.draw(st.lists(st.integers(1, max(1, total - 1)), max_size=3,
                                     unique=True))) if total > 1 else []
    edges = [0, *cuts, total]
    return [b - a for a, b in zip(edges, edges[1:]) if b > a]
