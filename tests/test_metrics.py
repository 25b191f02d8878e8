"""Prometheus endpoints of a controller and workers started through the CLI: they parse, and
their counters move with client traffic."""

import os
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmshare import ModelSignature
from lmshare.local_cluster import LocalCluster, free_port
from lmshare.shm import shm_dir
from lmshare.testing.waiting import slack, wait_until

SIG = ModelSignature(model="metrics-model", chunk_tokens=16)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def scrape_when_up(port: int, timeout_s: float = 10.0) -> dict[tuple[str, tuple], float]:
    """The first scrape (a process serves metrics a moment after it registers)."""
    deadline = time.monotonic() + timeout_s * slack()
    while True:
        try:
            return scrape(port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def value(samples, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]



@pytest.fixture
def cluster(tmp_path):
    c = LocalCluster(heartbeat_timeout_s=2.0, runtime_dir=tmp_path)
    try:
        yield c
    finally:
        c.stop()


def test_metrics_endpoints_move_with_traffic(cluster):
    controller_port, holder_port, reader_port = free_port(), free_port(), free_port()
    cluster.start_controller("--heartbeat-interval", "0.3", "--metrics-port", str(controller_port))
    cluster.start_worker("holder", "32MiB", "--metrics-port", str(holder_port))
    cluster.start_worker("reader", "32MiB", "--metrics-port", str(reader_port))

    before_controller = scrape_when_up(controller_port)
    before_reader = scrape_when_up(reader_port)
    scrape_when_up(holder_port)
    assert value(before_controller, "lmshare_controller_workers", state="alive") == 2
    assert value(before_controller, "lmshare_controller_responding") == 1
    assert value(before_controller, "lmshare_controller_events_total", kind="join") == 2
    assert value(before_reader, "lmshare_worker_registered") == 1
    assert value(before_reader, "lmshare_worker_capacity_bytes") == 32 * 1024**2
    assert value(before_reader, "lmshare_worker_chunks_total", result="peer_hit") == 0
    assert value(before_reader, "lmshare_worker_fetch_duration_seconds_count") == 0

    tokens = list(range(4 * SIG.chunk_tokens))
    data = [os.urandom(100_000) for _ in range(4)]
    with cluster.client("holder") as holder, cluster.client("reader") as reader:
        assert holder.put(SIG, tokens, data) == 4
        wait_until(lambda: reader.lookup(SIG, tokens).peer_tokens == len(tokens), 5,
                   "chunks in the index")
        assert reader.get(SIG, tokens) == data

    after_reader = scrape(reader_port)
    assert value(after_reader, "lmshare_worker_chunks_total", result="peer_hit") == 4
    assert value(after_reader, "lmshare_worker_fetched_bytes_total") == 400_000
    assert value(after_reader, "lmshare_worker_lookups_total") >= 1
    assert value(after_reader, "lmshare_worker_admits_total") == 4
    assert value(after_reader, "lmshare_worker_fetch_duration_seconds_count") == 1
    assert value(after_reader, "lmshare_worker_used_bytes") == 400_000
    after_holder = scrape(holder_port)
    assert value(after_holder, "lmshare_worker_admits_total") == 4

    def controller_caught_up():
        # both workers' heartbeats and the reader's admits reach the controller on their own
        # schedules: wait for every number asserted below, not for one of them
        samples = scrape(controller_port)
        caught_up = (
            value(samples, "lmshare_controller_worker_served_bytes_total", worker="holder")
            == 400_000
            and value(samples, "lmshare_controller_worker_chunks_total", worker="reader",
                      result="peer_hit") == 4
            and value(samples, "lmshare_controller_multi_holder_chunks") == 4
            and value(samples, "lmshare_cluster_cached_bytes") == 800_000)
        return samples if caught_up else None

    after_controller = wait_until(controller_caught_up, 15, "heartbeat counters at the controller")
    assert value(after_controller, "lmshare_controller_lookups_total") > \
        value(before_controller, "lmshare_controller_lookups_total")
    assert value(after_controller, "lmshare_controller_lookup_duration_seconds_count") >= 1
    assert value(after_controller, "lmshare_controller_indexed_chunks") == 4
    assert value(after_controller, "lmshare_controller_multi_holder_chunks") == 4
    assert value(after_controller, "lmshare_controller_worker_chunks_total", worker="reader",
                 result="peer_hit") == 4
    assert value(after_controller, "lmshare_cluster_cached_bytes") == 800_000


def test_metrics_port_in_use_is_one_clear_line(cluster):
    import subprocess
    import sys

    cluster.start_controller()
    busy = free_port()
    cluster.start_worker("first", "16MiB", "--metrics-port", str(busy))
    result = subprocess.run([sys.executable, "-m", "lmshare", "worker", "--controller",
                             cluster.controller_address, "--cache-size", "16MiB", "--name",
                             "metrics-port-clash", "--metrics-port", str(busy)],
                            capture_output=True, text=True, timeout=30,
                            env=cluster.env())
    assert result.returncode == 2, result.stderr
    assert "choose another --metrics-port" in result.stderr and "Traceback" not in result.stderr
    assert not list(shm_dir().glob("lmshare-*-metrics-port-clash"))  # it cleaned up
