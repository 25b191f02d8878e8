"""The vLLM connector's logic with a fake worker client and fake vLLM scheduler objects: hit
decisions, loads into blocks, stores, failures. No engine is started (see test_vllm_e2e.py)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from vllm.config import KVTransferConfig  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.v1.core.sched.output import CachedRequestData  # noqa: E402

from lmshare.errors import ConfigError, WorkerUnavailable  # noqa: E402
from lmshare.integrations.kv_copy import AsyncDeviceCopier, InlineStreamOps  # noqa: E402
from lmshare.integrations.vllm import (  # noqa: E402
    LMShareConnector,
    LMShareMetadata,
    LMShareWorkerMetadata,
    WorkerLink,
)
from lmshare.testing.fake_vllm import (  # noqa: E402
    LAYERS,
    PAGE,
    block_bytes,
    fake_config,
    fake_kv_caches,
)

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
        self.calls: list[str] = []
        self.hits: list[FakeHit] = []

    def client(self, **kwargs):
        return FakeClient(self)


class FakeClient:
    def __init__(self, cluster):
        self.cluster = cluster

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

    def lookup_keys(self, namespace, keys, peers=True, count=True):
        self.cluster.calls.append("lookup" if count else "lookup again")
        return self._prefix(keys, peers)

    def acquire_keys(self, namespace, keys, peers=True, lease_s=30.0, direct=False):
        self.cluster.calls.append("acquire")
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
            hit = FakeHit(chunks, local, peer, peer_memory=bytearray(64), changed=[
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
                self.cluster.local[key] = bytes(chunk)
                new += 1
        return new

    def close(self):
        pass


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "seed": 1}))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def make_vllm_config(model_dir, extra=None, dtype=torch.bfloat16):
    transfer = KVTransferConfig(
        kv_connector="LMShareConnector", kv_connector_module_path="lmshare.integrations.vllm",
        kv_role="kv_both",
        kv_connector_extra_config={"worker": "node-a", "chunk_tokens": CHUNK,
                                   "async_save": False, **(extra or {})})
    return SimpleNamespace(
        kv_transfer_config=transfer,
        cache_config=SimpleNamespace(block_size=BLOCK, cache_dtype="auto"),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1),
        model_config=SimpleNamespace(model=str(model_dir), revision=None,
                                     tokenizer=str(model_dir), tokenizer_revision=None,
                                     tokenizer_mode="auto", dtype=dtype, quantization=None,
                                     hf_config=None),
        attention_config=SimpleNamespace(backend=None))


class Engine:
    """A scheduler-side and a worker-side connector over fake KV memory."""

    def __init__(self, model_dir, cluster, seed=0, extra=None, dtype=torch.bfloat16):
        self.kv_config = fake_config()
        config = make_vllm_config(model_dir, extra, dtype)
        self.config = config
        self.sched = LMShareConnector(config, KVConnectorRole.SCHEDULER, self.kv_config)
        self.worker = LMShareConnector(config, KVConnectorRole.WORKER, self.kv_config)
        for side in (self.sched, self.worker):
            side._link = WorkerLink(side.settings, 1.0, client_factory=cluster.client)
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

    def run(self, meta):
        """The model worker's part of one step; returns (failed blocks, worker metadata)."""
        self.worker.bind_connector_metadata(meta)
        self.worker.start_load_kv(None)
        self.worker.wait_for_save()
        failed = self.worker.get_block_ids_with_load_errors()
        worker_meta = self.worker.build_connector_worker_meta()
        self.worker.clear_connector_metadata()
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


def test_store_then_peer_load_copies_whole_blocks(model_dir):
    cluster = FakeCluster()
    a = Engine(model_dir, cluster, seed=1)
    external, meta = a.schedule(request("a1", PROMPT), range(10))
    assert external == 0 and not meta.loads
    assert [len(s.keys[0]) for s in meta.saves] == [4]
    a.run(meta)
    assert len(cluster.local) == 4
    # the chunks now live on "another worker"
    cluster.peer, cluster.local = cluster.local, {}

    b = Engine(model_dir, cluster, seed=2)
    blocks_b = [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]
    external, meta = b.schedule(request("b1", PROMPT), blocks_b)
    assert external == 4 * CHUNK  # 256 of 300 tokens
    assert len(meta.loads) == 1 and not meta.saves  # the cluster already holds every chunk
    failed, _ = b.run(meta)
    assert failed == set()
    assert_copied(a, range(8), b, blocks_b[:8])
    assert all(h.released for h in cluster.hits)


