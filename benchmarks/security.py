"""What the trust boundary costs: chunk digests on the fetch and store paths, and the
data-plane handshake.

A worker process (started through the CLI, with a cluster key) holds the chunks; this process
fetches them over TCP into fresh pool slabs through the pool sink a worker uses, with and
without checking each chunk against its writer's digest, interleaved round by round. The store
side is the digest a worker takes when a local client commits a chunk; the handshake is a new
peer connection's set-up (TCP connect + the mutual HMAC challenge/response).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from benchmarks.common import command_line, median, progress, table
from benchmarks.transfer import holder_peer
from lmshare.local_cluster import LocalCluster
from lmshare.pool import KVPool
from lmshare.transports.tcp import TcpTransport
from lmshare.worker.digests import chunk_digest
from lmshare.worker.peer_fetch import STREAMS_PER_PEER, PeerFetcher, PoolSink

SIZES = {"4 MiB": (4 << 20, 8, 4), "32 MiB": (32 << 20, 4, 1)}  # chunk, chunks, requests
RUNS = ("fetch", "fetch + digest check", f"fetch, {STREAMS_PER_PEER} streams",
        f"fetch + digest check, {STREAMS_PER_PEER} streams", "digest (store side)")


def fetch_gbps(transport, peer, namespace, keys, size, repeats, digests, streams) -> float:
    """GB/s of ``repeats`` fetches of ``keys``: one transport call (``streams`` = 1) or a
    worker's PeerFetcher (its connections per holder at once)."""
    reader = KVPool(size * (len(keys) + 1), 256 << 10, name=f"bench-security-{size}")
    fetcher = PeerFetcher(reader, [transport], fetch_timeout_s=30)
    try:
        started = time.perf_counter()
        for _ in range(repeats):
            if streams == 1:
                got = transport.fetch(peer, keys, PoolSink(reader, namespace, digests=digests),
                                      time.monotonic() + 30)
            else:
                got = fetcher.fetch(namespace, keys, [["holder"]] * len(keys),
                                    {"holder": peer}, digests=digests)
            if got != len(keys):
                raise RuntimeError("benchmark fetch failed")
            for key in keys:
                reader.remove(key)
        return size * len(keys) * repeats / (time.perf_counter() - started) / 1e9
    finally:
        fetcher._executor.shutdown(wait=True)
        reader.close()


def run(rounds: int = 7) -> tuple[str, dict]:
    data: dict[str, dict[str, list[float]]] = {}
    with LocalCluster() as cluster:
        cluster.start_controller()
        cluster.start_worker("holder", "512MiB")
        tcp = TcpTransport(key=cluster.key)
        try:
            for label, (size, count, repeats) in progress(SIZES.items(), "security",
                                                          len(SIZES)):
                peer, namespace, keys = holder_peer(cluster, size, count)
                with cluster.client("holder") as client, client.acquire_keys(
                        namespace, keys, peers=False) as hit:
                    digests = {key: chunk_digest(hit.views(i)) for i, key in enumerate(keys)}
                    chunk = hit.read(0)
                runs: dict[str, list[float]] = {name: [] for name in RUNS}
                fetch_gbps(tcp, peer, namespace, keys, size, 1, None, 1)  # warm a connection
                for _ in range(rounds):
                    for streams in (1, STREAMS_PER_PEER):
                        suffix = "" if streams == 1 else f", {streams} streams"
                        runs["fetch" + suffix].append(fetch_gbps(
                            tcp, peer, namespace, keys, size, repeats, None, streams))
                        runs["fetch + digest check" + suffix].append(fetch_gbps(
                            tcp, peer, namespace, keys, size, repeats, digests, streams))
                    started = time.perf_counter()
                    chunk_digest([memoryview(chunk)])
                    runs["digest (store side)"].append(size / (time.perf_counter() - started)
                                                       / 1e9)
                data[label] = runs
            handshakes = []
            for _ in range(200):
                fresh = TcpTransport(key=cluster.key)
                started = time.perf_counter()
                sock = fresh._connect(peer, time.monotonic() + 5, fresh=True)
                handshakes.append((time.perf_counter() - started) * 1e6)
                sock.close()
            data["handshake"] = {"us": handshakes}
        finally:
            tcp.close()
    return report(data), data


def report(data: dict) -> str:
    rows = []
    for label, runs in data.items():
        if label == "handshake":
            continue
        med = {k: median(v) for k, v in runs.items()}
        many = f", {STREAMS_PER_PEER} streams"
        rows.append([label, *(f"{med[k]:.2f} ± {statistics.pstdev(runs[k]):.2f}" for k in RUNS),
                     f"{med['fetch + digest check'] / med['fetch']:.0%}",
                     f"{med['fetch + digest check' + many] / med['fetch' + many]:.0%}"])
    head = ["chunk", *(f"{name} GB/s" for name in RUNS), "checked / not (1 stream)",
            f"checked / not ({STREAMS_PER_PEER} streams)"]
    hs = data["handshake"]["us"]
    return (table(head, rows) + f"\n\nNew peer connection (TCP connect + handshake): median "
            f"{median(hs):.0f} µs, p99 {sorted(hs)[int(len(hs) * 0.99) - 1]:.0f} µs "
            f"over {len(hs)} connections.")


if __name__ == "__main__":
    command_line(__doc__, sys.argv[1:])
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    print(run()[0])
