"""The vLLM connector's two sides, each built from plain parts, with a fake worker client and
fake vLLM scheduler objects: hit decisions, loads into blocks, stores, failures; and the facade
vLLM loads, on a config-shaped object. No engine is started (see test_vllm_e2e.py)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from vllm.config import KVTransferConfig  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.v1.core.sched.output import CachedRequestData  # noqa: E402

from lmshare.client import PrefixPlan  # noqa: E402
from lmshare.errors import ConfigError, WorkerUnavailable  # noqa: E402
from lmshare.integrations.kv_copy import (  # noqa: E402
    AsyncDeviceCopier,
    CpuBlockCopier,
    InlineStreamOps,
    KVGeometry,
    buffer_address,
    make_copier,
)
from lmshare.integrations.vllm import LMShareConnector  # noqa: E402
from lmshare.integrations.vllm.link import WorkerLink  # noqa: E402
from lmshare.integrations.vllm.metadata import LMShareMetadata, LMShareWorkerMetadata  # noqa: E402
from lmshare.integrations.vllm.scheduler import LMShareConnectorScheduler  # noqa: E402
from lmshare.integrations.vllm.settings import ConnectorSettings  # noqa: E402
from lmshare.integrations.vllm.worker import LMShareConnectorWorker  # noqa: E402
from lmshare.keys import ModelSignature  # noqa: E402
from lmshare.testing.fake_vllm import (  # noqa: E402
    LAYERS,
    PAGE,
    block_bytes,
    fake_config,
    fake_kv_caches,
)
from lmshare.testing.waiting import wait_until  # noqa: E402

pytestmark = pytest.mark.vllm

BLOCK = 32
CHUNK = 64  # 2 blocks


class FakeHit:
    def __init__(self, chunks, local, peer, peer_memory=None, changed=()):
        self._chunks, self.local_chunks, self.peer_chunks = chunks, local, peer
        self.released = False
        self._peer_memory = peer_memory  # direct hits: the "peer's pool" the chunks are in
        self._changed = set(changed)  # chunk indexes whose slabs the peer reused meanwhile

    def __len__(self):
        return len(self._chunks)

    def views(self, index):
        data = memoryview(self._chunks[index])
        half = len(data) // 3
        return [data[:half], data[half:]]  # as if split over two slabs

    def release(self):
        self.released = True

    def region_buffer(self, index):
        return self._peer_memory if index >= self.local_chunks else None

    def verify(self, index):
        return index not in self._changed


class FakeCluster:
    """Chunks by key; ``local`` holds what the local worker has, ``peer`` what others have."""

    def __init__(self):
        self.local: dict[bytes, bytes] = {}
        self.peer: dict[bytes, bytes] = {}
        self.lose_after: int | None = None  # acquire delivers at most this many chunks
        self.changed_in_peer: set[bytes] = set()  # direct reads of these keys fail verify
        self.direct_acquires = 0
        self.peer_memory: bytearray | None = None  # the peer's pool direct reads are in
        self.calls: list[str] = []
        self.lookup_rates: list[float | None] = []  # recompute rate each lookup carried
        self.hits: list[FakeHit] = []
        self.acquired_holders: list = []  # the holders each acquire was given
        self.signatures: list = []  # the signature each lookup carried
        self.mismatch = ""  # the worker's diagnosis of the namespace, in each lookup's reply

    def client(self, **kwargs):
        return FakeClient(self)


class FakeClient:
    def __init__(self, cluster):
        self.cluster = cluster
        self.on_peer_unmap = None  # set by the connector, called when a peer's pool goes

    def _prefix(self, keys, peers):
        local = peer = 0
        for key in keys:
            if key in self.cluster.local:
                local += 1
            elif peers and key in self.cluster.peer:
                peer += 1
            else:
                break
        return local, peer

    def lookup_plan(self, namespace, keys, peers=True, count=True, chunk_tokens=0,
                    recompute_tokens_per_s=None, chunk_bytes=0, direct=False, signature=None,
                    tail_tokens=0):
        self.cluster.calls.append("lookup" if count else "lookup again")
        self.cluster.lookup_rates.append(recompute_tokens_per_s)
        self.cluster.signatures.append(signature)
        local, peer = self._prefix(keys, peers)
        return PrefixPlan(local, peer, tuple(
            () if key in self.cluster.local else ("node-b",) for key in keys[: local + peer]),
            self.cluster.mismatch)

    def acquire_keys(self, namespace, keys, peers=True, lease_s=30.0, direct=False,
                     holders=None, chunk_bytes=None):
        self.cluster.calls.append("acquire")
        assert chunk_bytes == LAYERS * (CHUNK // BLOCK) * PAGE  # the engine's own chunk size
        self.cluster.acquired_holders.append(holders)
        local, peer = self._prefix(keys, peers)
        n = local + peer
        if self.cluster.lose_after is not None:
            n = min(n, self.cluster.lose_after)
        chunks = []
        for key in keys[:n]:
            data = self.cluster.local.get(key) or self.cluster.peer[key]
            self.cluster.local[key] = data
            chunks.append(data)
        if direct and peer:
            self.cluster.direct_acquires += 1
            memory = self.cluster.peer_memory if self.cluster.peer_memory is not None \
                else bytearray(64)
            hit = FakeHit(chunks, local, peer, peer_memory=memory, changed=[
                i for i, key in enumerate(keys[:n]) if key in self.cluster.changed_in_peer])
        else:
            hit = FakeHit(chunks, local, peer)
        self.cluster.hits.append(hit)
        return hit

    def put_keys(self, namespace, keys, chunks):
        self.cluster.calls.append("put")
        new = 0
        for key, chunk in zip(keys, chunks):
            if key not in self.cluster.local:
                data = bytearray(chunk.nbytes)  # the chunk copies itself, as into pool slabs
                chunk.write_into([memoryview(data)])
                chunk.written()
                self.cluster.local[key] = bytes(data)
                new += 1
        return new

    def stats(self):
        return {"worker_id": "node-a", "transports": ["tcp"]}

    def close(self):
        pass


SIGNATURE = ModelSignature(model="test-model", kv_layout="test", chunk_tokens=CHUNK)


def make_settings(extra=None):
    return ConnectorSettings.from_extra_config(
        {"worker": "node-a", "chunk_tokens": CHUNK, "async_save": False, **(extra or {})}, BLOCK)


class Engine:
    """A scheduler side and a model-worker side over fake KV memory, each built from plain
    parts; the steps pass metadata between them as vLLM does."""

    def __init__(self, cluster, seed=0, extra=None, signature=SIGNATURE,
                 copier_factory=make_copier, scheduler_client=None, worker_client=None,
                 vllm_026=False, summary_s=None):
        self.kv_config = fake_config(vllm_026=vllm_026)
        self.settings = make_settings(extra)
        geometry = KVGeometry.from_kv_cache_config(self.kv_config)
        self.worker_clients = []

        def worker_factory(**kwargs):
            client = (worker_client or cluster.client)(**kwargs)
            self.worker_clients.append(client)
            return client

        self.sched = LMShareConnectorScheduler(
            self.settings, geometry, [signature],
            link=WorkerLink(self.settings, 1.0, client_factory=scheduler_client or cluster.client))
        self.worker = LMShareConnectorWorker(
            self.settings, geometry, tp_rank=0,
            link=WorkerLink(self.settings, 1.0, client_factory=worker_factory),
            copier_factory=copier_factory, summary_s=summary_s)
        self.caches = fake_kv_caches(self.kv_config, seed=seed)
        self.worker.register_kv_caches(self.caches)

    def schedule(self, request, blocks, computed=0, scheduled=None):
        """One scheduling step of a new request; returns (external tokens, metadata)."""
        external, is_async = self.sched.get_num_new_matched_tokens(request, computed)
        assert is_async is False
        self.sched.update_state_after_alloc(
            request, SimpleNamespace(get_block_ids=lambda: (list(blocks),)), external)
        total = len(request.prompt_token_ids)
        new = SimpleNamespace(req_id=request.request_id, block_ids=(list(blocks),),
                              num_computed_tokens=computed + external)
        output = SimpleNamespace(
            scheduled_new_reqs=[new], scheduled_cached_reqs=CachedRequestData.make_empty(),
            num_scheduled_tokens={request.request_id: scheduled or total - computed - external},
            kv_connector_block_state=None)
        return external, self.sched.build_connector_meta(output)

    def schedule_again(self, req_id, computed, scheduled):
        """A later step of a running request (no new blocks); returns the metadata."""
        cached = CachedRequestData(req_ids=[req_id], resumed_req_ids=set(), new_token_ids=[[]],
                                   all_token_ids={}, new_block_ids=[None],
                                   num_computed_tokens=[computed], num_output_tokens=[0])
        output = SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=cached,
                                 num_scheduled_tokens={req_id: scheduled},
                                 kv_connector_block_state=None)
        return self.sched.build_connector_meta(output)

    def run(self, meta):
        """The model worker's part of one step; returns (failed blocks, worker metadata)."""
        self.worker.start_load_kv(meta)
        self.worker.wait_for_save(meta)
        failed = self.worker.get_block_ids_with_load_errors()
        worker_meta = self.worker.build_connector_worker_meta()
        if worker_meta is not None:
            self.sched.update_connector_output(
                SimpleNamespace(kv_connector_worker_meta=worker_meta))
        return failed, worker_meta


