"""TCP data path in-process: zero-copy send, deadlines, checksums, truncation, striping."""

import os
import socket
import threading
import time

import pytest

from lmshare.pool import KVPool
from lmshare.testing.waiting import wait_until
from lmshare.transports import tcp
from lmshare.transports.base import PeerInfo
from lmshare.transports.tcp import TcpPeerServer, TcpTransport
from lmshare.worker.peer_fetch import FetchPlan, PeerFetcher, PoolSink

NS = b"n" * 16


def k(i: int) -> bytes:
    return i.to_bytes(16, "big")


def serve(pool: KVPool) -> TcpPeerServer:
    def source(key):
        entry = pool.pin(key)
        if entry is None:
            return None
        return pool.views(entry), lambda: pool.unpin(entry)
    return TcpPeerServer(source).start()


@pytest.fixture
def pools(shm_dir):
    owner = KVPool(32 << 20, 64 << 10, name="owner")
    reader = KVPool(32 << 20, 64 << 10, name="reader")
    yield owner, reader
    owner.close()
    reader.close()


def peer(server: TcpPeerServer, name: str = "owner") -> PeerInfo:
    return PeerInfo(name, server.host, server.port)


@pytest.mark.parametrize("checksum", [False, True])
def test_fetch_is_byte_identical_and_unpins(pools, checksum):
    owner, reader = pools
    chunks = [os.urandom(size) for size in (1, 100_000, 3 << 20)]
    for i, data in enumerate(chunks):
        owner.put(NS, k(i), data)
    server = serve(owner)
    transport = TcpTransport()
    try:
        sink = PoolSink(reader, NS)
        got = transport.fetch(peer(server), [k(0), k(1), k(2)], sink, time.monotonic() + 5,
                              checksum=checksum)
        assert got == 3
        assert [reader.read(k(i)) for i in range(3)] == chunks
        # the holder unpins once its last send returned, which may be after the reader got it
        wait_until(lambda: owner.stats().pinned_entries == 0, 5, "the holder to unpin")
        wait_until(lambda: server.bytes_served == sum(map(len, chunks)), 5, "served bytes")
        # the connection is reused for the next fetch
        assert transport.fetch(peer(server), [k(1)], PoolSink(reader, NS), time.monotonic() + 5) == 1
    finally:
        transport.close()
        server.stop()


def test_a_missing_chunk_truncates_to_the_prefix_before_it(pools):
    owner, reader = pools
    owner.put(NS, k(0), b"a" * 1000)
    owner.put(NS, k(2), b"c" * 1000)
    server = serve(owner)
    try:
        assert TcpTransport().fetch(peer(server), [k(0), k(1), k(2)], PoolSink(reader, NS),
                                    time.monotonic() + 5) == 1
        assert reader.contains(k(0)) and not reader.contains(k(2))
    finally:
        server.stop()


def test_a_silent_peer_costs_the_deadline_not_a_hang(pools):
    _, reader = pools
    listener = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    accepted = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    started = time.monotonic()
    got = TcpTransport().fetch(PeerInfo("mute", "127.0.0.1", listener.getsockname()[1]),
                               [k(0)], PoolSink(reader, NS), time.monotonic() + 0.5)
    assert got == 0
    assert time.monotonic() - started < 1.5
    assert reader.stats().reserved_bytes == 0
    listener.close()


def test_unreachable_peer_is_a_clean_miss(pools):
    _, reader = pools
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    assert TcpTransport().fetch(PeerInfo("gone", "127.0.0.1", port), [k(0)],
                                PoolSink(reader, NS), time.monotonic() + 1) == 0


def test_checksum_mismatch_drops_the_chunk(pools, monkeypatch):
    owner, reader = pools
    owner.put(NS, k(0), b"x" * 5000)
    server = serve(owner)
    calls = iter([0, 1])  # the server's CRC is 0, the client computes 1: a corrupted chunk
    monkeypatch.setattr(tcp, "crc32_of", lambda views: next(calls))
    try:
        assert TcpTransport().fetch(peer(server), [k(0)], PoolSink(reader, NS),
                                    time.monotonic() + 5, checksum=True) == 0
        assert not reader.contains(k(0)) and reader.stats().reserved_bytes == 0
    finally:
        server.stop()


