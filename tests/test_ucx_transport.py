"""UCX one-sided reads of a live pool (lmshare.transports.ucx) through the bundled libucp:
grouped GETs plus one generation check per group must never deliver torn or foreign bytes,
while the owner evicts and rewrites slabs nonstop."""

from __future__ import annotations

import hashlib
import random
import threading
import time

import pytest

from lmshare.errors import PoolFullError
from lmshare.pool import KVPool
from lmshare.transports.base import PeerInfo
from lmshare.transports.locate import Located, LocatedChunk
from lmshare.transports.ucp import ucx_available

pytestmark = pytest.mark.skipif(not ucx_available(),
                                reason="UCX (libucx from lmshare[ucx]) is not installed")

NS = b"u" * 16
SLAB = 4096
SIZE = 3 * SLAB - 7


def k(i: int, version: int) -> bytes:
    return hashlib.blake2b(f"{i}/{version}".encode(), digest_size=16).digest()


def payload(i: int, version: int) -> bytes:
    block = hashlib.blake2b(f"{i}/{version}".encode(), digest_size=32).digest()
    return (block * (SIZE // 32 + 1))[:SIZE]


class ExpiredLeaseLocator:
    """Stands in for the holder's locate on its data port, in the worst case: the entries'
    pins are gone before the reader's GETs start."""

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool

    def locate(self, peer, keys, lease_s, deadline, maps=False):
        chunks = []
        for key in keys:
            entry = self.pool.pin(key)
            if entry is None:
                break
            chunks.append(LocatedChunk(list(entry.slabs), entry.nbytes,
                                       self.pool.generations(entry.slabs)))
            self.pool.unpin(entry)
        return Located(0, chunks), lambda: None


class CollectingSink:
    def __init__(self) -> None:
        self.buffers: dict[bytes, bytearray] = {}
        self.accepted: list[bytes] = []

    def begin(self, key: bytes, nbytes: int):
        self.buffers[key] = bytearray(nbytes)
        data = memoryview(self.buffers[key])
        return [data[: nbytes // 2], data[nbytes // 2 :]]  # two destination pieces

    def end(self, key: bytes, ok: bool) -> None:
        if ok:
            self.accepted.append(key)


def test_grouped_gets_never_accept_reused_slabs(shm_dir, monkeypatch):
    from lmshare.transports import ucx

    monkeypatch.setattr(ucx, "GROUP_BYTES", 2 * SIZE)  # groups of two chunks
    owner = KVPool(40 * SLAB, SLAB, name="ucx-owner")
    export = ucx.UcxExport(owner.region.buffer, owner.generation_region.buffer)
    peer = PeerInfo("owner", "127.0.0.1", 0, "this-host", ("ucx",),
                    {"slab_bytes": SLAB, **export.registration()})
    reader = ucx.UcxTransport(ExpiredLeaseLocator(owner), host_id="this-host")
    versions = {i: 0 for i in range(40)}
    for i in versions:
        try:
            owner.put(NS, k(i, 0), payload(i, 0))
        except PoolFullError:
            pass
    stop = time.monotonic() + 3.0
    lock = threading.Lock()
    errors: list[str] = []
    counts = {"accepted": 0, "asked": 0}

    def churn() -> None:
        rnd = random.Random(1)
        while time.monotonic() < stop:
            i = rnd.randrange(40)
            with lock:
                old = versions[i]
                versions[i] = old + 1
            owner.remove(k(i, old))
            try:
                owner.put(NS, k(i, old + 1), payload(i, old + 1))
            except PoolFullError:
                pass
            time.sleep(0.0005)  # about a thousand rewrites a second, whatever the machine's load

    def read() -> None:
        rnd = random.Random(2)
        while time.monotonic() < stop:
            wanted = rnd.sample(range(40), 4)
            with lock:
                keys = {k(i, versions[i]): (i, versions[i]) for i in wanted}
            sink = CollectingSink()
            reader.fetch(peer, list(keys), sink, time.monotonic() + 5.0)
            counts["asked"] += len(keys)
            for key in sink.accepted:
                counts["accepted"] += 1
                if bytes(sink.buffers[key]) != payload(*keys[key]):
                    errors.append(f"accepted torn or foreign bytes for {keys[key]}")

    threads = [threading.Thread(target=churn), threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader.close()
    export.close()
    owner.close()
    assert not errors
    assert counts["accepted"] > 20  # reads go through, in groups
    assert counts["accepted"] < counts["asked"]  # and churn during reads was caught
