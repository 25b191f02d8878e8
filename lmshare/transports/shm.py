"""Same-host shared-memory data path: copy chunks straight out of a peer's pool region.

The reader asks the holder (on the holder's data port, through the one-sided transports'
:class:`~lmshare.transports.locate.LocateChannel`) to *locate* the chunks: the holder pins them
under a short lease and returns their slabs, slab generations and the pool they lie in. The reader
copies from the holder's region, mapped read-only, into its own buffers — no socket carries the
bytes — then re-reads the slab generations: if any changed (the lease expired and the slab was
reused), the copy is discarded and the hit stops there. So no torn or foreign bytes are ever
returned, even from a reader that stalls past its lease.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from lmshare.errors import LMShareError
from lmshare.pool import PoolExport, slab_views
from lmshare.protocol import READ_LEASE_S
from lmshare.shm import SharedRegion
from lmshare.transports.base import ChunkSink, PeerInfo, Transport
from lmshare.transports.locate import LocateChannel

log = logging.getLogger(__name__)


class PeerRegion:
    """A same-host peer's pool region and generation table, mapped read-only."""

    def __init__(self, export: PoolExport) -> None:
        self.export = export
        self.slab_bytes = export.slab_bytes
        self.region = SharedRegion.attach(export.path, export.nbytes, writable=False)
        self.generation_region = SharedRegion.attach(export.generation_path,
                                                     export.num_slabs * 8, writable=False)
        self.generations = self.generation_region.buffer.cast("Q")

    def slab_views(self, slabs: list[int], nbytes: int) -> list[memoryview]:
        return slab_views(self.region.buffer, self.slab_bytes, slabs, nbytes)

    def read_checked(self, slabs: list[int], generations: list[int], nbytes: int,
                     destination: list[memoryview]) -> bool:
        """Copy an entry into ``destination``; True only if no slab changed generation."""
        if [self.generations[s] for s in slabs] != generations:
            return False
        copy_views(self.slab_views(slabs, nbytes), destination)
        return [self.generations[s] for s in slabs] == generations

    def close(self) -> None:
        self.generations.release()
        self.region.close()
        self.generation_region.close()


def copy_views(source: list[memoryview], destination: list[memoryview]) -> None:
    """Copy a list of buffers into another list of buffers of the same total size."""
    si = di = s_off = d_off = 0
    while si < len(source) and di < len(destination):
        src, dst = source[si], destination[di]
        count = min(src.nbytes - s_off, dst.nbytes - d_off)
        dst[d_off : d_off + count] = src[s_off : s_off + count]
        s_off += count
        d_off += count
        if s_off == src.nbytes:
            si, s_off = si + 1, 0
        if d_off == dst.nbytes:
            di, d_off = di + 1, 0


class PeerRegions:
    """Same-host peers' pools, each mapped once (read-only) and shared by all threads. A peer
    that restarted names a new pool: its old mapping is dropped (it goes once nothing reading
    it holds a view) and ``on_unmap``, if set, is called with its buffer first."""

    def __init__(self) -> None:
        self._regions: dict[str, PeerRegion] = {}  # pool path -> its mapping
        self._paths: dict[str, str] = {}  # peer worker -> the path of its pool mapped
        self._lock = threading.Lock()
        self.on_unmap: Callable[[memoryview], None] | None = None

    def get(self, worker: str, export: PoolExport) -> PeerRegion:
        """The mapping of ``worker``'s pool as ``export`` (from the worker itself) names it."""
        stale = None
        with self._lock:
            old_path = self._paths.get(worker)
            if old_path is not None and old_path != export.path:
                stale = self._regions.pop(old_path, None)
            self._paths[worker] = export.path
            region = self._regions.get(export.path)
            if region is None:
                region = self._regions[export.path] = PeerRegion(export)
        if stale is not None and self.on_unmap is not None:
            self.on_unmap(stale.region.buffer)
        return region

    def path_of(self, worker: str) -> str | None:
        """The path of ``worker``'s pool as mapped now (None: none is)."""
        with self._lock:
            return self._paths.get(worker)

    def close(self) -> None:
        """Unmap every pool (one still viewed somewhere goes with its last view)."""
        with self._lock:
            regions, self._regions, self._paths = list(self._regions.values()), {}, {}
        for region in regions:
            try:
                region.close()
            except BufferError:
                log.debug("a peer region is still in use")


class ShmTransport(Transport):
    """Fetches from workers on this host by reading their shared-memory pools."""

    name = "shm"

    def __init__(self, channel: LocateChannel, lease_s: float = READ_LEASE_S) -> None:
        self.lease_s = lease_s
        self._channel = channel  # locate/release on the holders' data ports
        self._regions = PeerRegions()  # the peers' pools, as each peer names its own

    def fetch(self, peer: PeerInfo, keys: list[bytes], sink: ChunkSink, deadline: float,
              checksum: bool = False) -> int:
        if not keys:
            return 0
        try:
            located, release = self._channel.locate(peer, keys, self.lease_s, deadline,
                                                    maps=True)
        except TimeoutError:  # the deadline passed before the fetch began
            return 0
        except (LMShareError, OSError) as exc:
            log.warning("same-host fetch from %s failed: %s", peer.worker_id, exc)
            return 0
        try:
            # the pool as the holder itself names it, never as its registration says
            region = self._regions.get(peer.worker_id, located.region)
        except (LMShareError, OSError) as exc:
            release()
            log.warning("same-host fetch from %s failed: %s", peer.worker_id, exc)
            return 0
        delivered = 0
        try:
            for key, chunk in zip(keys, located.chunks):
                if time.monotonic() > deadline:
                    break
                buffers = sink.begin(key, chunk.nbytes)
                if buffers is None:
                    break
                ok = False
                try:
                    ok = region.read_checked(chunk.slabs, chunk.generations, chunk.nbytes,
                                             buffers)
                finally:
                    sink.end(key, ok)
                if not ok:
                    log.warning("chunk of %s changed while being read; hit truncated",
                                peer.worker_id)
                    break
                delivered += 1
        finally:
            release()
        return delivered

    def close(self) -> None:
        self._regions.close()
