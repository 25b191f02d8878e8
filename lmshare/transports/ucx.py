"""UCX data path: one-sided GET from the holder's registered pool (RDMA where the NICs have it).

The holder registers its pool region and slab-generation table with UCX (:class:`UcxExport`)
and publishes, through the controller, its UCX worker address, the regions' remote keys and
base addresses. A reader (:class:`UcxTransport`) asks the holder on its data port, through the
one-sided transports' :class:`~lmshare.transports.locate.LocateChannel`, to *locate* the chunks
(pin under a lease; slabs and generations), GETs the slabs
straight into its own pool buffers, then GETs the slabs' generations again: if any changed, the
copy is discarded and the hit stops there (the seqlock described in docs/architecture.md).
Every GET has the fetch's deadline. The UCP C API binding lives in :mod:`lmshare.transports.ucp`.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time

from lmshare.errors import LMShareError
from lmshare.pool import slab_runs
from lmshare.protocol import READ_LEASE_S
from lmshare.transports.base import ChunkSink, PeerInfo, Transport
from lmshare.transports.locate import LocateChannel, Located
from lmshare.transports.ucp import RemoteEndpoint, UcpContext, UcpServer, ucx_available

log = logging.getLogger(__name__)


def rdma_hardware_present() -> bool:
    """True if this host has RDMA devices (InfiniBand / RoCE), where UCX beats a socket."""
    try:
        return bool(os.listdir("/sys/class/infiniband"))
    except OSError:
        return False


def ucx_worthwhile() -> bool:
    """Whether a worker should offer UCX by default: installed, and RDMA hardware present."""
    return ucx_available() and rdma_hardware_present()


class UcxExport:
    """The holder's side: its pool region and generation table, registered for remote GET, and
    a progress thread (needed where UCX emulates GET with messages, e.g. over tcp)."""

    def __init__(self, region: memoryview, generations: memoryview) -> None:
        self.context = UcpContext(wakeup=True, name="lmshare-serve")
        self._region = self.context.map(region)
        self._generations = self.context.map(generations)
        self._server = UcpServer(self.context).start()

    def registration(self) -> dict:
        """What peers need, published in the worker's registration."""
        return {"ucx_address": self.context.address,
                "ucx_rkey": self._region.pack_rkey(), "ucx_base": self._region.address,
                "ucx_gen_rkey": self._generations.pack_rkey(),
                "ucx_gen_base": self._generations.address}

    def close(self) -> None:
        self._server.stop()
        self.context.close()


GROUP_BYTES = 16 << 20  # GETs issued together before one generation check


def _pieces(slabs: list[int], slab_bytes: int, base: int, nbytes: int,
            destination: list[memoryview]) -> list[tuple[memoryview, int]]:
    """(destination piece, remote address) pairs covering an entry's slabs in order: one per
    run of adjacent slabs that lands in one destination buffer."""
    pieces = []
    di = d_off = 0
    for start, size in slab_runs(slabs, slab_bytes, nbytes):
        address, offset = base + start, 0
        while offset < size:
            dst = destination[di]
            count = min(size - offset, dst.nbytes - d_off)
            pieces.append((dst[d_off : d_off + count], address + offset))
            offset += count
            d_off += count
            if d_off == dst.nbytes:
                di, d_off = di + 1, 0
    return pieces


