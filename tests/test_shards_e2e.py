"""Two controller shards (``--shard 0/2``, ``--shard 1/2``) and two workers, as operators run
them: separate processes started through the ``lmshare`` CLI."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lmshare import ModelSignature
from lmshare.errors import ErrorCode, RemoteError
from lmshare.keys import signature_keys
from lmshare.local_cluster import LocalCluster
from lmshare.shards import shard_of
from lmshare.testing.waiting import slack, wait_until

SIG = ModelSignature(model="shards-e2e", chunk_tokens=16)
CHUNKS = 6
LOOKUP_DEADLINE_S = 1.0  # the worker's controller deadline (WorkerConfig.rpc_timeout_s)


def spanning_doc(start: int) -> tuple[list[int], list[bytes], int]:
    """A prompt whose keys start on shard 0 and reach shard 1 at chunk 2 or later: its tokens,
    its keys and its first key of shard 1."""
    for seed in itertools.count(start):
        tokens = [seed * 1000 + i for i in range(CHUNKS * SIG.chunk_tokens)]
        keys = signature_keys(SIG, tokens)
        owners = [shard_of(key, 2) for key in keys]
        if owners[0] == 0 and 1 in owners and owners.index(1) >= 2:
            return tokens, keys, owners.index(1)
    raise AssertionError("unreachable")


def payloads() -> list[bytes]:
    return [os.urandom(4096) for _ in range(CHUNKS)]


WRITTEN: set[bytes] = set()  # the keys this module's tests stored (they are never evicted)


def put(client, tokens: list[int], data: list[bytes] | None = None) -> int:
    """Store ``tokens``' chunks through ``client``, remembering their keys in WRITTEN."""
    WRITTEN.update(signature_keys(SIG, tokens))
    return client.put(SIG, tokens, data or payloads())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(heartbeat_timeout_s=3.0, runtime_dir=tmp_path_factory.mktemp("shards"))
    try:
        c.start_shards(2, "--heartbeat-interval", "0.3")
        c.start_worker("a")
        c.start_worker("b")
        yield c
    finally:
        c.stop()


def shard_stats(cluster: LocalCluster, shard: int) -> dict:
    client = cluster.controller_client(timeout_s=5.0, shard=shard)
    try:
        return client.call("stats")
    finally:
        client.close()


def test_chunks_written_on_one_worker_are_found_through_the_other(cluster):
    tokens, keys, _ = spanning_doc(1)
    data = payloads()
    with cluster.client("a") as a, cluster.client("b") as b:
        assert put(a, tokens, data) == CHUNKS
        wait_until(lambda: b.lookup(SIG, tokens + [7]).peer_tokens == CHUNKS * SIG.chunk_tokens,
                   10, "b to find all of a's chunks through both shards")
        assert b.get(SIG, tokens) == data
    for shard in (0, 1):
        own = [key for key in keys if shard_of(key, 2) == shard]
        client = cluster.controller_client(timeout_s=5.0, shard=shard)
        try:
            # a wrote them, b fetched them: the shard that owns them lists both
            wait_until(lambda client=client, own=own: [sorted(h) for h in client.call(
                "lookup", namespace=SIG.namespace(), keys=own)["holders"]]
                == [["a", "b"]] * len(own), 10, f"shard {shard} to index a's and b's chunks")
        finally:
            client.close()
        # and it indexes its own keys only (of every prompt this module's tests stored)
        reply = shard_stats(cluster, shard)
        assert reply["stats"]["chunks_indexed"] == sum(
            1 for key in WRITTEN if shard_of(key, 2) == shard)
        assert reply["shard"] == reply["stats"]["shard"] == f"{shard}/2"


def test_a_stopped_shard_ends_the_prefix_at_its_first_key(cluster):
    tokens, keys, first_of_shard1 = spanning_doc(100)
    with cluster.client("a") as a, cluster.client("b") as b:
        put(a, tokens)
        full = CHUNKS * SIG.chunk_tokens
        wait_until(lambda: b.lookup(SIG, tokens + [7]).tokens == full, 10, "the doc indexed")
        before = b.stats()["counters"]["miss_controller_unreachable"]
        shard1 = cluster.shard_controllers[0]
        shard1.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            result = b.lookup(SIG, tokens + [7])
            elapsed = time.monotonic() - started
            assert result.tokens == first_of_shard1 * SIG.chunk_tokens
            assert result.misses[0] == ("controller_unreachable", CHUNKS - first_of_shard1)
            assert elapsed < (LOOKUP_DEADLINE_S + 1.0) * slack()  # one deadline, not more
            assert b.stats()["counters"]["miss_controller_unreachable"] \
                == before + CHUNKS - first_of_shard1
        finally:
            shard1.process.send_signal(signal.SIGCONT)
        wait_until(lambda: b.lookup(SIG, tokens + [7]).tokens == full, 20,
                   "the whole prefix once shard 1 answers again")


