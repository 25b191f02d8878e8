"""The controller against hostile and oversized input: every bad message costs its sender an
error reply (or its connection), never the controller, and never unbounded memory or time.

Each test is one of the failures found against the controller (see the reliability notes in
docs/reliability.md)."""

from __future__ import annotations

import threading
import time

import msgpack
import pytest
import zmq

from lmshare import protocol
from lmshare.control import ControllerClient
from lmshare.controller import ControllerConfig, ControllerService
from lmshare.controller.index import SLICE_KEYS
from lmshare.errors import RemoteError
from lmshare.local_cluster import LocalCluster
from lmshare.testing.waiting import wait_until

NS = b"n" * 16


def k(i: int) -> bytes:
    return i.to_bytes(16, "big")


@pytest.fixture
def controller():
    service = ControllerService(ControllerConfig(port=0, heartbeat_interval_s=0.2,
                                                 heartbeat_timeout_s=30.0,
                                                 max_message_bytes=4 << 20,
                                                 max_keys_per_worker=10_000))
    thread = threading.Thread(target=service.serve_forever, daemon=True)
    thread.start()
    service.thread = thread
    yield service
    service.stop()
    thread.join(5)


@pytest.fixture
def client(controller):
    c = ControllerClient("127.0.0.1", controller.port, timeout_s=10.0)
    yield c
    c.close()


def register(client, worker_id, host_id="h", **extra):
    return client.call("register", worker_id=worker_id, host="127.0.0.1", data_port=9000,
                       transports=["shm", "tcp"], capacity_bytes=1 << 30, host_id=host_id,
                       **extra)["epoch"]


def assert_serving(controller, client):
    assert controller.thread.is_alive()
    reply = client.call("stats")
    assert reply["type"] == "ok"
    protocol.encode(reply)  # the stats reply itself can still be sent


@pytest.mark.parametrize("stats", [{"used_bytes": 1e20}, {"used_bytes": -2**63},
                                   {"bytes_served": 2**64 - 1}, {"used_bytes": float("nan")},
                                   {"used_bytes": float("inf")}])
def test_heartbeat_with_out_of_range_counters_is_refused_and_stats_still_work(
        controller, client, stats):
    epoch = register(client, "w")
    with pytest.raises(RemoteError) as info:
        client.call("heartbeat", worker_id="w", epoch=epoch, seq=0, stats=stats)
    assert info.value.code == "bad_message"
    assert_serving(controller, client)


def test_huge_counters_summed_over_workers_still_encode(controller, client):
    """Counters at the cap from several workers: their sums are beyond 64 bits."""
    top = protocol.MAX_COUNTER
    for name in ("a", "b", "c", "d", "e"):
        epoch = register(client, name)
        client.call("heartbeat", worker_id=name, epoch=epoch, seq=0,
                    stats={"local_hit_chunks": 0})
        controller._last_sample = 0.0
    wait_until(lambda: controller._last_hit_totals is not None, 5, "a first hit sample")
    for name in ("a", "b", "c", "d", "e"):
        epoch = controller.registry.workers[name].epoch
        client.call("heartbeat", worker_id=name, epoch=epoch, seq=0,
                    stats={"local_hit_chunks": top, "peer_hit_chunks": top})
    controller._last_sample = 0.0
    wait_until(lambda: controller._hit_history, 5, "a hit sample of the huge counters")
    assert_serving(controller, client)


@pytest.mark.parametrize("extra", ["not a map", {"k": [1, 2]}, {"k": float("nan")},
                                   {"x" * 100: 1}, {"k": "v" * 20000}])
def test_malformed_extra_is_a_bad_message_not_an_internal_error(controller, client, extra):
    with pytest.raises(RemoteError) as info:
        register(client, "w", extra=extra)
    assert info.value.code == "bad_message"
    assert_serving(controller, client)


def test_a_huge_host_string_is_refused_so_stats_stay_sendable(controller, client):
    with pytest.raises(RemoteError) as info:
        register(client, "w", host_id="h" * (2 << 20))
    assert info.value.code == "bad_message"
    assert len(info.value.message) < 1000
    assert_serving(controller, client)


def _send_frames(port: int, frames: list[bytes]) -> dict | None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    try:
        sock.send_multipart(frames)
        if not sock.poll(3000):
            return None
        return msgpack.unpackb(sock.recv_multipart()[-1])
    finally:
        sock.close()


def test_the_size_limit_counts_every_frame_of_a_message(controller, client):
    ping = protocol.encode(protocol.request("ping", 1))
    # frames each under the limit, together over it: refused with too_large
    reply = _send_frames(controller.port, [b"x" * ((4 << 20) - 8), ping])
    assert reply is not None and reply["code"] == "too_large"
    reply = _send_frames(controller.port, [b"", b"", b"", ping])
    assert reply is not None and reply["code"] == "too_large"
    assert_serving(controller, client)