def test_stop_drains_in_flight_reads(pools):
    owner, reader = pools
    owner.put(NS, k(0), b"y" * 100_000)
    entered, go_on = threading.Event(), threading.Event()

    def slow_source(key):
        entered.set()
        assert go_on.wait(10)  # the read stays in flight until the test lets it finish
        entry = owner.pin(key)
        return owner.views(entry), lambda: owner.unpin(entry)

    server = TcpPeerServer(slow_source).start()
    result = []
    fetch = threading.Thread(target=lambda: result.append(TcpTransport().fetch(
        peer(server), [k(0)], PoolSink(reader, NS), time.monotonic() + 10)))
    fetch.start()
    assert entered.wait(5)
    stopper = threading.Thread(target=server.stop, kwargs={"drain_timeout_s": 10})
    stopper.start()
    stopper.join(0.2)
    assert stopper.is_alive()  # stop waits for the read in flight...
    go_on.set()
    stopper.join(10)
    fetch.join(10)
    assert not stopper.is_alive()  # ...and returns once it finished, served whole
    assert result == [1] and reader.read(k(0)) == b"y" * 100_000


def test_stripe_spreads_chunks_over_holders():
    keys = [k(i) for i in range(6)]
    plan = FetchPlan.stripe(keys, [["a", "b"]] * 6)
    assert plan.by_peer == {"a": keys[0::2], "b": keys[1::2]}
    plan = FetchPlan.stripe(keys[:2], [["a"], ["a", "b"]])
    assert plan.by_peer == {"a": [keys[0]], "b": [keys[1]]}
    one_holder = FetchPlan.stripe(keys, [["a"]] * 6)
    streams = one_holder.streams(4)  # one holder's share over parallel connections
    assert [k for _, part in streams for k in part] == keys and len(streams) == 4
    assert all(peer == "a" and part for peer, part in streams)
    assert len(FetchPlan.stripe(keys[:2], [["a"]] * 2).streams(4)) == 2


def test_striped_fetch_from_two_holders_with_one_dead(pools, shm_dir):
    owner, reader = pools
    other = KVPool(32 << 20, 64 << 10, name="other")
    chunks = [os.urandom(200_000) for _ in range(6)]
    for i, data in enumerate(chunks):
        owner.put(NS, k(i), data)
        other.put(NS, k(i), data)
    a, b = serve(owner), serve(other)
    try:
        fetcher = PeerFetcher(reader, [TcpTransport()], fetch_timeout_s=5)
        got = fetcher.fetch(NS, [k(i) for i in range(6)], [["a", "b"]] * 6,
                            {"a": peer(a, "a"), "b": peer(b, "b")})
        assert got == 6 and [reader.read(k(i)) for i in range(6)] == chunks
        # (a holder counts a chunk once its send returned, which may be after it arrived)
        wait_until(lambda: a.chunks_served == 3 and b.chunks_served == 3, 5, "served counts")
        for i in range(6):
            reader.remove(k(i))
        b.stop()  # holder b dies: its chunks (odd indexes) fail, the prefix stops at 1
        fetcher.fetch(NS, [k(i) for i in range(6)], [["a", "b"]] * 6,
                      {"a": peer(a, "a"), "b": peer(b, "b")})
        assert reader.prefix_length([k(i) for i in range(6)]) == 1
        fetcher.close()
    finally:
        a.stop()
        b.stop()
        other.close()


def test_a_connection_the_peer_closed_while_idle_is_replaced(pools):
    owner, reader = pools
    owner.put(NS, k(0), b"z" * 50_000)

    def source(key):
        entry = owner.pin(key)
        return (owner.views(entry), lambda: owner.unpin(entry)) if entry else None

    server = TcpPeerServer(source, idle_timeout_s=0.2).start()
    transport = TcpTransport()
    try:
        assert transport.fetch(peer(server), [k(0)], PoolSink(reader, NS), time.monotonic() + 5) == 1
        reader.remove(k(0))
        wait_until(lambda: not server._connections, 10,
                   "the server to drop the idle pooled connection")
        assert transport.fetch(peer(server), [k(0)], PoolSink(reader, NS), time.monotonic() + 5) == 1
        assert reader.read(k(0)) == b"z" * 50_000
    finally:
        transport.close()
        server.stop()
