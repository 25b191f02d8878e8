"""The dashboard frame from a known ClusterStats: the numbers an operator needs, at 80 and 200
columns, paging with hundreds of workers, and the controller going away and coming back."""

import subprocess
import sys
import time

import pytest
from rich.console import Console

from lmshare.dashboard.app import StatsPoller, parse_keys
from lmshare.dashboard.view import ViewState, budget, render, sort_workers
from lmshare.local_cluster import LocalCluster, free_port
from lmshare.stats import ClusterEvent, ClusterStats, WorkerCounters, WorkerView

MiB = 1024**2


def known_stats(workers: int = 3) -> ClusterStats:
    views = []
    for i in range(workers):
        counters = WorkerCounters(capacity_bytes=256 * MiB, used_bytes=128 * MiB, entries=42,
                                  local_hit_chunks=600, peer_hit_chunks=300, miss_chunks=100,
                                  bytes_served=10 * MiB, bytes_fetched=5 * MiB,
                                  in_flight_fetches=7 if i == 0 else 0)
        views.append(WorkerView(f"worker-{i + 1}", f"10.0.0.{i + 1}:4{i:04d}", "host-a",
                                ["shm", "tcp"], "alive", 0.4, 77, counters,
                                served_bytes_per_s=12 * MiB, fetched_bytes_per_s=3 * MiB,
                                peer_transports={"shm": 1, "tcp": 1}))
    if workers >= 3:
        views[1].state = "dead"
        views[1].heartbeat_age_s = 6.2
    events = [ClusterEvent(time.time() - 30, "join", "worker-1 joined at 10.0.0.1:40000"),
              ClusterEvent(time.time() - 5, "dead", "worker-2 missed heartbeats for 5.1s")]
    stats = ClusterStats(
        controller_id="c0ffee123456", controller_epoch=1700000000123, uptime_s=3725.0,
        workers=views, chunks_indexed=1234, multi_holder_chunks=321, namespaces=2,
        lookups=98765, lookup_p50_us=123.0, lookup_p99_us=876.0,
        hit_history=[(40, 30, 30)] * 60, events=events,
        miss_reasons={"new_prefix": 1200, "evicted": 450, "holder_gone": 150})
    # the dashboard reads what came over the wire
    return ClusterStats.from_dict(stats.to_dict())


def frame(stats, width, height, **state) -> list[str]:
    console = Console(width=width, height=height, color_system=None, record=True,
                      file=open("/dev/null", "w"))
    console.print(render(stats, width, height,
                         ViewState(controller="127.0.0.1:7800", **state)))
    text = console.export_text()
    return text.rstrip("\n").split("\n")


@pytest.mark.parametrize("width,height", [(80, 24), (200, 50)])
def test_frame_shows_the_cluster_numbers(width, height):
    lines = frame(known_stats(), width, height, footer="demo traffic · 10.0 req/s")
    text = "\n".join(lines)
    assert len(lines) <= height and max(len(line) for line in lines) <= width
    for expected in ("127.0.0.1:7800", "up 1h02m", "epoch 1700000000123",  # header
                     "2 alive", "0 suspect", "1 dead", "1,234 indexed", "321 on >1 worker",
                     "256.0 MiB of 512.0 MiB (50%)",  # cache of alive+suspect workers
                     "local 40%", "peer 30%", "miss 30%", "p50 123µs", "p99 876µs",
                     # why the last minute's misses were missed, most first
                     "missed 60s new_prefix 67% · evicted 25% · holder_gone 8%",
                     "worker-1", "worker-2", "worker-3", "dead", "60%", "12M", "3.0M",
                     "worker-2 missed heartbeats", "demo traffic · 10.0 req/s", "q quit"):
        assert expected in text, f"{expected!r} missing at {width}x{height}:\n{text}"
    row = next(line for line in lines if line.startswith("worker-1"))
    assert "7" in row.split()[-1]  # in-flight fetches
    if width >= 120:
        assert "10.0.0.1:40000" in text and "shm,tcp" in text and "c0ffee123456" in text
        assert "shm×1 tcp×1" in text  # the transport each worker uses towards its peers
        sparklines = [line.split()[0] for line in lines if "█" in line and "▆" not in line
                      or line.startswith(("peer ", "miss "))]
        assert {"local", "peer", "miss"} <= set(sparklines), text  # one sparkline per kind