def assert_copied(a, src_blocks, b, dst_blocks, layers=range(LAYERS)):
    """Engine ``b``'s blocks hold engine ``a``'s, block for block, in every layer of ``layers``."""
    for layer in layers:
        for src, dst in zip(src_blocks, dst_blocks, strict=True):
            assert block_bytes(b.caches, layer, dst) == block_bytes(a.caches, layer, src)


def request(req_id, tokens, **extra):
    return SimpleNamespace(request_id=req_id, prompt_token_ids=list(tokens), mm_features=[],
                           prompt_embeds=None, lora_request=None, cache_salt=None, **extra)


PROMPT = list(range(1000, 1300))  # 300 tokens: 4 full chunks, 9 full blocks


def test_store_then_peer_load_copies_whole_blocks():
    cluster = FakeCluster()
    a = Engine(cluster, seed=1)
    external, meta = a.schedule(request("a1", PROMPT), range(10))
    assert external == 0 and not meta.loads
    assert [len(s.keys[0]) for s in meta.saves] == [4]
    a.run(meta)
    assert len(cluster.local) == 4
    # the chunks now live on "another worker"
    cluster.peer, cluster.local = cluster.local, {}

    b = Engine(cluster, seed=2)
    blocks_b = [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]
    external, meta = b.schedule(request("b1", PROMPT), blocks_b)
    assert external == 4 * CHUNK  # 256 of 300 tokens
    assert len(meta.loads) == 1 and not meta.saves  # the cluster already holds every chunk
    failed, _ = b.run(meta)
    assert failed == set()
    assert_copied(a, range(8), b, blocks_b[:8])
    wait_until(lambda: all(h.released for h in cluster.hits), 10, "hits released off the step")


