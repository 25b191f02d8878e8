"""Why a chunk was missed, through a real cluster (controller and workers started by the CLI):
each lookup says, per chunk past its hit, why; workers and the controller count it by reason
in their Prometheus endpoints, and the controller's stats carry the last minute's reasons."""

import os
import signal
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmshare import ModelSignature
from lmshare.errors import WorkerUnavailable
from lmshare.keys import signature_keys
from lmshare.local_cluster import LocalCluster, free_port
from lmshare.misses import RecentKeys, parse_runs
from lmshare.testing.waiting import wait_until
from tests.test_metrics import scrape, scrape_when_up, value

SIG = ModelSignature(model="miss-reasons-model", chunk_tokens=16)
NEVER_STORED = ModelSignature(model="miss-reasons-model", chunk_tokens=16, kv_dtype="float16")
CHUNK_BYTES = 512 * 1024  # two 256 KiB slabs: a 2 MiB pool holds 4 chunks
TAIL = [7, 7, 7]  # a partial last chunk


def doc(seed: int, chunks: int) -> list[int]:
    return [seed * 1000 + i for i in range(chunks * SIG.chunk_tokens)]


def payloads(chunks: int) -> list[bytes]:
    return [os.urandom(CHUNK_BYTES) for _ in range(chunks)]


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    c = LocalCluster(heartbeat_timeout_s=1.5, runtime_dir=tmp_path)
    monkeypatch.setenv("LMSHARE_KEY_FILE", c.key_file)
    try:
        yield c
    finally:
        c.stop()


def misses_of(client, name: str) -> int:
    return client.stats()["counters"][f"miss_{name}"]


