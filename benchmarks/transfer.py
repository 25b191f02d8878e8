"""Peer fetch throughput: lmshare's TCP path vs a raw Python loopback socket, side by side.

The holder is a real worker process started through the CLI; the reader is this process, using
the same transport and pool sink a worker uses (reserve → recv_into the slabs → commit).
"""

from __future__ import annotations

import os
import statistics
import time

from benchmarks import raw_socket
from benchmarks.common import median, progress, table
from lmshare.keys import ModelSignature, signature_keys
from lmshare.local_cluster import LocalCluster
from lmshare.pool import KVPool
from lmshare.transports.base import PeerInfo
from lmshare.transports.tcp import TcpTransport
from lmshare.worker.peer_fetch import PoolSink

SIZES = {"4 MiB": (4 << 20, 40), "32 MiB": (32 << 20, 6)}


def lmshare_tcp(cluster: LocalCluster, size: int, repeats: int, rounds: int = 5) -> list[float]:
    sig = ModelSignature(model=f"bench-{size}", chunk_tokens=16)
    tokens = list(range(16))
    (key,) = signature_keys(sig, tokens)
    with cluster.client("holder") as client:
        client.put(sig, tokens, [os.urandom(size)])
        port = client.stats()["data_port"]
    peer = PeerInfo("holder", "127.0.0.1", port)
    reader = KVPool(size * 2 + (1 << 20), 256 << 10, name=f"bench-reader-{size}")
    transport = TcpTransport()
    results = []
    try:
        for _ in range(rounds + 1):
            started = time.perf_counter()
            for _ in range(repeats):
                sink = PoolSink(reader, sig.namespace())
                if transport.fetch(peer, [key], sink, time.monotonic() + 30) != 1:
                    raise RuntimeError("benchmark fetch failed")
                reader.remove(key)
            results.append(size * repeats / (time.perf_counter() - started) / 1e9)
    finally:
        transport.close()
        reader.close()
    return results[1:]


def run(rounds: int = 5) -> tuple[str, dict]:
    rows, data = [], {}
    with LocalCluster() as cluster:
        cluster.start_controller()
        cluster.start_worker("holder", "256MiB")
        for label, (size, repeats) in progress(SIZES.items(), "transfer", len(SIZES)):
            # interleave the two paths so that machine noise hits both alike
            ours, raw = [], []
            for _ in range(rounds):
                ours += lmshare_tcp(cluster, size, repeats, rounds=1)
                raw += raw_socket.measure(size, repeats, rounds=1)
            data[label] = {"lmshare_tcp_gbps": ours, "raw_socket_gbps": raw}
            ratio = median(ours) / median(raw)
            rows.append([label, f"{median(ours):.2f}", f"{statistics.pstdev(ours):.2f}",
                         f"{median(raw):.2f}", f"{statistics.pstdev(raw):.2f}", f"{ratio:.0%}"])
    text = table(["chunk", "lmshare TCP GB/s (median)", "±", "raw socket GB/s (median)", "±",
                  "lmshare / raw"], rows)
    return text, data


if __name__ == "__main__":
    print(run()[0])