def test_vllm_026_shapes_store_and_load(monkeypatch):
    """vLLM 0.26: KVCacheTensor with shared_by (one allocation per layer) and no cache-hit-
    source metrics; a store on one engine and a peer load on another still copy whole blocks."""
    from lmshare.integrations.vllm import compat

    monkeypatch.setattr(compat, "CacheHitSource", None)
    cluster = FakeCluster()
    a = Engine(cluster, seed=1, vllm_026=True)
    _, meta = a.schedule(request("a1", PROMPT), range(10))
    a.run(meta)
    cluster.peer, cluster.local = cluster.local, {}
    b = Engine(cluster, seed=2, vllm_026=True)
    blocks_b = list(range(30, 40))
    external, meta = b.schedule(request("b1", PROMPT), blocks_b)
    assert external == 4 * CHUNK
    assert b.sched.get_external_cache_hit_sources(request("b1", PROMPT), external) == {}
    failed, _ = b.run(meta)
    assert failed == set()
    assert_copied(a, range(8), b, blocks_b[:8])


def test_connector_imports_without_cache_hit_sources():
    """vLLM 0.26 has no vllm.v1.metrics.cache_hit_source: the connector still loads."""
    code = ("import sys\n"
            "import vllm.distributed.kv_transfer.kv_connector.v1.base  # newer vLLM needs it\n"
            "sys.modules['vllm.v1.metrics.cache_hit_source'] = None  # as in vLLM 0.26\n"
            "import lmshare.integrations.vllm as c\n"
            "assert c.compat.CacheHitSource is None and c.LMShareConnector\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_lookups_carry_the_recompute_rate_the_model_workers_measured():
    """The worker offers peer chunks only where fetching beats recomputing: each lookup tells
    it this engine's prefill rate once a model worker has measured one."""
    cluster = FakeCluster()
    engine = Engine(cluster)
    engine.schedule(request("r1", PROMPT), range(10))
    assert cluster.lookup_rates == [None]
    engine.sched.update_connector_output(SimpleNamespace(
        kv_connector_worker_meta=LMShareWorkerMetadata({}, False, 25_000.0)))
    engine.schedule(request("r2", PROMPT[::-1]), range(10, 20))
    assert cluster.lookup_rates[-1] == 25_000.0


def test_a_signature_mismatch_is_logged_once_per_namespace(caplog):
    """Lookups name the signature behind their namespace (salted requests their own), and
    the controller's diagnosis of a namespace nobody shares is logged once, not per request."""
    import logging

    caplog.set_level(logging.WARNING, logger="lmshare")
    cluster = FakeCluster()
    engine = Engine(cluster)
    engine.schedule(request("r1", PROMPT), range(10))
    assert cluster.signatures[-1].namespace() == SIGNATURE.namespace()
    salted = request("r2", PROMPT[::-1])
    salted.cache_salt = "s1"
    engine.schedule(salted, range(10, 20))
    assert cluster.signatures[-1].tenant == "/salt:s1"
    cluster.mismatch = "kv_dtype bfloat16 vs float16"
    for n in range(3):
        engine.schedule(request(f"r{n + 3}", PROMPT[n:]), range(20 + 10 * n, 30 + 10 * n))
    logged = [r.getMessage() for r in caplog.records if "shared with no other" in r.getMessage()]
    assert len(logged) == 1 and "kv_dtype bfloat16 vs float16" in logged[0]
    assert SIGNATURE.namespace().hex()[:12] in logged[0]


def test_hit_leaves_the_last_token_to_vllm():
    cluster = FakeCluster()
    a = Engine(cluster, seed=1)
    prompt = PROMPT[:256]  # exactly 4 chunks
    a.run(a.schedule(request("a1", prompt), range(8))[1])
    b = Engine(cluster, seed=2)
    external, meta = b.schedule(request("b1", prompt), range(8, 16))
    assert external == 256 - BLOCK  # 7 whole blocks; vLLM computes the last block
    assert len(meta.loads[0].block_ids) == 7
    b.run(meta)
    assert_copied(a, range(7), b, range(8, 15), layers=[0])


def test_local_prefix_hit_only_loads_the_rest():
    cluster = FakeCluster()
    a = Engine(cluster, seed=1)
    a.run(a.schedule(request("a1", PROMPT), range(10))[1])
    b = Engine(cluster, seed=2)
    # vLLM's own prefix cache already has 3 blocks (96 tokens)
    external, meta = b.schedule(request("b1", PROMPT), range(10, 20), computed=96)
    assert external == 256 - 96
    load = meta.loads[0]
    assert load.first_chunk == 1 and load.first_block == 3 and len(load.block_ids) == 5
    b.run(meta)
    assert_copied(a, range(3, 8), b, range(13, 18), layers=[1])


def test_missing_chunks_are_reported_as_failed_blocks():
    cluster = FakeCluster()
    a = Engine(cluster, seed=1)
    a.run(a.schedule(request("a1", PROMPT), range(10))[1])
    b = Engine(cluster, seed=2)
    blocks_b = list(range(30, 40))
    external, meta = b.schedule(request("b1", PROMPT), blocks_b)
    assert external == 256
    cluster.lose_after = 1  # the peer died between lookup and load
    failed, worker_meta = b.run(meta)
    assert failed == set(blocks_b[2:8])  # chunks 1..3 -> blocks 2..7
    assert isinstance(worker_meta, LMShareWorkerMetadata)
    assert worker_meta.failed_chunks == {"b1": 1}
    # vLLM recomputes from chunk 1: once computed, chunks 1..3 are stored (0 was loaded)
    meta = b.schedule_again("b1", computed=CHUNK, scheduled=len(PROMPT) - CHUNK)
    assert [(s.first_chunk, len(s.keys[0])) for s in meta.saves] == [(1, 3)]


def test_worker_down_is_a_miss_and_is_not_retried_at_once():
    calls = []

    def down(**kwargs):
        calls.append(1)
        raise WorkerUnavailable("no worker")

    e = Engine(FakeCluster(), scheduler_client=down)
    assert e.sched.get_num_new_matched_tokens(request("r1", PROMPT), 0) == (0, False)
    assert e.sched.get_num_new_matched_tokens(request("r2", PROMPT), 0) == (0, False)
    assert len(calls) == 1  # circuit open for retry_s


def test_load_failure_when_worker_vanishes():
    cluster = FakeCluster()
    a = Engine(cluster, seed=1)
    a.run(a.schedule(request("a1", PROMPT), range(10))[1])

    def gone(**kwargs):
        raise WorkerUnavailable("gone")

    b = Engine(cluster, seed=2, worker_client=gone)
    external, meta = b.schedule(request("b1", PROMPT), range(10))
    assert external == 256
    failed, _ = b.run(meta)
    assert failed == set(range(8))


def test_stores_each_chunk_once_across_chunked_prefill():
    cluster = FakeCluster()
    e = Engine(cluster)
    req = request("r", PROMPT)
    external, meta = e.schedule(req, range(10), scheduled=100)  # first prefill step: 100 tokens
    assert [s.first_chunk for s in meta.saves] == [0] and len(meta.saves[0].keys[0]) == 1
    e.run(meta)
    meta = e.schedule_again("r", computed=100, scheduled=200)
    assert [(s.first_chunk, len(s.keys[0])) for s in meta.saves] == [(1, 3)]
    e.run(meta)
    assert not e.schedule_again("r", computed=300, scheduled=1).saves  # decode stores nothing
    assert cluster.calls.count("put") == 2 and len(cluster.local) == 4


def test_other_signatures_do_not_hit():
    cluster = FakeCluster()
    a = Engine(cluster, seed=1)
    a.run(a.schedule(request("a1", PROMPT), range(10))[1])
    float16 = dataclasses.replace(SIGNATURE, kv_dtype="float16")
    assert Engine(cluster, signature=float16).schedule(request("x", PROMPT), range(10))[0] == 0
    tenant = dataclasses.replace(SIGNATURE, tenant="other")
    assert Engine(cluster, signature=tenant).schedule(request("y", PROMPT), range(10))[0] == 0
    salted = request("z", PROMPT)
    salted.cache_salt = "secret"
    assert Engine(cluster).schedule(salted, range(10))[0] == 0
    assert Engine(cluster).schedule(request("w", PROMPT), range(10))[0] == 256


def test_siloed_mode_ignores_peers():
    cluster = FakeCluster()
    a = Engine(cluster, seed=1)
    a.run(a.schedule(request("a1", PROMPT), range(10))[1])
    cluster.peer, cluster.local = cluster.local, {}
    b = Engine(cluster, extra={"peers": False})
    assert b.schedule(request("b1", PROMPT), range(10))[0] == 0


def test_settings_are_validated():
    with pytest.raises(ConfigError, match="multiple of vLLM's block_size"):
        make_settings({"chunk_tokens": 48})
    with pytest.raises(ConfigError, match="unknown lmshare connector settings"):
        make_settings({"chunk_size": 64})
    with pytest.raises(ConfigError, match="must be a bool"):
        make_settings({"peers": "maybe"})


def test_empty_metadata_is_harmless():
    e = Engine(FakeCluster())
    failed, worker_meta = e.run(LMShareMetadata())
    assert failed == set() and worker_meta is None


# --------------------------------------------------------------------------- the facade
@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "seed": 1}))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def make_vllm_config(model_dir, extra=None, kv_role="kv_both"):
    transfer = KVTransferConfig(
        kv_connector="LMShareConnector", kv_connector_module_path="lmshare.integrations.vllm",
        kv_role=kv_role,
        kv_connector_extra_config={"worker": "node-a", "chunk_tokens": CHUNK, **(extra or {})})
    return SimpleNamespace(
        kv_transfer_config=transfer,
        cache_config=SimpleNamespace(block_size=BLOCK, cache_dtype="auto"),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
        model_config=SimpleNamespace(model=str(model_dir), revision=None,
                                     tokenizer=str(model_dir), tokenizer_revision=None,
                                     tokenizer_mode="auto", dtype=torch.bfloat16,
                                     quantization=None, hf_config=None),
        attention_config=SimpleNamespace(backend=None))