class UcxTransport(Transport):
    """Reads chunks from peers with UCX GET. Fetches are serialised on one UCP worker."""

    name = "ucx"

    def __init__(self, channel: LocateChannel, host_id: str = "",
                 lease_s: float = READ_LEASE_S) -> None:
        self._channel = channel  # locate/release on the holders' data ports
        self._host_id = host_id
        self.lease_s = lease_s
        self._context = UcpContext(name="lmshare-fetch")
        self._endpoints: dict[tuple[bytes, bool], RemoteEndpoint] = {}
        self._lock = threading.Lock()

    def _endpoint(self, peer: PeerInfo) -> RemoteEndpoint:
        """Peers on other hosts get UCX's peer error handling (a late GET is cancelled cleanly);
        a same-host peer gets none, which lets UCX read its memory with cma — a one-sided
        process_vm_readv that never waits for the holder."""
        address = peer.extra["ucx_address"]
        same_host = bool(self._host_id) and peer.host_id == self._host_id
        endpoint = self._endpoints.get((address, same_host))
        if endpoint is None or endpoint.broken or endpoint.error is not None:
            if endpoint is not None:
                endpoint.close()
            endpoint = self._context.connect(address, error_handling=not same_host)
            self._endpoints[(address, same_host)] = endpoint
        return endpoint

    def fetch(self, peer: PeerInfo, keys: list[bytes], sink: ChunkSink, deadline: float,
              checksum: bool = False) -> int:
        if not keys:
            return 0
        try:
            located, release = self._channel.locate(peer, keys, self.lease_s, deadline)
        except (OSError, LMShareError) as exc:
            log.warning("cannot locate chunks on %s: %s", peer.worker_id, exc)
            return 0
        delivered = 0
        try:
            with self._lock:
                delivered = self._read(peer, keys, located, sink, deadline)
        finally:
            release()
        return delivered

    def _read(self, peer: PeerInfo, keys: list[bytes], located: Located, sink: ChunkSink,
              deadline: float) -> int:
        """GET the chunks in groups of about ``GROUP_BYTES``: every GET of a group at once, then
        one GET of the generation range covering the group's slabs; a chunk is delivered only if
        its slabs' generations did not change. A failed group ends the fetch there."""
        try:
            endpoint = self._endpoint(peer)
        except LMShareError as exc:
            log.warning("cannot reach %s over UCX: %s", peer.worker_id, exc)
            return 0
        chunks = list(zip(keys, located.chunks))
        delivered = 0
        while delivered < len(chunks):
            group, size = [], 0
            for key, chunk in chunks[delivered:]:
                if group and size + chunk.nbytes > GROUP_BYTES:
                    break
                group.append((key, chunk.slabs, chunk.nbytes, chunk.generations))
                size += chunk.nbytes
            done = self._read_group(endpoint, peer, group, sink, deadline)
            delivered += done
            if done < len(group) or time.monotonic() > deadline:
                break
        return delivered

    def _read_group(self, endpoint: RemoteEndpoint, peer: PeerInfo,
                    group: list[tuple[bytes, list[int], int, list[int]]], sink: ChunkSink,
                    deadline: float) -> int:
        extra = peer.extra
        slab_bytes, base = int(extra["slab_bytes"]), int(extra["ucx_base"])
        opened: list[tuple[bytes, list[int], list[int]]] = []
        pieces: list[tuple[memoryview, int]] = []
        for key, slabs, nbytes, generations in group:
            buffers = sink.begin(key, nbytes)
            if buffers is None:
                break
            opened.append((key, slabs, generations))
            pieces += _pieces(slabs, slab_bytes, base, nbytes, buffers)
        good = 0
        try:
            if opened:
                endpoint.get_many(pieces, extra["ucx_rkey"], deadline)
                # one GET of the generation range that covers every slab of the group
                low = min(min(slabs) for _, slabs, _ in opened)
                high = max(max(slabs) for _, slabs, _ in opened)
                after = bytearray(8 * (high - low + 1))
                endpoint.get_into(after, int(extra["ucx_gen_base"]) + 8 * low,
                                  extra["ucx_gen_rkey"], deadline)
                table = struct.unpack(f"<{high - low + 1}Q", after)
                for _, slabs, generations in opened:
                    if [table[s - low] for s in slabs] != list(generations):
                        log.warning("chunk of %s changed while being read; hit truncated",
                                    peer.worker_id)
                        break
                    good += 1
        except LMShareError as exc:
            log.warning("UCX GET from %s failed: %s", peer.worker_id, exc)
        finally:
            for index, (key, _, _) in enumerate(opened):
                sink.end(key, index < good)
        return good

    def close(self) -> None:
        with self._lock:
            for endpoint in self._endpoints.values():
                endpoint.close()
            self._endpoints.clear()
            self._context.close()