def test_hit_leaves_the_last_token_to_vllm(model_dir):
    cluster = FakeCluster()
    a = Engine(model_dir, cluster, seed=1)
    prompt = PROMPT[:256]  # exactly 4 chunks
    a.run(a.schedule(request("a1", prompt), range(8))[1])
    b = Engine(model_dir, cluster, seed=2)
    external, meta = b.schedule(request("b1", prompt), range(8, 16))
    assert external == 256 - BLOCK  # 7 whole blocks; vLLM computes the last block
    assert len(meta.loads[0].block_ids) == 7
    b.run(meta)
    assert_copied(a, range(7), b, range(8, 15), layers=[0])


def test_local_prefix_hit_only_loads_the_rest(model_dir):
    cluster = FakeCluster()
    a = Engine(model_dir, cluster, seed=1)
    a.run(a.schedule(request("a1", PROMPT), range(10))[1])
    b = Engine(model_dir, cluster, seed=2)
    # vLLM's own prefix cache already has 3 blocks (96 tokens)
    external, meta = b.schedule(request("b1", PROMPT), range(10, 20), computed=96)
    assert external == 256 - 96
    load = meta.loads[0]
    assert load.first_chunk == 1 and load.first_block == 3 and len(load.block_ids) == 5
    b.run(meta)
    assert_copied(a, range(3, 8), b, range(13, 18), layers=[1])


def test_missing_chunks_are_reported_as_failed_blocks(model_dir):
    cluster = FakeCluster()
    a = Engine(model_dir, cluster, seed=1)
    a.run(a.schedule(request("a1", PROMPT), range(10))[1])
    b = Engine(model_dir, cluster, seed=2)
    blocks_b = list(range(30, 40))
    external, meta = b.schedule(request("b1", PROMPT), blocks_b)
    assert external == 256
    cluster.lose_after = 1  # the peer died between lookup and load
    failed, worker_meta = b.run(meta)
    assert failed == set(blocks_b[2:8])  # chunks 1..3 -> blocks 2..7
    assert isinstance(worker_meta, LMShareWorkerMetadata)
    assert worker_meta.failed_chunks == {"b1": 1}
    assert b.sched._states["b1"].saved_upto == 1  # recomputed chunks get stored later


def test_worker_down_is_a_miss_and_is_not_retried_at_once(model_dir):
    calls = []

    def down(**kwargs):
        calls.append(1)
        raise WorkerUnavailable("no worker")

    e = Engine(model_dir, FakeCluster())
    e.sched._link = WorkerLink(e.sched.settings, 1.0, client_factory=down)
    assert e.sched.get_num_new_matched_tokens(request("r1", PROMPT), 0) == (0, False)
    assert e.sched.get_num_new_matched_tokens(request("r2", PROMPT), 0) == (0, False)
    assert len(calls) == 1  # circuit open for retry_s


def test_load_failure_when_worker_vanishes(model_dir):
    cluster = FakeCluster()
    a = Engine(model_dir, cluster, seed=1)
    a.run(a.schedule(request("a1", PROMPT), range(10))[1])
    b = Engine(model_dir, cluster, seed=2)
    external, meta = b.schedule(request("b1", PROMPT), range(10))

    def gone(**kwargs):
        raise WorkerUnavailable("gone")

    b.worker._link = WorkerLink(b.worker.settings, 1.0, client_factory=gone)
    failed, _ = b.run(meta)
    assert failed == set(range(8))