def test_the_facade_gives_each_role_its_side(model_dir):
    """The class vLLM loads builds the scheduler side for the scheduler and the model-worker
    side for model workers, under the signature derived from vLLM's config (tenant included),
    and makes a chunk that does not arrive a recompute."""
    config = make_vllm_config(model_dir, {"tenant": "t"})
    sched = LMShareConnector(config, KVConnectorRole.SCHEDULER, fake_config())
    worker = LMShareConnector(config, KVConnectorRole.WORKER, fake_config())
    assert isinstance(sched.connector_scheduler, LMShareConnectorScheduler)
    assert sched.connector_worker is None
    assert isinstance(worker.connector_worker, LMShareConnectorWorker)
    assert worker.connector_scheduler is None
    assert config.kv_transfer_config.kv_load_failure_policy == "recompute"
    assert sched.signature == worker.signature and sched.signature.tenant == "t"
    assert sched.signature.namespace() != LMShareConnector(
        make_vllm_config(model_dir), KVConnectorRole.SCHEDULER, fake_config()
    ).signature.namespace()
    worker.register_kv_caches(fake_kv_caches(fake_config()))
    worker.bind_connector_metadata(LMShareMetadata())
    worker.start_load_kv(None)
    worker.wait_for_save()
    worker.clear_connector_metadata()
    assert worker.get_block_ids_with_load_errors() == set()
    assert worker.build_connector_worker_meta() is None
    sched.shutdown()
    worker.shutdown()


