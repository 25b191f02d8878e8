"""The cluster as operators run it: separate processes started through the ``lmshare`` CLI."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmshare import ModelSignature
from lmshare.errors import RemoteError, WorkerRestarted
from lmshare.keys import signature_keys
from lmshare.local_cluster import LocalCluster, free_port
from lmshare.protocol import ErrorCode
from lmshare.testing.waiting import wait_until

SIG = ModelSignature(model="e2e-model", chunk_tokens=16)
CHUNK_BYTES = 200_000


def doc(seed: int, chunks: int = 5) -> list[int]:
    return [seed * 1000 + i for i in range(chunks * SIG.chunk_tokens)]


def payloads(seed: int, chunks: int = 5) -> list[bytes]:
    return [os.urandom(CHUNK_BYTES) for _ in range(chunks)]




@pytest.fixture
def cluster(tmp_path, monkeypatch):
    c = LocalCluster(heartbeat_timeout_s=1.5, runtime_dir=tmp_path)
    monkeypatch.setenv("LMSHARE_KEY_FILE", c.key_file)  # what run_cli's commands use
    c.start_controller("--heartbeat-interval", "0.3")
    try:
        yield c
    finally:
        c.stop()


def test_share_fail_restart_leave_join(cluster):
    for name in ("w1", "w2", "w3"):
        cluster.start_worker(name)
    c1, c2, c3 = (cluster.client(n) for n in ("w1", "w2", "w3"))

    # put via worker 1; lookup and get via worker 3 return the same bytes from the peer
    doc_a, data_a = doc(1), payloads(1)
    assert c1.put(SIG, doc_a, data_a) == 5
    hit = wait_until(lambda: c3.lookup(SIG, doc_a + [7, 7]).tokens, 5, "chunks in the index")
    assert hit == 5 * 16
    assert c3.lookup(SIG, doc_a).peer_tokens == 80
    assert c3.get(SIG, doc_a) == data_a
    assert c3.stats()["counters"]["peer_hit_chunks"] == 5
    assert c3.lookup(SIG, doc_a).local_tokens == 80  # now cached on worker 3 too
    # a repeated lookup (count=False) is answered but not counted again as lookups or misses
    counters = c3.stats()["counters"]
    unknown = signature_keys(SIG, doc(99))
    assert c3.lookup_keys(SIG.namespace(), unknown, count=False) == (0, 0)
    assert c3.stats()["counters"]["miss_chunks"] == counters["miss_chunks"]
    assert c3.lookup_keys(SIG.namespace(), unknown) == (0, 0)
    assert c3.stats()["counters"]["miss_chunks"] == counters["miss_chunks"] + len(unknown)

    # kill -9 worker 1: its chunks leave lookups within the timeout; a get is a clean miss
    doc_b, data_b = doc(2), payloads(2)
    c1.put(SIG, doc_b, data_b)
    wait_until(lambda: c2.lookup(SIG, doc_b).tokens == 80, 5, "doc b indexed")
    cluster.workers["w1"].process.send_signal(signal.SIGKILL)
    cluster.workers["w1"].process.wait(5)
    started = time.monotonic()
    assert c2.get(SIG, doc_b) == []  # holder is gone: miss, not hang, not wrong bytes
    assert time.monotonic() - started < 6
    wait_until(lambda: c2.lookup(SIG, doc_b).tokens == 0, 1.5 + 2, "dead worker's chunks gone")
    # (the reader may stop offering a holder whose fetch just failed before the controller's
    # liveness check drops it)
    wait_until(lambda: any(w.worker_id == "w1" and w.state == "dead"
                           for w in cluster.stats().workers), 1.5 + 2, "w1 declared dead")

    # restart the controller: the index is rebuilt from full syncs, no worker restarts
    cluster.controller.terminate()
    assert c3.lookup(SIG, doc_a).local_tokens == 80  # local hits while the controller is away
    assert c3.get(SIG, doc_a) == data_a
    cluster.start_controller("--heartbeat-interval", "0.3")
    wait_until(lambda: cluster.stats().chunks_indexed == 5, 10, "index rebuilt")
    # every surviving worker is back (one holding no chunks re-registers at its next heartbeat)
    wait_until(lambda: {w.worker_id: w.state for w in cluster.stats().workers}.get("w2")
               == "alive", 10, "w2 to re-register")
    assert c2.lookup(SIG, doc_a).peer_tokens == 80
    assert c2.get(SIG, doc_a) == data_a

    # graceful leave: exit 0, chunks leave at once
    cluster.workers["w3"].process.send_signal(signal.SIGTERM)
    assert cluster.workers["w3"].process.wait(10) == 0
    states = {w.worker_id: w.state for w in cluster.stats().workers}
    assert states["w3"] == "left" and states["w2"] == "alive"

    # a worker joining late is usable at once
    cluster.start_worker("w4")
    with cluster.client("w4") as c4:
        assert c4.get(SIG, doc_a) == data_a
        assert c4.stats()["counters"]["peer_hit_chunks"] == 5
    for c in (c1, c2, c3):
        c.close()


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmshare", *args], capture_output=True,
                          text=True, timeout=timeout)


def assert_one_clear_line(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0]


def test_cli_misconfiguration_is_one_clear_line(cluster):
    assert_one_clear_line(run_cli("worker", "--controller", cluster.controller_address,
                                  "--cache-size", "lots"), "cannot read size", "8GiB")
    assert_one_clear_line(run_cli("worker", "--controller", f"127.0.0.1:{free_port()}",
                                  "--cache-size", "16MiB", "--connect-timeout", "0.5"),
                          "not reachable")
    assert_one_clear_line(run_cli("controller", "--port", str(cluster.controller_port)),
                          "choose another --port")
    assert_one_clear_line(run_cli("status", "--controller", f"127.0.0.1:{free_port()}",
                                  "--timeout", "0.5"), "not reachable")
    assert_one_clear_line(run_cli("worker", "--controller", "nowhere"), "HOST:PORT")
    assert_one_clear_line(run_cli("bench", "--source", str(cluster.runtime_dir)),
                          "source checkout")
    assert_one_clear_line(run_cli("worker", "--controller", cluster.controller_address,
                                  "--cache-size", "16MiB", "--host", "127.0.0.1",
                                  "--port", str(cluster.controller_port)), "choose another --port")


def test_status_lists_workers(cluster):
    cluster.start_worker("solo", "32MiB")
    result = run_cli("status", "--controller", cluster.controller_address, "--json")
    assert result.returncode == 0, result.stderr
    assert '"worker_id": "solo"' in result.stdout


def test_same_host_peers_share_memory_and_tcp_stays_available(cluster):
    cluster.start_worker("holder")
    cluster.start_worker("near")  # default: shm,tcp
    cluster.start_worker("socket-only", "64MiB", "--transports", "tcp")
    doc_a, data_a = doc(3), payloads(3)
    with cluster.client("holder") as holder:
        holder.put(SIG, doc_a, data_a)
    for name, transport in (("near", "shm"), ("socket-only", "tcp")):
        with cluster.client(name) as c:
            wait_until(lambda c=c: c.lookup(SIG, doc_a).peer_tokens == 80, 5, "indexed")
            assert c.get(SIG, doc_a) == data_a
            assert c.stats()["fetched_by_transport"][transport] == 5
    views = {w.worker_id: w for w in cluster.stats().workers}
    assert views["near"].peer_transports == {"shm": 1, "tcp": 1}
    assert views["socket-only"].peer_transports == {"tcp": 2}
    result = run_cli("status", "--controller", cluster.controller_address)
    assert "shm×1" in result.stdout


def test_direct_hit_reads_a_same_host_peer_in_place(cluster):
    """acquire_keys(direct=True): chunks a same-host peer holds are read in its own pool (not
    copied into the reader's), pinned there until the hit is released; socket-only workers
    still get a copy."""
    cluster.start_worker("holder")
    cluster.start_worker("reader")
    doc_a, data_a = doc(4), payloads(4)
    keys = signature_keys(SIG, doc_a)
    with cluster.client("holder") as holder, cluster.client("reader") as reader:
        holder.put(SIG, doc_a, data_a)
        wait_until(lambda: reader.lookup(SIG, doc_a).peer_tokens == 80, 5, "indexed")
        with reader.acquire_keys(SIG.namespace(), keys, direct=True) as hit:
            assert (hit.local_chunks, hit.peer_chunks) == (0, 5)
            assert all(hit.region_buffer(i) is not None for i in range(5))
            assert [hit.read(i) for i in range(5)] == data_a
            assert all(hit.verify(i) for i in range(5))
            assert holder.stats()["counters"]["pinned_entries"] == 5  # pinned by the holder
        counters = reader.stats()["counters"]
        assert counters["direct_peer_chunks"] == 5 and counters["entries"] == 0  # no copy
        wait_until(lambda: holder.stats()["counters"]["pinned_entries"] == 0, 5,
                   "the holder's pins to end with the hit")
        # without direct, the same chunks are copied into the reader's pool as before
        with reader.acquire_keys(SIG.namespace(), keys) as hit:
            assert hit.peer_chunks == 5 and hit.region_buffer(0) is None
        assert reader.stats()["counters"]["entries"] == 5

        # the holder restarts (a new pool): the reader maps the new one, drops the old one
        old_pool = reader._peer_regions.path_of("holder")
        dropped: list[memoryview] = []
        reader.on_peer_unmap = dropped.append
        cluster.workers["holder"].terminate()
        cluster.start_worker("holder")
        doc_b, data_b = doc(5), payloads(5)
        with cluster.client("holder") as new_holder:
            new_holder.put(SIG, doc_b, data_b)
        wait_until(lambda: reader.lookup(SIG, doc_b).peer_tokens == 80, 5, "indexed")
        with reader.acquire(SIG, doc_b, direct=True) as hit:
            assert hit.peer_chunks == 5 and [hit.read(i) for i in range(5)] == data_b
            assert all(hit.verify(i) for i in range(5))
        assert reader._peer_regions.path_of("holder") != old_pool and len(dropped) == 1


def test_python_client_example_runs(cluster):
    cluster.start_worker("node-a", "32MiB")
    cluster.start_worker("node-b", "32MiB")
    example = Path(__file__).parents[1] / "examples" / "python_client.py"
    result = subprocess.run([sys.executable, str(example), "node-a", "node-b"], text=True,
                            capture_output=True, timeout=60,
                            env={**os.environ, "LMSHARE_RUNTIME_DIR": str(cluster.runtime_dir)})
    assert result.returncode == 0, result.stderr
    assert "got 4 chunks, identical: True" in result.stdout


def test_ucx_one_sided_get_between_workers(cluster):
    from lmshare.transports.ucp import ucx_available

    if not ucx_available():
        pytest.skip("UCX (libucx from lmshare[ucx]) is not installed")
    cluster.start_worker("ucx-holder", "64MiB", "--transports", "ucx,tcp")
    cluster.start_worker("ucx-reader", "64MiB", "--transports", "ucx,tcp")
    doc_a, data_a = doc(4), payloads(4)
    with cluster.client("ucx-holder") as holder:
        holder.put(SIG, doc_a, data_a)
    with cluster.client("ucx-reader") as reader:
        wait_until(lambda: reader.lookup(SIG, doc_a).peer_tokens == 80, 5, "indexed")
        assert reader.get(SIG, doc_a) == data_a
        assert reader.stats()["fetched_by_transport"]["ucx"] == 5
    assert {w.worker_id: w.peer_transports for w in cluster.stats().workers}["ucx-reader"] == {"ucx": 1}
    # a stopped holder costs the deadline, not a hang, and never wrong bytes
    doc_b, data_b = doc(5), payloads(5)
    with cluster.client("ucx-holder") as holder:
        holder.put(SIG, doc_b, data_b)
    with cluster.client("ucx-reader") as reader:
        wait_until(lambda: reader.lookup(SIG, doc_b).peer_tokens == 80, 5, "indexed")
        cluster.workers["ucx-holder"].process.send_signal(signal.SIGKILL)
        cluster.workers["ucx-holder"].process.wait(5)
        started = time.monotonic()
        assert reader.get(SIG, doc_b) == []
        assert time.monotonic() - started < 7


def test_a_client_of_a_restarted_worker_is_refused_not_misled(cluster):
    cluster.start_worker("phoenix", "32MiB")
    old = cluster.client("phoenix")
    old.put(SIG, doc(6), payloads(6))
    worker = cluster.workers["phoenix"]
    worker.process.send_signal(signal.SIGKILL)
    worker.process.wait(5)
    cluster.start_worker("phoenix", "32MiB")  # same name, new pool
    with pytest.raises(WorkerRestarted, match="create a new Client"):
        old.put(SIG, doc(7), payloads(7))  # would write into a pool the worker no longer uses
    with pytest.raises(WorkerRestarted):
        old.get(SIG, doc(6))
    old.close()
    with cluster.client("phoenix") as new:
        data = payloads(7)
        assert new.put(SIG, doc(7), data) == 5
        assert new.get(SIG, doc(7)) == data


def test_a_peer_hit_acquired_with_its_lookups_plan_asks_the_controller_once(cluster):
    """A peer hit of 12 chunks looked up, then acquired in 3 batches (as the vLLM connector
    loads): with the lookup's plan (which peers hold which chunk) the acquires fetch without
    asking the controller, so the hit costs 1 controller round trip instead of 1 + 3. The plan
    is a hint: a holder the worker does not know from the controller, a chunk no longer where
    it says, or a holder whose fetch failed, sends the acquire back to the controller; a
    malformed one is refused."""
    cluster.start_worker("holder")
    cluster.start_worker("reader")
    chunks, batch = 12, 4
    namespace = SIG.namespace()
    with cluster.client("holder") as holder, cluster.client("reader") as reader:
        def controller_lookups() -> tuple[int, int]:
            """(round trips the reader counted, lookups the controller answered)"""
            return reader.stats()["counters"]["controller_lookups"], cluster.stats().lookups

        def stored(seed: int) -> tuple[list[bytes], list[bytes]]:
            tokens, data = doc(seed, chunks), payloads(seed, chunks)
            indexed = cluster.stats().chunks_indexed
            assert holder.put(SIG, tokens, data) == chunks
            wait_until(lambda: cluster.stats().chunks_indexed == indexed + chunks, 5, "indexed")
            return signature_keys(SIG, tokens), data

        def hit_costs(keys: list[bytes], data: list[bytes], with_plan: bool) -> tuple[int, int]:
            before = controller_lookups()
            plan = reader.lookup_plan(namespace, keys)
            assert (plan.local, plan.peer) == (0, chunks)
            assert plan.holders == (("holder",),) * chunks
            got = []
            for first in range(0, chunks, batch):
                hint = plan.holders[first : first + batch] if with_plan else None
                with reader.acquire_keys(namespace, keys[first : first + batch],
                                         holders=hint) as hit:
                    assert hit.peer_chunks == len(hit) == batch
                    got += [hit.read(i) for i in range(len(hit))]
            assert got == data
            after = controller_lookups()
            return after[0] - before[0], after[1] - before[1]

        without = hit_costs(*stored(10), with_plan=False)
        planned = hit_costs(*stored(11), with_plan=True)
        print(f"controller round trips per {chunks}-chunk peer hit in {chunks // batch} "
              f"batches (worker counted, controller answered): without the plan {without}, "
              f"with it {planned}")
        assert without == (1 + chunks // batch,) * 2
        assert planned == (1, 1)
        # lookup_keys keeps answering (local, peer): the hit is in the reader's pool now
        assert reader.lookup_keys(namespace, signature_keys(SIG, doc(11, chunks))) == (chunks, 0)

        # hints that do not hold are checked, never trusted: the worker asks the controller
        keys, data = stored(12)
        for hint in ([("nobody",)] * chunks,  # a worker the controller never named
                     [()] * chunks):  # "held here", but it is not
            before = controller_lookups()[0]
            with reader.acquire_keys(namespace, keys[:batch], holders=hint[:batch]) as hit:
                assert hit.peer_chunks == batch and hit.read(0) == data[0]
            assert controller_lookups()[0] == before + 1
            keys, data = keys[batch:], data[batch:]
        for bad, code in (([[7]], ErrorCode.BAD_MESSAGE), ([[""]], ErrorCode.BAD_MESSAGE),
                          ([["holder"]] * (batch + 1), ErrorCode.BAD_MESSAGE),
                          ([["x" * 300]], ErrorCode.BAD_MESSAGE),
                          ([["holder"] * 65], ErrorCode.TOO_LARGE)):
            with pytest.raises(RemoteError) as refused:
                reader.acquire_keys(namespace, keys[:batch], holders=bad)
            assert refused.value.code == code, bad
        with reader.acquire_keys(namespace, keys[:batch]) as hit:  # the worker still serves
            assert len(hit) == batch

        # a holder whose fetch failed is forgotten: the next plan naming it asks the controller
        keys, data = stored(13)
        plan = reader.lookup_plan(namespace, keys)
        cluster.workers["holder"].process.send_signal(signal.SIGKILL)
        cluster.workers["holder"].process.wait(5)
        before = controller_lookups()[0]
        with reader.acquire_keys(namespace, keys[:batch], holders=plan.holders[:batch]) as hit:
            assert len(hit) == 0  # the fetch failed: a clean miss
        assert controller_lookups()[0] == before
        reader.acquire_keys(namespace, keys[batch:], holders=plan.holders[batch:]).release()
        assert controller_lookups()[0] == before + 1