def test_stores_each_chunk_once_across_chunked_prefill(model_dir):
    cluster = FakeCluster()
    e = Engine(model_dir, cluster)
    req = request("r", PROMPT)
    external, meta = e.schedule(req, range(10), scheduled=100)  # first prefill step: 100 tokens
    assert [s.first_chunk for s in meta.saves] == [0] and len(meta.saves[0].keys[0]) == 1
    e.run(meta)
    cached = CachedRequestData(req_ids=["r"], resumed_req_ids=set(), new_token_ids=[[]],
                               all_token_ids={}, new_block_ids=[None],
                               num_computed_tokens=[100], num_output_tokens=[0])
    output = SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=cached,
                             num_scheduled_tokens={"r": 200}, kv_connector_block_state=None)
    meta = e.sched.build_connector_meta(output)
    assert [(s.first_chunk, len(s.keys[0])) for s in meta.saves] == [(1, 3)]
    e.run(meta)
    cached.num_computed_tokens = [300]
    output.num_scheduled_tokens = {"r": 1}
    assert not e.sched.build_connector_meta(output).saves  # decode steps store nothing
    assert cluster.calls.count("put") == 2 and len(cluster.local) == 4


def test_other_signatures_do_not_hit(model_dir):
    cluster = FakeCluster()
    a = Engine(model_dir, cluster, seed=1)
    a.run(a.schedule(request("a1", PROMPT), range(10))[1])
    assert Engine(model_dir, cluster, dtype=torch.float16).schedule(
        request("x", PROMPT), range(10))[0] == 0
    assert Engine(model_dir, cluster, extra={"tenant": "other"}).schedule(
        request("y", PROMPT), range(10))[0] == 0
    salted = request("z", PROMPT)
    salted.cache_salt = "secret"
    assert Engine(model_dir, cluster).schedule(salted, range(10))[0] == 0
    assert Engine(model_dir, cluster).schedule(request("w", PROMPT), range(10))[0] == 256


def test_siloed_mode_ignores_peers(model_dir):
    cluster = FakeCluster()
    a = Engine(model_dir, cluster, seed=1)
    a.run(a.schedule(request("a1", PROMPT), range(10))[1])
    cluster.peer, cluster.local = cluster.local, {}
    b = Engine(model_dir, cluster, extra={"peers": False})
    assert b.schedule(request("b1", PROMPT), range(10))[0] == 0


def test_settings_are_validated(model_dir):
    with pytest.raises(ConfigError, match="multiple of vLLM's block_size"):
        Engine(model_dir, FakeCluster(), extra={"chunk_tokens": 48})
    with pytest.raises(ConfigError, match="unknown lmshare connector settings"):
        Engine(model_dir, FakeCluster(), extra={"chunk_size": 64})
    with pytest.raises(ConfigError, match="must be a bool"):
        Engine(model_dir, FakeCluster(), extra={"peers": "maybe"})


def test_failure_policy_becomes_recompute(model_dir):
    e = Engine(model_dir, FakeCluster())
    assert e.config.kv_transfer_config.kv_load_failure_policy == "recompute"


def test_empty_metadata_is_harmless(model_dir):
    e = Engine(model_dir, FakeCluster())
    failed, worker_meta = e.run(LMShareMetadata())
    assert failed == set() and worker_meta is None
    assert PAGE > 0


def test_worker_link_survives_a_worker_restart(tmp_path):
    """A client still mapping a restarted worker's old pool would store (and load) the wrong
    bytes: the link notices the new incarnation and reconnects."""
    import os
    import signal

    from lmshare.integrations.vllm import ConnectorSettings
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


def test_gpu_style_loads_overlap_the_forward_layer_by_layer(model_dir):
    """With the device copier (run here with CPU tensors and inline stream ops), each attention
    layer waits for its own layer's copies only, and the chunks stay leased until the forward
    is queued (wait_for_save)."""
    cluster = FakeCluster()
    a = Engine(model_dir, cluster, seed=1)
    a.run(a.schedule(request("a1", PROMPT), range(10))[1])
    b = Engine(model_dir, cluster, seed=2)
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
    b.worker._copier = AsyncDeviceCopier(b.worker._copier.blocks, ops)
    external, meta = b.schedule(request("b1", PROMPT), range(20, 30))
    assert external == 4 * CHUNK
    b.worker.bind_connector_metadata(meta)
    b.worker.start_load_kv(None)
    assert len(ops.events) == LAYERS and waited == []  # copies issued, nothing waited yet
    names = b.worker.geometry.layer_names
    b.worker.wait_for_layer_load(names[0])
    b.worker.wait_for_layer_load(names[1])
    assert waited == [0, 1]
    assert not cluster.hits[-1].released  # the copies may still read the pool
    b.worker.wait_for_save()
    assert cluster.hits[-1].released
    assert b.worker.get_block_ids_with_load_errors() == set()
    b.worker.clear_connector_metadata()
    assert_copied(a, range(8), b, range(20, 28))