def test_the_facade_folds_kv_role_into_the_sides(model_dir, tmp_path):
    """A kv_consumer only loads: it plans no stores where kv_both does (the worker is absent
    here, so every lookup is a miss)."""
    absent = {"worker": "", "endpoint": f"ipc://{tmp_path}/absent.sock", "lookup_timeout_s": 0.2}
    planned = {}
    for role in ("kv_both", "kv_consumer"):
        sched = LMShareConnector(make_vllm_config(model_dir, absent, kv_role=role),
                                 KVConnectorRole.SCHEDULER, fake_config())
        req = request("r", PROMPT)
        assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
        sched.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda: ([],)), 0)
        new = SimpleNamespace(req_id="r", block_ids=(list(range(10)),), num_computed_tokens=0)
        meta = sched.build_connector_meta(SimpleNamespace(
            scheduled_new_reqs=[new], scheduled_cached_reqs=CachedRequestData.make_empty(),
            num_scheduled_tokens={"r": len(PROMPT)}, kv_connector_block_state=None))
        planned[role] = [len(s.keys[0]) for s in meta.saves]
        sched.shutdown()
    assert planned == {"kv_both": [4], "kv_consumer": []}
    with pytest.raises(ConfigError, match="multiple of vLLM's block_size"):
        LMShareConnector(make_vllm_config(model_dir, {"chunk_tokens": 48}),
                         KVConnectorRole.SCHEDULER, fake_config())


