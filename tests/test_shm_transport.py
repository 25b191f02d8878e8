"""Same-host shared-memory reads: copy correctness and the seqlock against slab reuse."""

import hashlib
import random
import threading
import time

from hypothesis import given
from hypothesis import strategies as st

from lmshare.errors import PoolFullError
from lmshare.pool import KVPool
from lmshare.transports.shm import PeerRegion, copy_views

NS = b"n" * 16
SLAB = 4096


def k(i: int) -> bytes:
    return hashlib.blake2b(str(i).encode(), digest_size=16).digest()


def payload(i: int, version: int, size: int) -> bytes:
    block = hashlib.blake2b(f"{i}/{version}".encode(), digest_size=32).digest()
    return (block * (size // 32 + 1))[:size]


def split(data: bytearray, cuts: list[int]) -> list[memoryview]:
    view = memoryview(data)
    edges = sorted({0, len(data), *[c % (len(data) + 1) for c in cuts]})
    return [view[a:b] for a, b in zip(edges, edges[1:])]


@given(st.binary(min_size=1, max_size=500), st.lists(st.integers(0, 500), max_size=6),
       st.lists(st.integers(0, 500), max_size=6))
def test_copy_between_any_two_segmentations(data, source_cuts, destination_cuts):
    destination = bytearray(len(data))
    copy_views(split(bytearray(data), source_cuts), split(destination, destination_cuts))
    assert bytes(destination) == data


def test_readers_never_accept_reused_slabs(shm_dir):
    """The owner evicts and rewrites slabs nonstop; readers copy through a read-only mapping with
    no pin held during the copy (the worst case: a lease that already expired). Every copy that
    passes the generation check must hold exactly the bytes of the entry located."""
    owner = KVPool(24 * SLAB, SLAB, name="owner")
    region = PeerRegion(owner.export())
    # run until enough reads went through and a reuse was caught (counts, not a time box: a
    # loaded machine gets there later); the deadline only bounds a broken run
    deadline = time.monotonic() + 120.0
    done = threading.Event()
    versions: dict[int, int] = {}
    lock = threading.Lock()
    accepted = [0]
    rejected = [0]
    errors: list[str] = []

    def churn(seed: int) -> None:
        rnd = random.Random(seed)
        while not done.is_set():
            i = rnd.randrange(60)
            with lock:
                version = versions[i] = versions.get(i, 0) + 1
            owner.remove(k(i * 1000 + version - 1))  # retire the previous version
            try:
                owner.put(NS, k(i * 1000 + version), payload(i, version, 3 * SLAB - 7))
            except PoolFullError:
                pass

    def read(seed: int) -> None:
        rnd = random.Random(seed)
        destination = bytearray(3 * SLAB - 7)
        while not done.is_set():
            if (accepted[0] >= 200 and rejected[0] >= 1) or time.monotonic() > deadline:
                done.set()
            i = rnd.randrange(60)
            version = versions.get(i, 0)
            entry = owner.pin(k(i * 1000 + version))
            if entry is None:
                continue
            slabs, nbytes = list(entry.slabs), entry.nbytes
            generations = owner.generations(slabs)
            owner.unpin(entry)  # the lease is gone before the copy even starts
            time.sleep(rnd.random() * 0.001)
            if region.read_checked(slabs, generations, nbytes, [memoryview(destination)]):
                accepted[0] += 1
                if bytes(destination) != payload(i, version, nbytes):
                    errors.append(f"accepted torn or foreign bytes for {i}/{version}")
            else:
                rejected[0] += 1

    threads = [threading.Thread(target=churn, args=(s,)) for s in range(2)]
    threads += [threading.Thread(target=read, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    region.close()
    owner.close()
    assert not errors
    assert accepted[0] >= 200  # reads go through
    assert rejected[0] > 0  # and reuse during a read really happened and was caught


def test_a_direct_hit_detects_reused_slabs(shm_dir):
    """A Hit that points into a same-host peer's pool verifies, after the read, that the
    peer's slabs still hold the chunk that was located."""
    from lmshare.client import ChunkRef, Hit

    owner = KVPool(8 * SLAB, SLAB, name="direct-owner")
    owner.put(NS, k(1), payload(1, 1, 2 * SLAB + 3))
    entry = owner.pin(k(1))
    slabs, nbytes = list(entry.slabs), entry.nbytes
    generations = owner.generations(slabs)
    owner.unpin(entry)
    region = PeerRegion(owner.export())
    hit = Hit(None, 0, [ChunkRef(slabs, nbytes, 0, generations)], 0, 1, [region])
    assert b"".join(hit.views(0)) == payload(1, 1, nbytes) and hit.verify(0)
    assert hit.region_buffer(0) is region.region.buffer
    owner.remove(k(1))  # evicted: its slabs go back to the free list with new generations
    owner.put(NS, k(2), payload(2, 1, 2 * SLAB + 3))  # and are reused
    assert not hit.verify(0)
    region.close()
    owner.close()