def test_gpu_style_peer_loads_copy_one_batch_while_fetching_the_next(model_dir):
    """With an asynchronous copier, the local prefix and then batches of peer chunks are
    acquired one after the other, and each batch's copies are issued before the next acquire;
    the loaded blocks are the same as with one acquire."""
    cluster = FakeCluster()
    a = Engine(model_dir, cluster, seed=1)
    a.run(a.schedule(request("a1", PROMPT), range(10))[1])
    keys = list(cluster.local)
    cluster.peer = {k: cluster.local.pop(k) for k in keys[1:]}  # chunk 0 local, 1..3 on a peer

    class Ops(InlineStreamOps):
        def record(self, stream):
            cluster.calls.append("copied")
            return SimpleNamespace(synchronize=lambda: None, query=lambda: True)

    b = Engine(model_dir, cluster, seed=2, extra={"fetch_batch_chunks": 2})
    b.worker._copier = AsyncDeviceCopier(b.worker._copier.blocks, Ops())
    external, meta = b.schedule(request("b1", PROMPT), range(20, 30))
    assert external == 4 * CHUNK and meta.loads[0].local_chunks == 1
    cluster.calls.clear()
    failed, _ = b.run(meta)
    assert failed == set()
    steps = [c for i, c in enumerate(cluster.calls) if c != "copied" or
             (i and cluster.calls[i - 1] != "copied")]  # runs of copy events as one step
    assert steps == ["acquire", "copied", "acquire", "copied", "acquire", "copied"]
    assert [len(h) for h in cluster.hits[-3:]] == [1, 2, 1]  # local prefix, then 2 + 1 peers
    assert all(h.released for h in cluster.hits)
    assert_copied(a, range(8), b, range(20, 28))


def test_a_request_vllm_asks_about_again_is_counted_once(model_dir):
    """vLLM repeats the lookup each step it cannot schedule a request: the worker's hit/miss
    statistics count only the first."""
    cluster = FakeCluster()
    b = Engine(model_dir, cluster, seed=2)
    req = request("r1", PROMPT)
    for _ in range(3):
        assert b.sched.get_num_new_matched_tokens(req, 0) == (0, False)
    assert cluster.calls == ["lookup", "lookup again", "lookup again"]


def test_a_chunk_changed_in_its_holders_memory_is_recomputed(model_dir):
    """Direct reads from a same-host peer's pool are verified before the forward: the first
    chunk whose slabs were reused meanwhile, and every later one, are reported as failed."""
    cluster = FakeCluster()
    a = Engine(model_dir, cluster, seed=1)
    a.run(a.schedule(request("a1", PROMPT), range(10))[1])
    keys = list(cluster.local)
    cluster.peer, cluster.local = cluster.local, {}
    cluster.changed_in_peer = {keys[2]}
    b = Engine(model_dir, cluster, seed=2)
    external, meta = b.schedule(request("b1", PROMPT), range(20, 30))
    assert external == 4 * CHUNK
    failed, worker_meta = b.run(meta)
    assert cluster.direct_acquires == 1
    assert failed == set(range(24, 28))  # chunks 2 and 3 (blocks 4..7 of the request)
    assert worker_meta.failed_chunks == {"b1": 2}
    assert_copied(a, range(4), b, range(20, 24))  # chunks 0 and 1 were loaded


def test_a_restarted_peers_old_pool_is_unregistered(model_dir):
    """A same-host peer pool is registered with the copier once; when the client drops it
    (the peer restarted with a new pool) the connector unregisters it so it can be unmapped."""
    b = Engine(model_dir, FakeCluster(), seed=2)
    old_pool, new_pool = bytearray(8192), bytearray(8192)
    registered = b.worker._copier._registered
    before = len(registered)
    for _ in range(2):
        b.worker._register_peer_pool(old_pool)
    b.worker._register_peer_pool(new_pool)
    assert len(registered) == before + 2
    b.worker._forget_peer_pool(old_pool)
    assert len(registered) == before + 1 and len(b.worker._peer_pools) == 1