def test_worker_link_survives_a_worker_restart(tmp_path):
    """A client still mapping a restarted worker's old pool would store (and load) the wrong
    bytes: the link notices the new incarnation and reconnects."""
    import os
    import signal

    from lmshare.local_cluster import LocalCluster

    namespace, key = b"n" * 16, b"k" * 16
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with LocalCluster(runtime_dir=run_dir) as cluster:
        cluster.start_controller()
        cluster.start_worker("x", "64MiB")
        settings = ConnectorSettings(endpoint=cluster.worker_endpoint("x"), retry_s=0.1)
        link = WorkerLink(settings, 5.0)
        assert link.call(lambda c: c.put_keys(namespace, [b"j" * 16], [b"\x01" * 1000])) == 1
        worker = cluster.workers["x"]
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.wait(10)
        cluster.start_worker("x", "64MiB")
        assert link.call(lambda c: c.put_keys(namespace, [key], [b"\x07" * 1000])) == 1
        with cluster.client("x") as fresh, fresh.acquire_keys(namespace, [key]) as hit:
            assert hit.read(0) == b"\x07" * 1000
        link.close()


def test_gpu_style_loads_overlap_the_forward_layer_by_layer():
    """With the device copier (run here with CPU tensors and inline stream ops), each attention
    layer waits for its own layer's copies only, and the chunks stay leased until the forward
    is queued (wait_for_save)."""
    cluster = FakeCluster()
    a = Engine(cluster, seed=1)
    a.run(a.schedule(request("a1", PROMPT), range(10))[1])
    waited: list[int] = []

    class Ops(InlineStreamOps):
        def record(self, stream):
            number = len(self.events)
            self.events.append(number)
            return SimpleNamespace(number=number, synchronize=lambda: None, query=lambda: True)

        def current_waits_event(self, event):
            waited.append(event.number)

    ops = Ops()
    ops.events = []
    b = Engine(cluster, seed=2, copier_factory=lambda blocks: AsyncDeviceCopier(blocks, ops))
    external, meta = b.schedule(request("b1", PROMPT), range(20, 30))
    assert external == 4 * CHUNK
    b.worker.start_load_kv(meta)
    assert len(ops.events) == LAYERS and waited == []  # copies issued, nothing waited yet
    names = b.worker.geometry.layer_names
    b.worker.wait_for_layer_load(names[0])
    b.worker.wait_for_layer_load(names[1])
    assert waited == [0, 1]
    assert not cluster.hits[-1].released  # the copies may still read the pool
    b.worker.wait_for_save(meta)
    wait_until(lambda: cluster.hits[-1].released, 10, "the hit released off the step")
    assert b.worker.get_block_ids_with_load_errors() == set()
    assert_copied(a, range(8), b, range(20, 28))