def test_each_miss_says_why_and_is_counted_by_reason(cluster):
    controller_port, reader_port = free_port(), free_port()
    cluster.start_controller("--heartbeat-interval", "0.3", "--metrics-port",
                             str(controller_port))
    cluster.start_worker("mr-holder", "32MiB")
    cluster.start_worker("mr-reader", "32MiB", "--metrics-port", str(reader_port),
                         "--fetch-timeout", "1")
    cluster.start_worker("mr-doomed", "32MiB")
    cluster.start_worker("mr-small", "2MiB")
    holder, reader, doomed, small = (cluster.client(n) for n in
                                     ("mr-holder", "mr-reader", "mr-doomed", "mr-small"))
    ns = SIG.namespace()

    # a model signature no worker ever stored: every full chunk says so, the tail is partial
    assert reader.lookup(NEVER_STORED, doc(1, 5) + TAIL).misses == (
        ("unknown_namespace", 5), ("partial_chunk", 1))

    # two chunks held by a peer, three never computed
    doc_a = doc(2, 5)
    holder.put(SIG, doc_a, payloads(2))
    keys_a = signature_keys(SIG, doc_a)
    wait_until(lambda: reader.lookup_plan(ns, keys_a, count=False).peer == 2, 5,
               "the holder's chunks in the index")
    hit = reader.lookup(SIG, doc_a + TAIL)
    assert hit.peer_tokens == 32
    assert hit.misses == (("new_prefix", 3), ("partial_chunk", 1))

    # once the holder's throughput is measured, an engine that recomputes faster than it
    # fetches is not offered its chunks
    assert len(reader.get(SIG, doc_a)) == 2
    doc_f = doc(3, 3)
    holder.put(SIG, doc_f, payloads(3))
    keys_f = signature_keys(SIG, doc_f)
    wait_until(lambda: reader.lookup_plan(ns, keys_f, count=False).peer == 3, 5, "doc f indexed")
    plan = reader.lookup_plan(ns, keys_f, chunk_tokens=16, recompute_tokens_per_s=1e12,
                              chunk_bytes=CHUNK_BYTES)
    assert len(plan) == 0 and plan.misses == (("recompute_faster", 3),)

    # a worker whose pool is too small evicted the first chunk: the prefix stops there, and
    # the chunk it still holds behind it is missed for the same reason
    doc_c = doc(4, 2)
    small.put(SIG, doc_c, payloads(2))
    small.put(SIG, doc(5, 3), payloads(3))  # 5 chunks in a pool of 4: the oldest goes
    assert small.lookup(SIG, doc_c).misses == (("evicted", 2),)
    # another worker asking learns it from the controller: its last holder evicted it
    keys_c = signature_keys(SIG, doc_c)
    wait_until(lambda: reader.lookup_plan(ns, keys_c, count=False).misses == (("evicted", 2),),
               5, "the eviction reported to the controller")

    # the only holder dies: the fetch a plan promised fails at once; once the controller has
    # declared it dead, its chunks are missed because their holder is gone
    doc_b = doc(6, 5)
    doomed.put(SIG, doc_b, payloads(5))
    keys_b = signature_keys(SIG, doc_b)
    plan = wait_until(lambda: (p := reader.lookup_plan(ns, keys_b, count=False)).peer == 5 and p,
                      5, "doc b indexed")
    cluster.workers["mr-doomed"].process.send_signal(signal.SIGKILL)
    cluster.workers["mr-doomed"].process.wait(5)
    failed = misses_of(reader, "fetch_failed")
    with reader.acquire_keys(ns, keys_b, holders=plan.holders) as got:
        assert len(got) == 0
    assert misses_of(reader, "fetch_failed") == failed + 5
    wait_until(lambda: any(w.worker_id == "mr-doomed" and w.state == "dead"
                           for w in cluster.stats().workers), 5, "the holder declared dead")
    assert reader.lookup(SIG, doc_b).misses == (("holder_gone", 5),)

    # the worker's endpoint counts by reason; the controller relays it per worker
    samples = scrape_when_up(reader_port)
    name = "lmshare_worker_lookup_chunks_total"
    for reason, count in (("unknown_namespace", 5), ("new_prefix", 3), ("recompute_faster", 3),
                          ("fetch_failed", 5), ("holder_gone", 5), ("deadline", 0)):
        assert value(samples, name, result="miss", reason=reason) == count, reason
    assert value(samples, name, result="miss", reason="partial_chunk") == 2
    assert value(samples, name, result="hit", reason="peer") == 2
    controller_name = "lmshare_controller_lookup_chunks_total"
    wait_until(lambda: value(scrape(controller_port), controller_name, worker="mr-reader",
                             result="miss", reason="holder_gone") == 5, 10,
               "the reader's counts relayed to the controller")
    assert value(scrape(controller_port), controller_name, worker="mr-small", result="miss",
                 reason="evicted") == 2
    # the dashboard's last minute, by reason (sampled once a second)
    wait_until(lambda: (r := cluster.stats().miss_reasons).get("holder_gone") == 5
               and r.get("evicted") == 2, 5, "the last minute's misses by reason")
    status = subprocess.run([sys.executable, "-m", "lmshare", "status", "--controller",
                             cluster.controller_address], capture_output=True, text=True,
                            timeout=30)
    assert status.returncode == 0, status.stderr
    missed = next(line for line in status.stdout.splitlines() if line.startswith("missed in"))
    assert "holder_gone 5 (" in missed and "evicted 2 (" in missed
    # a lookup answered after the asker's deadline (the controller is stopped, so the worker
    # waits for it) is counted as missed for that reason: the asker computed the prompt
    late = misses_of(reader, "deadline")
    os.kill(cluster.controller.process.pid, signal.SIGSTOP)
    try:
        with cluster.client("mr-reader", timeout_s=0.3) as impatient:
            with pytest.raises(WorkerUnavailable):
                impatient.lookup(SIG, doc(7, 3))
        wait_until(lambda: misses_of(reader, "deadline") == late + 3, 10, "the late lookup")
    finally:
        os.kill(cluster.controller.process.pid, signal.SIGCONT)

    assert value(scrape(reader_port), name, result="miss", reason="deadline") == 3
    for client in (holder, reader, doomed, small):
        client.close()


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(1, 8), keys=st.lists(st.binary(min_size=1, max_size=2), max_size=60))
def test_recent_keys_keep_the_last_ones_in_fixed_space(capacity, keys):
    recent = RecentKeys(capacity)
    half = len(keys) // 2  # one at a time, then the rest in one call
    for i, key in enumerate(keys[:half]):
        recent.add(key, i)
    recent.add_many((key, half + i) for i, key in enumerate(keys[half:]))
    assert len(recent) <= capacity
    newest: dict[bytes, int] = {}
    for i, key in enumerate(keys):
        newest[key] = i
    # a key is kept exactly when it was added among the last `capacity` adds (the ring
    # overwrote everything older), with the value of its latest add
    for key, last in newest.items():
        assert (key in recent) == (last >= len(keys) - capacity)
        if key in recent:
            assert recent.get(key) == last


def test_miss_runs_from_a_peer_are_checked():
    assert parse_runs([["evicted", 2], ["partial_chunk", 1]], 3) == (("evicted", 2),
                                                                       ("partial_chunk", 1))
    for hostile in ([["evicted", 4]], [["no_such_reason", 1]], [["evicted", 0]],
                    [["evicted", True]], "evicted", [["evicted"]], None):
        assert parse_runs(hostile, 3) == ()
