"""Controller lookup latency with 1M chunks from 1000 workers indexed, and registration time.

The controller is a real process started through the CLI; 1000 workers register and announce
1000 chunks each over the real protocol; then a client times lookup round trips (16 keys: a
4k-token prompt in 256-token chunks) through the socket.
"""

from __future__ import annotations

import hashlib
import os
import time

from benchmarks.common import percentile, progress, table
from lmshare.control import ControllerClient
from lmshare.local_cluster import LocalCluster

NS = hashlib.blake2b(b"bench-namespace", digest_size=16).digest()


def key(worker: int, index: int) -> bytes:
    return hashlib.blake2b(f"{worker}/{index}".encode(), digest_size=16).digest()


def register_times(port: int, count: int, key=None) -> list[float]:
    """Milliseconds per registration, each from a fresh connection (what a starting worker does)."""
    times = []
    for i in range(count):
        client = ControllerClient("127.0.0.1", port, timeout_s=5, key=key)
        started = time.perf_counter()
        client.call("register", worker_id=f"reg-{i}", host="127.0.0.1", data_port=10000 + i,
                    transports=["tcp"], capacity_bytes=1 << 30, host_id="bench")
        times.append((time.perf_counter() - started) * 1000)
        client.close()
    return times


def run(workers: int = 1000, chunks_per_worker: int = 1000, lookups: int = 5000) -> tuple[str, dict]:
    with LocalCluster(heartbeat_timeout_s=3600) as cluster:
        cluster.start_controller()
        port = cluster.controller_port
        client = cluster.controller_client(timeout_s=30)
        reg_ms = register_times(port, 200, cluster.key)
        for w in progress(range(workers), "index 1M chunks", workers):
            epoch = client.call("register", worker_id=f"w{w}", host="127.0.0.1",
                                data_port=20000 + (w % 40000), transports=["tcp"],
                                capacity_bytes=1 << 30, host_id=f"h{w}")["epoch"]
            client.call("batch", worker_id=f"w{w}", epoch=epoch, seq=1,
                        admit={NS: [key(w, i) for i in range(chunks_per_worker)]}, evict=[])
        stats = client.call("stats")["stats"]
        indexed = stats["chunks_indexed"]
        registered = sum(1 for w in stats["workers"] if w["state"] == "alive")
        samples = []
        rng = os.urandom
        for n in range(lookups):
            w = n % workers
            keys = [key(w, i) for i in range(16)] if n % 2 == 0 else [rng(16) for _ in range(16)]
            started = time.perf_counter()
            reply = client.call("lookup", namespace=NS, keys=keys)
            samples.append((time.perf_counter() - started) * 1e6)
            assert reply["matched"] == (16 if n % 2 == 0 else 0)
        server = client.call("stats")["stats"]
        client.close()
    data = {"chunks_indexed": indexed, "workers_registered": registered,
            "lookup_round_trip_us": {"p50": percentile(samples, 0.5), "p99": percentile(samples, 0.99)},
            "lookup_in_controller_us": {"p50": server["lookup_p50_us"], "p99": server["lookup_p99_us"]},
            "register_ms": {"p50": percentile(reg_ms, 0.5), "p99": percentile(reg_ms, 0.99),
                            "max": max(reg_ms)}}
    text = table(
        ["measure", "p50", "p99", "target"],
        [[f"lookup round trip, 16 keys ({indexed:,} chunks, {registered} workers)",
          f"{percentile(samples, 0.5):.0f} µs", f"{percentile(samples, 0.99):.0f} µs", "p99 ≤ 500 µs"],
         ["lookup time inside the controller", f"{server['lookup_p50_us']:.0f} µs",
          f"{server['lookup_p99_us']:.0f} µs", ""],
         ["worker registration (fresh connection, round trip)", f"{percentile(reg_ms, 0.5):.2f} ms",
          f"{percentile(reg_ms, 0.99):.2f} ms", "≤ 10 ms"]])
    return text, data


if __name__ == "__main__":
    print(run()[0])