def test_gpu_style_peer_loads_copy_one_batch_while_fetching_the_next():
    """With an asynchronous copier, the local prefix and then batches of peer chunks are
    acquired one after the other, and each batch's copies are issued before the next acquire;
    the loaded blocks are the same as with one acquire."""
    cluster = FakeCluster()
    a = Engine(cluster, seed=1)
    a.run(a.schedule(request("a1", PROMPT), range(10))[1])
    keys = list(cluster.local)
    cluster.peer = {k: cluster.local.pop(k) for k in keys[1:]}  # chunk 0 local, 1..3 on a peer

    class Ops(InlineStreamOps):
        def record(self, stream):
            cluster.calls.append("copied")
            return SimpleNamespace(synchronize=lambda: None, query=lambda: True)

    b = Engine(cluster, seed=2, extra={"fetch_batch_chunks": 2, "same_host_direct": False},
               copier_factory=lambda blocks: AsyncDeviceCopier(blocks, Ops()))
    external, meta = b.schedule(request("b1", PROMPT), range(20, 30))
    assert external == 4 * CHUNK and meta.loads[0].local_chunks == 1
    cluster.calls.clear()
    failed, _ = b.run(meta)
    assert failed == set()
    steps = [c for i, c in enumerate(cluster.calls) if c != "copied" or
             (i and cluster.calls[i - 1] != "copied")]  # runs of copy events as one step
    assert steps == ["acquire", "copied", "acquire", "copied", "acquire", "copied"]
    assert [len(h) for h in cluster.hits[-3:]] == [1, 2, 1]  # local prefix, then 2 + 1 peers
    wait_until(lambda: all(h.released for h in cluster.hits), 10, "hits released off the step")
    assert_copied(a, range(8), b, range(20, 28))