def test_hundreds_of_workers_page_instead_of_overflowing():
    stats = known_stats(300)
    stats.workers[250].state = "suspect"
    fit = budget(stats, 24, ViewState())
    assert fit.pages > 10
    first = frame(stats, 80, 24)
    assert len(first) <= 24
    text = "\n".join(first)
    assert "of 300" in text and f"page 1/{fit.pages}" in text
    assert first[8].split()[:2] == ["worker-2", "dead"]  # problems sort first
    assert first[9].split()[:2] == ["worker-251", "suspect"]
    second = "\n".join(frame(stats, 80, 24, page=1))
    assert f"page 2/{fit.pages}" in second
    assert [w.worker_id for w in sort_workers(stats.workers, "name")][:3] == \
        ["worker-1", "worker-2", "worker-3"]  # natural order, not worker-1, worker-10, ...


def test_unreachable_controller_is_said_on_screen():
    text = "\n".join(frame(known_stats(), 80, 24, error="not reachable", error_for_s=12))
    assert "UNREACHABLE for 12s" in text and "showing last data" in text
    text = "\n".join(frame(None, 80, 24, error="not reachable", error_for_s=3))
    assert "UNREACHABLE" in text and "not reachable" in text


def test_keys():
    assert parse_keys("q") == ["quit"]
    assert parse_keys("s\x1b[6~n\x1b[5~") == ["sort", "next", "next", "prev"]
    assert parse_keys("\x1b") == []


def test_once_and_reconnect(tmp_path):
    cluster = LocalCluster(runtime_dir=tmp_path)
    try:
        cluster.start_controller()
        cluster.start_worker("solo", "16MiB")
        once = subprocess.run([sys.executable, "-m", "lmshare", "dashboard", "--once",
                               "--controller", cluster.controller_address],
                              capture_output=True, text=True, timeout=30, env=cluster.env())
        assert once.returncode == 0, once.stderr
        assert "solo" in once.stdout and "1 alive" in once.stdout

        poller = StatsPoller(cluster.controller_address, timeout_s=0.5, key=cluster.key)
        assert poller.poll_once() is not None and poller.error is None
        cluster.controller.terminate()
        assert poller.poll_once() is not None  # the last data stays on screen
        assert poller.error
        cluster.start_controller()
        deadline = time.monotonic() + 10
        while poller.poll_once() is None or poller.error is not None:
            assert time.monotonic() < deadline, poller.error
        poller.stop()

        gone = subprocess.run([sys.executable, "-m", "lmshare", "dashboard", "--once",
                               "--timeout", "0.5", "--controller", f"127.0.0.1:{free_port()}"],
                              capture_output=True, text=True, timeout=30, env=cluster.env())
        assert gone.returncode == 2 and "not reachable" in gone.stderr
        assert "Traceback" not in gone.stderr
    finally:
        cluster.stop()


@pytest.mark.parametrize("width,height", [(80, 24), (200, 50)])
def test_router_panel_shows_decisions_and_backend_load(width, height):
    from lmshare.stats import RouterStats

    router = RouterStats.from_dict({
        "policy": "prefix+load", "requests": 200, "retries": 2, "lookups": 190,
        "lookup_mean_ms": 0.42, "prompt_tokens": 1000, "held_tokens": 700,
        "decisions": {"hit": 150, "overloaded": 30, "miss": 20},
        "backends": [{"name": "node-a", "up": True, "in_flight": 3, "in_flight_tokens": 5000,
                      "requests": 120, "chunk_tokens": 256},
                     {"name": "node-b", "up": False, "reason": "connection refused",
                      "requests": 80, "failures": 4, "chunk_tokens": 256},
                     {"name": "junk"}, "not a backend"]})
    lines = frame(known_stats(40), width, height, router="http://127.0.0.1:8000",
                  router_stats=router)
    text = "\n".join(lines)
    assert len(lines) <= height and max(len(line) for line in lines) <= width
    for expected in ("router http://127.0.0.1:8000 · prefix+load", "requests 200", "hit 75%",
                     "overloaded 15%", "miss 10%", "node-a", "in flight   3", "DOWN"):
        assert expected in text, f"{expected!r} missing at {width}x{height}:\n{text}"
    if width >= 120:
        assert "70% of prompt tokens cached where sent" in text and "2 retried" in text
    away = "\n".join(frame(known_stats(), width, height, router="http://127.0.0.1:8000",
                           router_error="connection refused"))
    assert "router unreachable: connection refused" in away
