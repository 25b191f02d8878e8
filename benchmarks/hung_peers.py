"""Local requests while peers hang: a worker (started through the CLI) serves lookups and
acquires of its own chunks while 8 clients' acquires wait on a holder that accepts connections
and never answers, against the same requests with no peer fetch in flight.

Rounds alternate between the two conditions; each request is a local lookup (peers asked too,
as vLLM's scheduler does) plus an acquire and release of the local chunks. Target: p99 < 50 ms
while peers hang (the fetch deadline here is 5 s: a request that queued behind a fetch would
take seconds).
"""

from __future__ import annotations

import os
import threading
import time

from benchmarks.common import median, percentile, progress, table
from lmshare.keys import ModelSignature
from lmshare.local_cluster import LocalCluster
from lmshare.testing.hanging_peer import hanging_holder
from lmshare.testing.waiting import wait_until

SIG = ModelSignature(model="hung-peers-bench", chunk_tokens=16)
WAITERS = 8
CONDITIONS = ("no peer fetch in flight", f"{WAITERS} fetches hanging on a peer")


def local_round(client, tokens: list[int], requests: int) -> list[float]:
    """Seconds of each lookup + acquire + release of ``tokens``' local chunks."""
    latencies = []
    for _ in range(requests):
        started = time.perf_counter()
        if client.lookup(SIG, tokens, peers=True).local_tokens != len(tokens):
            raise RuntimeError("the local chunks went missing")
        with client.acquire(SIG, tokens) as hit:
            if hit.local_chunks != len(tokens) // SIG.chunk_tokens:
                raise RuntimeError("the local chunks went missing")
        latencies.append(time.perf_counter() - started)
    return latencies


def run(rounds: int = 10, requests: int = 50) -> tuple[str, dict]:
    """Each round: local requests with no fetch in flight, then a fresh hanging holder (a new
    name, new chunks: the worker has no history of it) and ``WAITERS`` acquires of its chunks,
    and the same local requests while they wait."""
    local = list(range(4 * SIG.chunk_tokens))
    samples: dict[str, list[float]] = {name: [] for name in CONDITIONS}
    with LocalCluster() as cluster:
        cluster.start_controller()
        cluster.start_worker("w", "64MiB", "--fetch-timeout", "5")
        with cluster.client("w") as client:
            client.put(SIG, local, [os.urandom(256 << 10) for _ in range(4)])
            for number in progress(range(rounds), "hung peers", rounds):
                wait_until(lambda: client.stats()["counters"]["in_flight_fetches"] == 0,
                           15, "the last round's fetches timing out")
                samples[CONDITIONS[0]] += local_round(client, local, requests)
                remote = [t + 10**6 * (number + 1) for t in range(4 * SIG.chunk_tokens)]
                with hanging_holder(cluster, SIG, remote, name=f"hanging-{number}"):
                    wait_until(lambda r=remote: client.lookup(SIG, r).peer_tokens == len(r),
                               10, "the hanging holder's chunks in the index")
                    waiters = [threading.Thread(target=acquire_once, daemon=True,
                                                args=(cluster, remote))
                               for _ in range(WAITERS)]
                    for thread in waiters:
                        thread.start()
                    wait_until(lambda: client.stats()["counters"]["in_flight_fetches"] >= 1,
                               10, "fetches waiting on the hanging peer")
                    latencies = local_round(client, local, requests)
                    if client.stats()["counters"]["in_flight_fetches"] >= 1:  # still hanging
                        samples[CONDITIONS[1]] += latencies
                    for thread in waiters:
                        thread.join()
    rows = [[name, len(s), f"{median(s) * 1e3:.2f}", f"{percentile(s, 0.99) * 1e3:.2f}",
             f"{max(s) * 1e3:.1f}"] for name, s in samples.items()]
    text = table(["condition", "requests", "p50 ms", "p99 ms", "max ms"], rows)
    return text, {"samples_s": samples, "rounds": rounds, "requests": requests}


def acquire_once(cluster: LocalCluster, tokens: list[int]) -> None:
    with cluster.client("w", timeout_s=30) as client:
        client.acquire(SIG, tokens).release()
