"""One locate/release channel for both one-sided transports: same-host shared memory and UCX
locate on the holder's data port, through one LocateChannel, and release there; the holder's
local endpoint no longer answers locate; a holder that is not this user's is never mapped."""

from __future__ import annotations

import hashlib
import os
import socket

import pytest
import zmq

from lmshare import ModelSignature, protocol
from lmshare.keys import signature_keys
from lmshare.pool import KVPool
from lmshare.testing.waiting import wait_until
from lmshare.transports import locate
from lmshare.transports.base import PeerInfo
from lmshare.transports.locate import LocateChannel
from lmshare.transports.shm import ShmTransport
from lmshare.transports.tcp import TcpPeerServer, TcpTransport
from lmshare.transports.ucp import ucx_available
from lmshare.worker.leases import LeaseTable

NS = b"c" * 16
SLAB = 4096
SIG = ModelSignature(model="one-channel", chunk_tokens=16)


def k(i: int) -> bytes:
    return hashlib.blake2b(f"chunk {i}".encode(), digest_size=16).digest()


def payload(i: int) -> bytes:
    return hashlib.blake2b(f"bytes {i}".encode(), digest_size=32).digest() * 300  # 9600 bytes


class Sink:
    def __init__(self) -> None:
        self.chunks: dict[bytes, bytearray] = {}
        self.accepted: list[bytes] = []

    def begin(self, key: bytes, nbytes: int):
        self.chunks[key] = bytearray(nbytes)
        return [memoryview(self.chunks[key])]

    def end(self, key: bytes, ok: bool) -> None:
        if ok:
            self.accepted.append(key)


class Holder:
    """A pool behind a data port whose locate handler pins under leases, as a worker's does
    (``WorkerAgent._locate``), counting every locate it answers."""

    def __init__(self) -> None:
        self.pool = KVPool(64 * SLAB, SLAB, name="channel-holder")
        for i in range(4):
            self.pool.put(NS, k(i), payload(i))
        self.leases = LeaseTable(self.pool)
        self.located: list[int] = []
        self.server = TcpPeerServer(lambda key: None, locator=self.locate,
                                    releaser=self.leases.release).start()
        self.export = None
        extra = {"slab_bytes": SLAB, "region_bytes": self.pool.capacity_bytes}
        if ucx_available():
            from lmshare.transports.ucx import UcxExport

            self.export = UcxExport(self.pool.region.buffer, self.pool.generation_region.buffer)
            extra.update(self.export.registration())
        self.peer = PeerInfo("holder", "127.0.0.1", self.server.port, "this-host",
                             ("shm", "ucx", "tcp"), extra)

    def locate(self, keys: list, lease_s: float) -> dict:
        self.located.append(len(keys))
        entries = []
        for key in keys:
            entry = self.pool.pin(key)
            if entry is None:
                break
            entries.append(entry)
        return {"handle": self.leases.add(lease_s, entries=entries) if entries else 0,
                "chunks": [[e.slabs, e.nbytes] for e in entries],
                "gens": [self.pool.generations(e.slabs) for e in entries],
                "region": self.pool.export().to_wire()}

    def close(self) -> None:
        self.server.stop(0)
        if self.export is not None:
            self.export.close()
        self.leases.release_all()
        self.pool.close()


@pytest.fixture
def holder(shm_dir):
    h = Holder()
    yield h
    h.close()


def fetched(transport, peer: PeerInfo, count: int) -> list[bytes]:
    sink = Sink()
    assert transport.fetch(peer, [k(i) for i in range(count)], sink, 10**9) == len(sink.accepted)
    return [bytes(sink.chunks[key]) for key in sink.accepted]


def test_shm_and_ucx_locate_and_release_through_one_channel_on_the_data_port(holder):
    tcp = TcpTransport()
    channel = LocateChannel(tcp)
    shm = ShmTransport(channel)
    try:
        assert fetched(shm, holder.peer, 4) == [payload(i) for i in range(4)]
        assert holder.located == [4]  # the locate came on the data port
        wait_until(lambda: len(holder.leases) == 0, 5, "the shm reader's release")
        if ucx_available():
            from lmshare.transports.ucx import UcxTransport

            ucx = UcxTransport(channel, host_id="this-host")
            try:
                assert fetched(ucx, holder.peer, 3) == [payload(i) for i in range(3)]
            finally:
                ucx.close()
            assert holder.located == [4, 3]  # the same handler, the same port
            wait_until(lambda: len(holder.leases) == 0, 5, "the UCX reader's release")
        # both asked on one pooled, authenticated connection: nothing else was opened
        assert sum(len(c) for c in tcp._idle.values()) == 1
    finally:
        shm.close()
        tcp.close()


def test_a_holder_that_is_not_this_users_is_never_mapped(holder, monkeypatch):
    """The far end of the data-port connection must be a socket of this user on this host
    before a reader maps the pool its answer names (a member elsewhere claiming this host id
    cannot make a worker map a file); a reader that does not map (UCX) is not affected."""
    monkeypatch.setattr(locate, "far_end_uid", lambda sock: os.geteuid() + 1)
    tcp = TcpTransport()
    shm = ShmTransport(LocateChannel(tcp))
    try:
        assert fetched(shm, holder.peer, 4) == []
        assert holder.located == []  # refused before asking: nothing pinned, nothing mapped
        assert shm._regions.path_of("holder") is None
    finally:
        shm.close()
        tcp.close()


def test_the_far_end_of_a_loopback_connection_is_this_user():
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    try:
        assert locate.far_end_uid(client) == os.geteuid()
        assert locate.far_end_uid(server) == os.geteuid()
    finally:
        for sock in (client, server, listener):
            sock.close()


def test_the_local_endpoint_no_longer_answers_locate(keyed_cluster):
    """A direct same-host hit locates on the holder's data port; the holder's local IPC
    endpoint, once a second carrier of locate, refuses it as an unknown request."""
    cluster = keyed_cluster()
    cluster.start_worker("chan-holder", "16MiB")
    cluster.start_worker("chan-reader", "16MiB")
    tokens = list(range(16 * 3))
    keys = signature_keys(SIG, tokens)
    chunks = [os.urandom(20_000) for _ in range(3)]
    with cluster.client("chan-holder") as holder, cluster.client("chan-reader") as reader:
        holder.put(SIG, tokens, chunks)
        wait_until(lambda: reader.lookup(SIG, tokens).peer_tokens == 48, 5, "indexed")
        with reader.acquire(SIG, tokens, direct=True) as hit:
            assert hit.peer_chunks == 3 and [hit.read(i) for i in range(3)] == chunks
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(cluster.worker_endpoint("chan-holder"))
        try:
            sock.send(protocol.encode(protocol.request("locate", 7, keys=keys, lease_s=5.0)))
            assert sock.poll(5000, zmq.POLLIN), "no answer"
            reply = protocol.decode_raw(sock.recv())
        finally:
            sock.close()
        assert reply["type"] == "error" and "locate" in reply["message"]
        # the reader's release on the data port is sent without waiting for an answer
        wait_until(lambda: holder.stats()["counters"]["pinned_entries"] == 0, 5,
                   "the direct hit's release at the holder")
