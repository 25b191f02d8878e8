"""A worker under exhausted resources degrades and keeps serving: descriptors run out, peers
announce huge requests, clients flood its local socket, peers hang, leases are absurd."""

from __future__ import annotations

import math
import os
import socket
import statistics
import threading
import time
import tracemalloc

import msgpack
import pytest
import zmq

from lmshare import protocol
from lmshare.errors import PoolFullError
from lmshare.handshake import client_handshake, data_key
from lmshare.keys import ModelSignature
from lmshare.local_cluster import LocalCluster
from lmshare.pool import KVPool
from lmshare.testing.hanging_peer import hanging_holder
from lmshare.testing.waiting import wait_until
from lmshare.transports import tcp
from lmshare.transports.tcp import REQUEST_LENGTH, TcpPeerServer
from lmshare.worker.leases import LeaseTable
from lmshare.worker.local_server import LocalServer

SIG = ModelSignature(model="exhaustion-model", chunk_tokens=16)


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


@pytest.fixture
def cluster(tmp_path):
    c = LocalCluster(heartbeat_timeout_s=30.0, runtime_dir=tmp_path)
    c.start_controller("--heartbeat-interval", "0.3")
    try:
        yield c
    finally:
        c.stop()


def test_the_accept_loop_survives_running_out_of_descriptors(cluster):
    """A burst of connections hits the worker's open-files limit (EMFILE); once they close it
    serves peers again, and says why it paused."""
    cluster.start_worker("holder", "32MiB", prefix=("prlimit", "--nofile=160:160", "--"))
    cluster.start_worker("reader", "32MiB")
    tokens = list(range(3 * SIG.chunk_tokens))
    data = [os.urandom(50_000) for _ in range(3)]
    with cluster.client("holder") as holder:
        holder.put(SIG, tokens, data)
    holder_view = wait_until(lambda: next((w for w in cluster.stats().workers
                                           if w.worker_id == "holder" and w.chunks_indexed == 3),
                                          None), 10, "the holder's chunks in the index")
    host, port = holder_view.address.rsplit(":", 1)
    flood = []
    try:
        for _ in range(400):
            try:
                flood.append(socket.create_connection((host, int(port)), timeout=2))
            except OSError:
                break
        wait_until(lambda: "cannot accept peer connections" in
                   cluster.workers["holder"].log_text(), 15, "the holder to hit its fd limit")
    finally:
        for sock in flood:
            sock.close()
    with cluster.client("reader") as reader:
        wait_until(lambda: reader.get(SIG, tokens) == data, 30,
                   "a peer fetch from the holder after the burst")
    assert cluster.workers["holder"].alive()


def test_announced_request_sizes_cost_no_memory_until_the_bytes_arrive(shm_dir):
    """100 connections each announce a 16 MiB request and send 1 byte of it. What the server
    allocates for them is counted by tracemalloc in the transport's own code (the test
    process's RSS also moves with whatever else runs in it)."""
    server = TcpPeerServer(lambda key: None).start()
    sockets = []
    tracemalloc.start()

    def committed() -> int:
        only_tcp = [tracemalloc.Filter(True, tcp.__file__)]
        return sum(stat.size for stat in
                   tracemalloc.take_snapshot().filter_traces(only_tcp).statistics("filename"))

    try:
        for _ in range(100):
            sock = socket.create_connection((server.host, server.port))
            client_handshake(sock, data_key(None), time.monotonic() + 30)
            sock.sendall(REQUEST_LENGTH.pack(16 * 1024 * 1024 - 1) + b"\x80")
            sockets.append(sock)
        wait_until(lambda: len(server._connections) == 100, 10, "100 connections served")
        # each connection's thread has begun its body once its first piece is allocated
        held = wait_until(lambda: (n := committed()) >= 100 * tcp.BODY_PIECE_BYTES and n, 30,
                          "every connection reading its body")
        assert held < 64 << 20  # pieces for the bytes that came, not 100 x 16 MiB
    finally:
        tracemalloc.stop()
        for sock in sockets:
            sock.close()
        server.stop(0)