def test_gpu_style_loads_read_in_place_take_the_rest_in_one_acquire():
    """Peer chunks read in a same-host peer's pool need no fetch to overlap: after the first
    batch comes back read in place, the rest is one acquire, copied with the forward."""
    cluster = FakeCluster()
    a = Engine(cluster, seed=1)
    a.run(a.schedule(request("a1", PROMPT * 3), range(30))[1])
    cluster.peer, cluster.local = cluster.local, {}  # every chunk on a same-host peer
    b = Engine(cluster, seed=2, extra={"fetch_batch_chunks": 2},
               copier_factory=lambda blocks: AsyncDeviceCopier(blocks, InlineStreamOps()))
    external, meta = b.schedule(request("b1", PROMPT * 3), range(32, 62))
    chunks = external // CHUNK
    assert chunks >= 6
    cluster.calls.clear()
    failed, _ = b.run(meta)
    assert failed == set()
    assert cluster.calls.count("acquire") == 2  # the first batch, then everything else
    assert [len(h) for h in cluster.hits[-2:]] == [2, chunks - 2]
    assert_copied(a, range(chunks * CHUNK // BLOCK), b, range(32, 32 + chunks * CHUNK // BLOCK))


def test_the_lookups_plan_travels_to_the_loads_acquires():
    """The hit is decided once: where the scheduler's lookup found each chunk (the local pool,
    or which peers hold it) goes to the model worker in the LoadSpec, and every acquire of the
    load (here the local prefix, then two batches of peer chunks) carries the holders of its
    own chunks, so the worker does not ask the controller again."""
    cluster = FakeCluster()
    a = Engine(cluster, seed=1)
    a.run(a.schedule(request("a1", PROMPT), range(10))[1])
    keys = list(cluster.local)
    cluster.peer = {k: cluster.local.pop(k) for k in keys[1:]}  # chunk 0 local, 1..3 on a peer

    class Ops(InlineStreamOps):
        def record(self, stream):
            return SimpleNamespace(synchronize=lambda: None, query=lambda: True)

    b = Engine(cluster, seed=2, extra={"fetch_batch_chunks": 2},
               copier_factory=lambda blocks: AsyncDeviceCopier(blocks, Ops()))
    external, meta = b.schedule(request("b1", PROMPT), range(20, 30))
    assert external == 4 * CHUNK
    (load,) = meta.loads
    assert load.holders == [[[], ["node-b"], ["node-b"], ["node-b"]]]  # one rank, 4 chunks
    cluster.acquired_holders.clear()
    failed, _ = b.run(meta)
    assert failed == set()
    assert cluster.acquired_holders == [[[]], [["node-b"], ["node-b"]], [["node-b"]]]
    assert_copied(a, range(8), b, range(20, 28))
    # a load of vLLM's own prefix-cache remainder carries only its chunks' holders
    cluster.local = {}  # b's load fetched chunks 1..3 into "its" pool: forget them
    c = Engine(cluster, seed=3)
    external, meta = c.schedule(request("c1", PROMPT), range(10), computed=2 * CHUNK)
    assert external == 2 * CHUNK and meta.loads[0].holders == [[["node-b"], ["node-b"]]]


def test_a_request_vllm_asks_about_again_is_counted_once():
    """vLLM repeats the lookup each step it cannot schedule a request: the worker's hit/miss
    statistics count only the first."""
    cluster = FakeCluster()
    b = Engine(cluster, seed=2)
    req = request("r1", PROMPT)
    for _ in range(3):
        assert b.sched.get_num_new_matched_tokens(req, 0) == (0, False)
    assert cluster.calls == ["lookup", "lookup again", "lookup again"]


def test_a_chunk_changed_in_its_holders_memory_is_recomputed():
    """Direct reads from a same-host peer's pool are verified before the forward: the first
    chunk whose slabs were reused meanwhile, and every later one, are reported as failed."""
    cluster = FakeCluster()
    a = Engine(cluster, seed=1)
    a.run(a.schedule(request("a1", PROMPT), range(10))[1])
    keys = list(cluster.local)
    cluster.peer, cluster.local = cluster.local, {}
    cluster.changed_in_peer = {keys[2]}
    b = Engine(cluster, seed=2)
    external, meta = b.schedule(request("b1", PROMPT), range(20, 30))
    assert external == 4 * CHUNK
    failed, worker_meta = b.run(meta)
    assert cluster.direct_acquires == 1
    assert failed == set(range(24, 28))  # chunks 2 and 3 (blocks 4..7 of the request)
    assert worker_meta.failed_chunks == {"b1": 2}
    assert_copied(a, range(4), b, range(20, 24))  # chunks 0 and 1 were loaded


def test_a_restarted_peers_old_pool_is_unregistered():
    """A same-host peer pool is registered with the copier once, however many chunks are read
    in it; when the client drops it (the peer restarted with a new pool) the connector
    unregisters it so it can be unmapped, and the new pool is registered when read."""
    cluster = FakeCluster()
    a = Engine(cluster, seed=1)
    a.run(a.schedule(request("a1", PROMPT), range(10))[1])
    cluster.peer, cluster.local = cluster.local, {}
    old_pool, new_pool = bytearray(8192), bytearray(8192)
    registrations: list[int] = []

    class Recording(CpuBlockCopier):
        def register_host(self, buffer, read_only=False):
            registrations.append(buffer_address(buffer))
            return super().register_host(buffer, read_only)

        def unregister_host(self, buffer):
            registrations.remove(buffer_address(buffer))
            super().unregister_host(buffer)

    b = Engine(cluster, seed=2, copier_factory=Recording)
    cluster.peer_memory = old_pool
    for name in ("b1", "b2"):
        external, meta = b.schedule(request(name, PROMPT), range(20, 30))
        assert external == 4 * CHUNK and b.run(meta)[0] == set()
        cluster.local = {}  # the next request reads the peer's pool again
    assert registrations == [buffer_address(old_pool)]
    (client,) = b.worker_clients
    client.on_peer_unmap(old_pool)  # what the client does when the peer restarted
    assert registrations == []
    cluster.peer_memory = new_pool
    external, meta = b.schedule(request("b3", PROMPT), range(20, 30))
    assert external == 4 * CHUNK and b.run(meta)[0] == set()
    assert registrations == [buffer_address(new_pool)]


def test_the_connector_speaks_in_vllms_log(caplog):
    """One line when the engine is ready (worker, transports, pool registration time), a
    periodic summary of loads and stores, and a line per request at DEBUG."""
    import logging

    caplog.set_level(logging.DEBUG, logger="lmshare")
    cluster = FakeCluster()
    a = Engine(cluster, seed=1)
    ready = [r.getMessage() for r in caplog.records if "connector ready" in r.getMessage()]
    assert ready and "worker node-a" in ready[0] and "transports tcp" in ready[0] \
        and "pool registered in" in ready[0]
    a.run(a.schedule(request("a1", PROMPT), range(10))[1])
    cluster.peer, cluster.local = cluster.local, {}
    b = Engine(cluster, seed=2, summary_s=0.0)  # a summary after every step
    b.run(b.schedule(request("b1", PROMPT), range(20, 30))[1])
    messages = [r.getMessage() for r in caplog.records]
    assert any("lmshare hit for b1" in m for m in messages)  # DEBUG, per request
    assert any(m.startswith("lmshare: loaded 4 chunks (4 from peers)") for m in messages)