def test_frames_far_over_the_limit_cost_the_controller_no_memory(tmp_path):
    """5 frames of 64 MiB against a 1 MiB limit: the sender is cut off at its first frame."""
    with LocalCluster(runtime_dir=tmp_path, key_file=None) as cluster:
        process = cluster.start_controller("--max-message-bytes", "1MiB").process

        def rss() -> int:
            with open(f"/proc/{process.pid}/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
        before = rss()
        big = bytes(64 << 20)
        for _ in range(2):
            assert _send_frames(cluster.controller_port, [big] * 5) is None  # disconnected
        assert rss() - before < 32 << 20
        ping = ControllerClient("127.0.0.1", cluster.controller_port, timeout_s=5)
        assert ping.call("ping")["type"] == "ok"
        ping.close()


def test_a_worker_cannot_index_more_than_its_cap(controller, client):
    epoch = register(client, "greedy")
    for part in range(3):
        client.call("sync", worker_id="greedy", epoch=epoch, seq=1, part=part, final=part == 2,
                    entries={NS: [k(part * 6000 + i) for i in range(6000)]})
    wait_until(lambda: not controller.index.pending, 10, "the sync to be absorbed")
    assert controller.index.worker_chunks("greedy") == 10_000
    events = client.call("stats")["stats"]["events"]
    assert any(e["kind"] == "refused" and "greedy" in e["detail"] for e in events)
    # an honest worker beside it is indexed in full
    epoch = register(client, "honest")
    client.call("batch", worker_id="honest", epoch=epoch, seq=1, admit={NS: [k(10**6)]}, evict=[])
    assert client.call("lookup", namespace=NS, keys=[k(10**6)])["matched"] == 1


def test_a_message_with_too_many_keys_is_refused_before_indexing(controller, client):
    epoch = register(client, "w")
    with pytest.raises(RemoteError) as info:
        client.call("sync", worker_id="w", epoch=epoch, seq=1, part=0, final=True,
                    entries={NS: [k(i) for i in range(protocol.MAX_KEYS // 2 + 1)],
                             b"m" * 16: [k(i) for i in range(protocol.MAX_KEYS // 2 + 1)]})
    assert info.value.code == "too_large"
    assert controller.index.worker_chunks("w") == 0


def test_a_big_sync_is_absorbed_in_slices_while_lookups_are_answered(client):
    """200k keys in parts of 20k: no single step of the controller's loop (one message or one
    slice of index work) takes more than 10 ms of its CPU, and lookups are answered meanwhile."""
    service = ControllerService(ControllerConfig(port=0, heartbeat_timeout_s=30.0))
    thread = threading.Thread(target=service.serve_forever, daemon=True)
    thread.start()
    sender = ControllerClient("127.0.0.1", service.port, timeout_s=10.0)
    reader = ControllerClient("127.0.0.1", service.port, timeout_s=10.0)
    try:
        epoch = register(sender, "big")
        sender.call("batch", worker_id="big", epoch=epoch, seq=1, admit={NS: [k(0)]}, evict=[])
        service.slowest_step_cpu_s = 0.0
        parts = 10

        def sync() -> None:
            for part in range(parts):
                sender.call("sync", worker_id="big", epoch=epoch, seq=2, part=part,
                            final=part == parts - 1,
                            entries={NS: [k(part * 20_000 + i) for i in range(20_000)]})
        writer = threading.Thread(target=sync)
        writer.start()
        answered = 0
        while writer.is_alive() or service.index.pending:
            reader.call("lookup", namespace=NS, keys=[k(0)])
            answered += 1
        writer.join()
        assert service.index.worker_chunks("big") == 200_000
        assert answered > 10
        # the largest steps are decoding and checking one 20k-key part (~3 ms) and a
        # collection of the garbage collector's oldest generation; slices are SLICE_KEYS keys
        assert SLICE_KEYS <= 4096
        assert service.slowest_step_cpu_s < 0.020, \
            f"slowest step {service.slowest_step_cpu_s * 1000:.1f} ms"
    finally:
        sender.close()
        reader.close()
        service.stop()
        thread.join(5)


def test_stats_of_2000_workers_is_fast_and_paged(controller, client):
    for i in range(2000):
        register(client, f"w{i}", host_id=f"host-{i}")
    started = time.monotonic()
    stats = client.call("stats")["stats"]
    assert time.monotonic() - started < 2.0
    assert stats["workers_total"] == 2000 and len(stats["workers"]) == 1000
    rest = client.call("stats", offset=1000)["stats"]["workers"]
    assert {w["worker_id"] for w in stats["workers"] + rest} == {f"w{i}" for i in range(2000)}
    assert stats["workers"][0]["peer_transports"] == {"tcp": 1999}
    from lmshare.stats import fetch_cluster_stats

    assert len(fetch_cluster_stats(ControllerClient("127.0.0.1", controller.port, 10)).workers) \
        == 2000