def test_a_worker_given_the_shards_in_the_wrong_order_says_so(cluster):
    p0, p1 = cluster.shard_ports
    env = {**cluster.env(), "LMSHARE_SHM_DIR": str(cluster.runtime_dir)}
    result = subprocess.run(
        [sys.executable, "-m", "lmshare", "worker", "--controller",
         f"127.0.0.1:{p1};127.0.0.1:{p0}", "--name", "misordered", "--cache-size", "4MiB",
         "--endpoint", f"ipc://{cluster.runtime_dir / 'misordered.sock'}"],
        capture_output=True, text=True, env=env, timeout=60 * slack())
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "is shard 1/2" in errors[0] and "as shard 0/2" in errors[0]
    assert "in order" in errors[0]


def test_a_foreign_key_is_refused_and_the_shard_keeps_serving(cluster):
    tokens, keys, first_of_shard1 = spanning_doc(200)
    foreign = keys[0]  # shard 0's
    client = cluster.controller_client(timeout_s=5.0, shard=1)
    try:
        with pytest.raises(RemoteError) as refused:
            client.call("lookup", namespace=SIG.namespace(), keys=[keys[first_of_shard1],
                                                                   foreign])
        assert refused.value.code == ErrorCode.WRONG_SHARD
        assert "shard 1/2" in refused.value.message
        epoch = client.call("register", worker_id="intruder", host="127.0.0.1", data_port=9,
                            transports=["tcp"], capacity_bytes=1, host_id="h")["epoch"]
        with pytest.raises(RemoteError) as refused:
            client.call("batch", worker_id="intruder", epoch=epoch, seq=1,
                        admit={SIG.namespace(): [foreign]}, evict=[])
        assert refused.value.code == ErrorCode.WRONG_SHARD
        assert client.call("ping")["shard"] == "1/2"
        client.call("deregister", worker_id="intruder", epoch=epoch)
    finally:
        client.close()
    with cluster.client("a") as a, cluster.client("b") as b:  # the cluster still works
        put(a, tokens)
        wait_until(lambda: b.lookup(SIG, tokens + [7]).peer_tokens == CHUNKS * SIG.chunk_tokens,
                   10, "a new doc found across both shards")


def run_cli(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "lmshare", *args, "--controller",
                             cluster.controller_address], capture_output=True, text=True,
                            env=cluster.env(), timeout=120 * slack())
    assert result.returncode == 0, result.stderr
    return result


def test_status_dashboard_and_explain_read_every_shard(cluster):
    tokens, keys, first_of_shard1 = spanning_doc(400)
    with cluster.client("a") as a, cluster.client("b") as b:
        put(a, tokens)
        wait_until(lambda: b.lookup(SIG, tokens + [7]).peer_tokens == CHUNKS * SIG.chunk_tokens,
                   10, "the doc indexed on both shards")
    parts = [shard_stats(cluster, shard)["stats"]["chunks_indexed"] for shard in (0, 1)]
    status = json.loads(run_cli(cluster, "status", "--json").stdout)
    assert [(v["shard"], v["chunks_indexed"], v["error"]) for v in status["shards"]] == [
        ("0/2", parts[0], ""), ("1/2", parts[1], "")]
    assert status["chunks_indexed"] == sum(parts)
    assert {w["worker_id"] for w in status["workers"]} >= {"a", "b"}
    text = run_cli(cluster, "status").stdout
    assert f"shard 0/2 {parts[0]:,} chunks indexed" in text
    assert f"shard 1/2 {parts[1]:,} chunks indexed" in text
    frame = run_cli(cluster, "dashboard", "--once").stdout
    assert "shard 0/2" in frame and "shard 1/2" in frame
    explained = json.loads(run_cli(cluster, "explain", "--tokens", ",".join(map(str, tokens)),
                                   "--namespace", SIG.namespace().hex(), "--chunk-tokens",
                                   str(SIG.chunk_tokens), "--worker", "b", "--json").stdout)
    assert explained["hit_chunks"] == CHUNKS  # both shards' chunks, in the prompt's order
    assert [c["holders"][0]["worker"] for c in explained["chunks"]] == ["a"] * CHUNKS


def test_a_leaving_worker_hands_its_chunks_on_through_every_shard(cluster):
    tokens, keys, _ = spanning_doc(300)
    data = payloads()
    cluster.start_worker("c")
    with cluster.client("c") as c:
        assert put(c, tokens, data) == CHUNKS
    with cluster.client("a") as a:
        wait_until(lambda: a.lookup(SIG, tokens + [7]).peer_tokens == CHUNKS * SIG.chunk_tokens,
                   10, "c's chunks indexed on both shards")
        leaving = cluster.workers["c"]
        leaving.process.send_signal(signal.SIGTERM)
        assert leaving.process.wait(leaving.stop_timeout_s * slack()) == 0
        # each shard handed its own keys to a or b: all of them are still held
        assert a.lookup(SIG, tokens + [7]).tokens == CHUNKS * SIG.chunk_tokens
        assert a.get(SIG, tokens) == data
    log = leaving.log_text()
    assert f"{CHUNKS} held only here" in log and f"{CHUNKS} copied" in log, log[-2000:]