def test_leases_are_finite_capped_and_counted(shm_dir):
    pool = KVPool(4 << 20, 64 << 10, name="leases")
    try:
        pool.put(b"n" * 16, b"k" * 16, b"x" * 1000)
        table = LeaseTable(pool, max_lease_s=2.0, max_leases=2)
        for bad in (math.nan, math.inf, -1.0):
            with pytest.raises(ValueError):
                table.add(bad)
        entry = pool.pin(b"k" * 16)
        table.add(1e9, entries=[entry])  # clamped to max_lease_s
        assert all(lease.deadline <= time.monotonic() + 2.0 for lease in table._leases.values())
        table.add(1.0)
        entry = pool.pin(b"k" * 16)
        with pytest.raises(PoolFullError):
            table.add(1.0, entries=[entry])  # refused, and its pin undone
        assert pool.stats().pinned_entries == 1
        table.release_all()
        assert pool.stats().pinned_entries == 0
    finally:
        pool.close()


def _dealer(endpoint: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def test_a_flood_of_local_requests_is_answered_busy_and_honest_clients_still_get_through(
        tmp_path):
    gate = threading.Event()

    def slow(m):
        gate.wait(10)
        return protocol.ok(m["id"])
    endpoint = f"ipc://{tmp_path}/flood.sock"
    server = LocalServer(endpoint, {"ping": lambda m: protocol.ok(m["id"]), "worker_stats": slow},
                         threads=1, may_wait=lambda m: m["type"] == "worker_stats",
                         max_queue=64, queue_deadline_s=1.0)
    server.start()
    flood, honest = _dealer(endpoint), _dealer(endpoint)
    codes: list[str] = []

    def drain(wait_ms: int = 0) -> None:
        while flood.poll(wait_ms):
            codes.append(msgpack.unpackb(flood.recv()).get("code"))
    try:
        for i in range(5000):
            flood.send(protocol.encode(protocol.request("worker_stats", i)))
            if i % 100 == 99:
                drain()
        # honest requests on the other lane are answered at once, the flood is refused
        started = time.monotonic()
        honest.send(protocol.encode(protocol.request("ping", 1)))
        assert honest.poll(2000)
        assert msgpack.unpackb(honest.recv())["type"] == "ok"
        assert time.monotonic() - started < 1.0
        wait_until(lambda: drain() or server.busy_replies >= 5000 - 65, 20,
                   "busy replies to the flood")
        time.sleep(1.1)  # the queued ones pass their deadline
        gate.set()
        # all refused but the one request that was already running when the flood came (a
        # client that does not read its replies may lose some at zmq's high-water mark)
        wait_until(lambda: server.busy_replies == 4999, 20, "every flood request refused")
        drain(200)
        assert codes.count(None) <= 1 and set(codes) <= {"busy", None}
        assert len(codes) >= 1000
    finally:
        gate.set()
        flood.close()
        honest.close()
        server.stop()


def test_local_hits_are_answered_while_peers_hang(cluster):
    """A holder in the index that accepts connections and never answers: 8 acquires wait on
    it, while lookups and acquires of local chunks stay fast (they never queue behind)."""
    cluster.start_worker("w", "32MiB", "--fetch-timeout", "5")
    local = list(range(4 * SIG.chunk_tokens))
    remote = [t + 10**6 for t in range(4 * SIG.chunk_tokens)]
    stop = threading.Event()

    def waiter() -> None:
        with cluster.client("w", timeout_s=30) as c:
            while not stop.is_set():
                c.acquire(SIG, remote).release()
    with hanging_holder(cluster, SIG, remote), cluster.client("w") as c:
        try:
            c.put(SIG, local, [os.urandom(20_000) for _ in range(4)])
            wait_until(lambda: c.lookup(SIG, remote).peer_tokens == len(remote), 10,
                       "the hanging holder's chunks in the index")
            threads = [threading.Thread(target=waiter, daemon=True) for _ in range(8)]
            for t in threads:
                t.start()
            wait_until(lambda: c.stats()["counters"]["in_flight_fetches"] >= 1, 10,
                       "fetches waiting on the hanging peer")
            latencies = []
            for _ in range(100):
                started = time.perf_counter()
                assert c.lookup(SIG, local, peers=True).local_tokens == len(local)
                with c.acquire(SIG, local) as hit:
                    assert hit.local_chunks == 4
                latencies.append(time.perf_counter() - started)
            assert c.stats()["counters"]["in_flight_fetches"] >= 1  # still hanging meanwhile
        finally:
            stop.set()
    # behind a fetch, a request would wait for it: up to the 5 s fetch timeout. The p99
    # target (< 50 ms) is measured by `python -m benchmarks hung_peers` on a quiet machine; on
    # a loaded one the scheduler adds its own delays, so the test asserts the median and that
    # no request waited anything like a fetch
    q = statistics.quantiles(latencies, n=100)
    assert q[49] < 0.050 and max(latencies) < 1.0, \
        f"p50 {q[49] * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms, max {max(latencies):.2f} s"
