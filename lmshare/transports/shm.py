"""Same-host shared-memory data path: copy chunks straight out of a peer's pool region.

The reader asks the holder (over the holder's local IPC endpoint) to *locate* the chunks: the
holder pins them under a short lease and returns their slabs and slab generations. The reader
copies from the holder's region, mapped read-only, into its own buffers — no socket carries the
bytes — then re-reads the slab generations: if any changed (the lease expired and the slab was
reused), the copy is discarded and the hit stops there. So no torn or foreign bytes are ever
returned, even from a reader that stalls past its lease.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from lmshare.control import RpcClient
from lmshare.errors import LMShareError
from lmshare.pool import PoolExport, slab_views
from lmshare.protocol import READ_LEASE_S
from lmshare.shm import SharedRegion
from lmshare.transports.base import ChunkSink, PeerInfo, Transport

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


class _PeerEndpoint(RpcClient):
    what = "same-host peer worker"


class ShmTransport(Transport):
    """Fetches from workers on this host by reading their shared-memory pools."""

    name = "shm"

    def __init__(self, lease_s: float = READ_LEASE_S, runtime: Path | None = None) -> None:
        self.lease_s = lease_s
        # same-host peers are reached only through sockets in this private directory
        self._runtime = Path(runtime) if runtime is not None else None
        self._regions = PeerRegions()  # the peers' pools, as each peer names its own
        self._lock = threading.Lock()
        # one connection per holder, shared by all threads (the holder binds the leases it
        # grants to the connection that asked, so the release must come on the same one)
        self._clients: dict[str, tuple[RpcClient, threading.Lock]] = {}

    def _endpoint(self, peer: PeerInfo) -> tuple[RpcClient, threading.Lock]:
        endpoint = str(peer.extra["endpoint"])
        with self._lock:
            found = self._clients.get(endpoint)
        if found is None:
            from lmshare.client import runtime_dir  # (client imports this module)

            runtime = Path(os.path.abspath(self._runtime or runtime_dir()))
            path = Path(endpoint[len("ipc://"):]) if endpoint.startswith("ipc://") else None
            if path is None or ".." in path.parts or \
                    Path(os.path.abspath(path.parent)) != runtime:
                raise LMShareError(f"same-host peer {peer.worker_id!r} names the endpoint "
                                   f"{endpoint!r}, which is not in this host's runtime "
                                   f"directory {runtime}; not reading from it")
            with self._lock:
                found = self._clients.setdefault(endpoint,
                                                 (_PeerEndpoint(endpoint), threading.Lock()))
        return found

    def fetch(self, peer: PeerInfo, keys: list[bytes], sink: ChunkSink, deadline: float,
              checksum: bool = False) -> int:
        if not keys:
            return 0
        try:
            reply, release = self.locate(peer, keys, self.lease_s, deadline)
        except TimeoutError:  # the deadline passed before the fetch began
            return 0
        except (LMShareError, OSError, KeyError) as exc:
            log.warning("same-host fetch from %s failed: %s", peer.worker_id, exc)
            return 0
        try:
            # the pool as the holder itself names it, never as its registration says
            region = self._regions.get(peer.worker_id, PoolExport.from_wire(reply["region"]))
        except (LMShareError, OSError, KeyError, TypeError, ValueError) as exc:
            release()
            log.warning("same-host fetch from %s failed: %s", peer.worker_id, exc)
            return 0
        delivered = 0
        try:
            for key, (slabs, nbytes), generations in zip(keys, reply["chunks"], reply["gens"]):
                if time.monotonic() > deadline:
                    break
                buffers = sink.begin(key, nbytes)
                if buffers is None:
                    break
                ok = False
                try:
                    ok = region.read_checked(slabs, generations, nbytes, buffers)
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

    def locate(self, peer: PeerInfo, keys: list[bytes], lease_s: float,
               deadline: float) -> tuple[dict, Callable[[], None]]:
        """Pin the prefix of ``keys`` the same-host ``peer`` holds, under a lease, for a reader
        of the peer's region (this transport's fetch, or a local client reading in place): the
        peer's answer (slabs, generations, the region they are in) and a function that ends the
        lease (if that fails, the lease expires on its own). Raises TimeoutError when the
        deadline has passed, LMShareError/OSError when the peer is gone."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed before locating chunks")
        endpoint, lock = self._endpoint(peer)
        if not lock.acquire(timeout=left):
            raise TimeoutError("deadline passed waiting for the connection to the holder")
        try:
            reply = endpoint.call("locate", timeout_s=max(0.001, deadline - time.monotonic()),
                                  keys=list(keys), lease_s=lease_s)
        finally:
            lock.release()
        handle = reply.get("handle")

        def release() -> None:
            # on the connection that located (the holder checks), and answered: a message
            # sent without waiting could be dropped
            if handle:
                try:
                    with lock:
                        endpoint.call("release", timeout_s=1.0, handle=handle)
                except LMShareError as exc:
                    log.debug("lease %d on %s ends on its own: %s", handle, peer.worker_id, exc)

        return reply, release

    def close(self) -> None:
        self._regions.close()
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client, lock in clients:
            with lock:
                client.close()
