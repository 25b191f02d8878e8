"""Peer fetch throughput, side by side in one run: lmshare's paths vs baselines.

The holder is a real worker process started through the CLI; the reader is this process, using
the same transports and pool sink a worker uses (reserve → fill the slabs → commit). Baselines:
a raw Python loopback socket moving the same bytes, a host memcpy, and Redis GET.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import sys
import time

from benchmarks import baselines, raw_socket
from benchmarks.baselines import RedisServer
from benchmarks.common import command_line, median, progress, table
from lmshare.errors import RemoteError
from lmshare.keys import ModelSignature, signature_keys
from lmshare.local_cluster import LocalCluster
from lmshare.pool import KVPool
from lmshare.transports.base import PeerInfo, Transport
from lmshare.transports.locate import LocateChannel
from lmshare.transports.shm import ShmTransport
from lmshare.transports.tcp import TcpTransport
from lmshare.transports.ucp import ucx_available
from lmshare.transports.ucx import UcxTransport
from lmshare.worker.config import host_identity
from lmshare.worker.peer_fetch import PoolSink

# chunk size → (chunks per request, requests per round). A request fetches several chunks, as
# a long prompt does (a 16k-token prompt of 256-token chunks has 64).
log = logging.getLogger(__name__)

SIZES = {"4 MiB": (4 << 20, 8, 8), "32 MiB": (32 << 20, 4, 2)}


def holder_peer(cluster: LocalCluster, size: int, count: int
                ) -> tuple[PeerInfo, bytes, list[bytes]]:
    """Store ``count`` chunks of ``size`` bytes on the holder; its PeerInfo as the controller
    gives it, the namespace and the keys."""
    sig = ModelSignature(model=f"bench-{size}", chunk_tokens=16)
    tokens = list(range(16 * count))
    keys = signature_keys(sig, tokens)
    with cluster.client("holder") as client:
        client.put(sig, tokens, [os.urandom(size) for _ in range(count)])
    key = keys[-1]
    controller = cluster.controller_client()
    deadline = time.monotonic() + 10
    while True:
        try:
            reply = controller.call("lookup", namespace=sig.namespace(), keys=[key])
            if reply["matched"]:
                break
        except RemoteError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the holder's chunk never reached the index")
        time.sleep(0.05)
    controller.close()
    info = reply["workers"]["holder"]
    peer = PeerInfo("holder", info["host"], info["data_port"], info["host_id"],
                    tuple(info["transports"]), info["extra"])
    return peer, sig.namespace(), keys


def lmshare_fetch(transport: Transport, peer: PeerInfo, namespace: bytes, keys: list[bytes],
                  size: int, repeats: int, rounds: int = 5) -> list[float]:
    """GB/s of ``repeats`` requests, each fetching every key into a fresh local pool entry."""
    reader = KVPool(size * (len(keys) + 1), 256 << 10, name=f"bench-reader-{size}")
    results = []
    try:
        for _ in range(rounds + 1):
            started = time.perf_counter()
            for _ in range(repeats):
                sink = PoolSink(reader, namespace)
                if transport.fetch(peer, keys, sink, time.monotonic() + 30) != len(keys):
                    raise RuntimeError("benchmark fetch failed")
                for key in keys:
                    reader.remove(key)
            results.append(size * len(keys) * repeats / (time.perf_counter() - started) / 1e9)
    finally:
        reader.close()
    return results[1:]


PATHS = ("lmshare TCP", "lmshare TCP encrypted", "raw socket", "Mooncake TCP", "lmshare UCX over tcp",
         "lmshare UCX same-host (cma)", "lmshare same-host shm", "host memcpy", "Redis GET")


def run(rounds: int = 9) -> tuple[str, dict]:
    data: dict[str, dict[str, list[float]]] = {}
    redis_server = RedisServer()
    cluster = LocalCluster()
    tcp = TcpTransport(key=cluster.key)
    sealed = TcpTransport(key=cluster.key, encrypt=True)  # what `worker --encrypt` does
    # the one-sided paths locate on the holder's data port, as a worker's do
    locating = TcpTransport(key=cluster.key)
    one_sided = LocateChannel(locating)
    shm = ShmTransport(one_sided)
    ucx = UcxTransport(one_sided, host_identity()) if ucx_available() else None
    try:
        with cluster:
            cluster.start_controller()
            cluster.start_worker("holder", "512MiB", *(
                ["--transports", "shm,ucx,tcp"] if ucx is not None else []))
            for label, (size, count, repeats) in progress(SIZES.items(), "transfer", len(SIZES)):
                peer, namespace, keys = holder_peer(cluster, size, count)
                runs: dict[str, list[float]] = {path: [] for path in PATHS}
                # interleave the paths so that machine noise hits all alike
                for _ in range(rounds):
                    runs["lmshare TCP"] += lmshare_fetch(tcp, peer, namespace, keys, size,
                                                         repeats, rounds=1)
                    runs["lmshare TCP encrypted"] += lmshare_fetch(sealed, peer, namespace, keys,
                                                                   size, repeats, rounds=1)
                    runs["raw socket"] += raw_socket.measure(size, count, repeats, rounds=1)
                    runs["Mooncake TCP"] += mooncake(size, count, repeats)
                    runs["lmshare same-host shm"] += lmshare_fetch(shm, peer, namespace, keys,
                                                                   size, repeats, rounds=1)
                    if ucx is not None:
                        # a peer that looks remote gets UCX's error handling, hence tcp here
                        remote = dataclasses.replace(peer, host_id="another-host")
                        runs["lmshare UCX over tcp"] += lmshare_fetch(
                            ucx, remote, namespace, keys, size, repeats, rounds=1)
                        runs["lmshare UCX same-host (cma)"] += lmshare_fetch(
                            ucx, peer, namespace, keys, size, repeats, rounds=1)
                    runs["host memcpy"].append(baselines.memcpy(size, count, repeats))
                    runs["Redis GET"].append(redis_server.get_gbps(size, count, repeats))
                data[label] = runs
    finally:
        tcp.close()
        locating.close()
        sealed.close()
        shm.close()
        if ucx is not None:
            ucx.close()
        redis_server.stop()
    return report(data, redis_server.parser()), data


def report(data: dict[str, dict[str, list[float]]], redis_parser: str) -> str:
    rows = []
    for label, runs in data.items():
        med = {path: median(values) if values else float("nan") for path, values in runs.items()}
        rows.append([label] + [f"{med[p]:.2f} ± {statistics.pstdev(runs[p]):.2f}" if runs[p]
                               else "n/a" for p in PATHS]
                    + [f"{med['lmshare TCP'] / med['raw socket']:.0%}",
                       f"{med['lmshare TCP encrypted'] / med['lmshare TCP']:.0%}",
                       f"{med['lmshare TCP'] / med['Mooncake TCP']:.1f}x",
                       f"{med['lmshare same-host shm'] / med['host memcpy']:.0%}",
                       f"{min(v for p, v in med.items() if p.startswith('lmshare') and 'encrypted' not in p) / med['Redis GET']:.1f}x"])
    text = table(["chunk", *[f"{p} GB/s" for p in PATHS], "TCP / raw (≥ 90%)", "encrypted / TCP",
                  "TCP / Mooncake TCP (≥ 1x)",
                  "shm / memcpy (≥ 70%)", "slowest lmshare / Redis (≥ 3x)"], rows)
    return text + (
        "\n\nEach request fetches several chunks (4 MiB: 8, 32 MiB: 4) into fresh slabs of the "
        "reader's pool; every path moves the same bytes. Medians of "
        f"{len(next(iter(data.values()))['lmshare TCP'])} interleaved rounds, "
        f"± population std-dev. Redis: pipelined GETs, {redis_parser}. Mooncake: transfer "
        "engine (mooncake-transfer-engine-non-cuda) over tcp, P2P handshake, one batch read per "
        "request. lmshare TCP encrypted: the same fetches with AES-256-GCM records (`worker "
        "--encrypt`). lmshare UCX: one-sided GET through the UCP C API (UCX 1.21 from libucx-cu12); "
        "over tcp UCX emulates GET with messages, which is why it is slow here and why a "
        "worker only offers UCX by default on hosts with RDMA hardware.")


def mooncake(size: int, count: int, repeats: int) -> list[float]:
    """Mooncake's TCP transfer engine, or nothing where it cannot run (reported as n/a)."""
    try:
        from benchmarks import mooncake_baseline

        return mooncake_baseline.measure(size, count, repeats, rounds=1)
    except (ImportError, RuntimeError) as exc:
        log.warning("Mooncake baseline unavailable: %s", exc)
        return []


def plot(data: dict[str, dict[str, list[float]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(data)
    paths = list(next(iter(data.values())))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(paths)
    for i, p in enumerate(paths):
        values = [median(data[label][p]) if data[label][p] else 0.0 for label in labels]
        bars = ax.bar([x + i * width for x in range(len(labels))], values, width, label=p)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks([x + width * (len(paths) - 1) / 2 for x in range(len(labels))], labels)
    ax.set_ylabel("GB/s (median)")
    ax.set_title("Fetching one KV chunk from a peer on this host")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    text, results = run(**command_line(__doc__, sys.argv[1:], rounds=9))
    print(text)
