"""Shutdown budgets agree: LocalCluster waits for a SIGTERM'd worker at least as long as the
worker's own SIGTERM path may take (hand-off, deregister, peers' reads, local requests) before
it kills it, for the timeouts the worker was started with."""

from __future__ import annotations

import pytest

from lmshare.local_cluster import STOP_MARGIN_S, worker_stop_timeout
from lmshare.worker.config import WorkerConfig


def _config(**fields) -> WorkerConfig:
    return WorkerConfig("127.0.0.1", 7800, 1 << 20, name="w", **fields)


@pytest.mark.parametrize("extra, fields", [
    ([], {}),
    (["--drain-timeout", "0"], {"drain_timeout_s": 0.0}),
    (["--drain-timeout", "30", "--fetch-timeout", "12"],
     {"drain_timeout_s": 30.0, "fetch_timeout_s": 12.0}),
])
def test_local_cluster_waits_out_a_workers_own_budget(extra, fields):
    args = ["worker", "--controller", "127.0.0.1:7800,127.0.0.1:7801", "--name", "w", *extra]
    budget = _config(standby_controllers=(("127.0.0.1", 7801),), **fields).shutdown_budget_s
    assert worker_stop_timeout(args) == budget + STOP_MARGIN_S


def test_a_workers_budget_covers_each_step_of_its_sigterm_path():
    config = _config(drain_timeout_s=10.0, fetch_timeout_s=5.0, rpc_timeout_s=1.0)
    # hand-off 10 (+ its last call), peers' reads 10, an acquire's fetch 5: more than the
    # 15 s LocalCluster allowed before
    assert config.shutdown_budget_s >= 10 + 10 + 5 + 1
    assert config.shutdown_budget_s > 15
    assert _config(drain_timeout_s=0.0).shutdown_budget_s < config.shutdown_budget_s
