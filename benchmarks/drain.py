"""A leaving worker: graceful drain against a plain leave.

Three workers (started through the CLI, TCP between them) each computed their own share of
``DOCS`` documents, so a third of the cluster's chunks are held by one worker only. That worker
then leaves on SIGTERM, once with ``--drain-timeout 10`` (it hands the chunks only it holds to
its peers first) and once with ``--drain-timeout 0`` (a plain leave). Measured after it left:
the share of its chunks the cluster still holds, and the next ``WINDOW_S`` seconds of traffic
(requests for all documents, uniformly, at ``RATE`` per second on the two remaining workers;
a chunk no worker holds is recomputed and stored, as an engine would): the share of chunks
served from a peer, locally, or recomputed.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import tempfile
import time

from benchmarks.common import command_line, table
from lmshare.keys import ModelSignature
from lmshare.local_cluster import LocalCluster
from lmshare.testing.waiting import wait_until

SIG = ModelSignature(model="drain-bench", chunk_tokens=16)
DOCS = 48
CHUNKS = 8  # per document
CHUNK_BYTES = 200_000
WINDOW_S = 60.0
EARLY_S = 10.0  # the window's first seconds, reported on their own
RATE = 10.0  # requests per second
WORKERS = ("bench-leaver", "bench-b", "bench-c")


def document(index: int) -> list[int]:
    return [index * 100_000 + t for t in range(CHUNKS * SIG.chunk_tokens)]


def chunks(index: int) -> list[bytes]:
    return [os.urandom(CHUNK_BYTES) for _ in range(CHUNKS)]


def held_chunks(client, docs: list[int]) -> int:
    return sum(client.lookup(SIG, document(d)).tokens // SIG.chunk_tokens for d in docs)


def one_leave(drain_timeout: str, seed: int) -> dict:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="lmshare-drain-bench-") as runtime, \
            LocalCluster(heartbeat_timeout_s=5.0, runtime_dir=runtime) as cluster:
        os.environ["LMSHARE_KEY_FILE"] = cluster.key_file or ""
        cluster.start_controller()
        for name in WORKERS:
            cluster.start_worker(name, "128MiB", "--transports", "tcp",
                                 "--drain-timeout", drain_timeout if name == WORKERS[0] else "10")
        clients = {name: cluster.client(name) for name in WORKERS}
        leaver_docs = [d for d in range(DOCS) if d % len(WORKERS) == 0]
        for d in range(DOCS):  # each worker computed its own share
            clients[WORKERS[d % len(WORKERS)]].put(SIG, document(d), chunks(d))
        wait_until(lambda: cluster.stats().chunks_indexed == DOCS * CHUNKS, 30,
                   "every chunk indexed")
        reader = clients[WORKERS[1]]
        before = held_chunks(reader, leaver_docs)

        started = time.monotonic()
        cluster.workers[WORKERS[0]].process.send_signal(signal.SIGTERM)
        code = cluster.workers[WORKERS[0]].process.wait(60)
        leave_s = time.monotonic() - started
        clients.pop(WORKERS[0]).close()
        wait_until(lambda: WORKERS[0] in {w.worker_id for w in cluster.stats().workers
                                          if w.state == "left"}, 10, "the leave registered")
        after = held_chunks(reader, leaver_docs)

        counts = {"local": 0, "peer": 0, "recomputed": 0}
        leaver = {"local": 0, "peer": 0, "recomputed": 0}
        early = {"local": 0, "peer": 0, "recomputed": 0}  # the first EARLY_S of the window
        began = time.monotonic()
        deadline = began + WINDOW_S
        next_at = time.monotonic()
        requests = 0
        stayers = WORKERS[1:]
        while time.monotonic() < deadline:
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at += 1.0 / RATE
            d = rng.randrange(DOCS)
            client = clients[stayers[requests % len(stayers)]]
            requests += 1
            with client.acquire(SIG, document(d)) as hit:
                local, peer = hit.local_chunks, hit.peer_chunks
            missing = CHUNKS - local - peer
            if missing:  # recompute the rest and store it, as the engine would
                client.put(SIG, document(d), chunks(d))
            buckets = [counts] + ([leaver] if d in leaver_docs else []) + (
                [early] if time.monotonic() - began < EARLY_S else [])
            for bucket in buckets:
                bucket["local"] += local
                bucket["peer"] += peer
                bucket["recomputed"] += missing
        log = cluster.workers[WORKERS[0]].log_text()
        drained = [line.split("lmshare.worker.handoff: ", 1)[1] for line in log.splitlines()
                   if "lmshare.worker.handoff: drained" in line]
        for client in clients.values():
            client.close()
    asked = sum(counts.values())
    asked_leaver = sum(leaver.values())
    return {"drain_timeout": drain_timeout, "exit_code": code, "leave_s": round(leave_s, 2),
            "leaver_chunks": before, "still_held": after, "requests": requests,
            "chunks": counts, "leaver_doc_chunks": leaver,
            "peer_rate": counts["peer"] / asked if asked else 0.0,
            "hit_rate": (counts["peer"] + counts["local"]) / asked if asked else 0.0,
            "recompute_rate": counts["recomputed"] / asked if asked else 0.0,
            "leaver_recompute_rate": leaver["recomputed"] / asked_leaver if asked_leaver else 0.0,
            "early_chunks": early,
            "early_recompute_rate": early["recomputed"] / max(1, sum(early.values())),
            "drain_log": drained[0] if drained else ""}


def run(window_s: float | None = None) -> tuple[str, dict]:
    global WINDOW_S
    if window_s is not None:
        WINDOW_S = window_s
    results = [one_leave("0", seed=1), one_leave("10", seed=1)]
    rows = []
    for name, r in zip(("plain leave (`--drain-timeout 0`)", "drained leave (`--drain-timeout 10`)"),
                       results):
        rows.append([name, f"{r['leave_s']:.2f} s", f"{r['still_held']} / {r['leaver_chunks']} "
                     f"({r['still_held'] / max(1, r['leaver_chunks']):.0%})",
                     f"{r['peer_rate']:.1%}", f"{r['hit_rate']:.1%}", f"{r['recompute_rate']:.1%}",
                     f"{r['early_recompute_rate']:.1%}", f"{r['leaver_recompute_rate']:.1%}"])
    text = (f"3 workers (128 MiB each, TCP), {DOCS} documents × {CHUNKS} chunks × "
            f"{CHUNK_BYTES // 1000} kB, each worker computed a third; the leaver then gets "
            f"SIGTERM. Traffic: {WINDOW_S:.0f} s at {RATE:.0f} requests/s, documents drawn "
            "uniformly, on the two remaining workers (misses recomputed and stored).\n\n"
            + table(["leave", "SIGTERM → exit", "leaver's chunks still in the cluster",
                     f"peer hits, next {WINDOW_S:.0f} s", "hits (local + peer)",
                     "chunks recomputed", f"recomputed, first {EARLY_S:.0f} s",
                     "recomputed, leaver's documents"], rows)
            + f"\n\nDrained worker's log: `{results[1]['drain_log']}`")
    return text, {"runs": results, "window_s": WINDOW_S, "rate": RATE, "docs": DOCS,
                  "chunks": CHUNKS, "chunk_bytes": CHUNK_BYTES}


if __name__ == "__main__":
    command_line(__doc__, sys.argv[1:])
    print(run()[0])
