"""Network faults for real: workers on two network namespaces joined by a veth pair, with
``tc netem`` delaying or dropping the reader's traffic. Needs root and iproute2."""

import json
import os
import shutil
import subprocess
import time
import uuid

import pytest

from lmshare import ModelSignature
from lmshare.local_cluster import LocalCluster
from lmshare.testing.waiting import wait_until

pytestmark = pytest.mark.netns

SIG = ModelSignature(model="netns-model", chunk_tokens=16)
HOLDER_IP, READER_IP = "10.213.0.1", "10.213.0.2"  # exist only inside the test's namespaces


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


@pytest.fixture
def namespaces():
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        pytest.skip("needs root and iproute2 (ip, tc)")
    tag = uuid.uuid4().hex[:6]
    holder, reader = f"lmsh-{tag}", f"lmsr-{tag}"
    try:
        sh("ip", "netns", "add", holder)
        sh("ip", "netns", "add", reader)
        sh("ip", "link", "add", f"h{tag}", "type", "veth", "peer", "name", f"r{tag}")
        sh("ip", "link", "set", f"h{tag}", "netns", holder)
        sh("ip", "link", "set", f"r{tag}", "netns", reader)
        for ns, dev, ip in ((holder, f"h{tag}", HOLDER_IP), (reader, f"r{tag}", READER_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create network namespaces here: {exc.stderr.decode().strip()}")
    yield holder, reader, f"h{tag}", f"r{tag}"
    subprocess.run(["ip", "netns", "del", holder], capture_output=True)
    subprocess.run(["ip", "netns", "del", reader], capture_output=True)


def tc(namespace: str, action: str, device: str, *qdisc: str) -> None:
    sh("ip", "netns", "exec", namespace, "tc", "qdisc", action, "dev", device, "root", *qdisc)


def indexed_chunks(cluster: LocalCluster, namespace: str, worker: str) -> int:
    """How many chunks the controller (in ``namespace``) indexes for ``worker``, as
    ``lmshare status --json`` run there reports them (0 until it answers)."""
    result = subprocess.run(["ip", "netns", "exec", namespace, cluster.python, "-m", "lmshare",
                             "status", "--controller", cluster.controller_address, "--json",
                             *cluster._security_args()], env=cluster.env(),
                            capture_output=True, text=True, timeout=20)
    if result.returncode != 0:
        return 0
    workers = json.loads(result.stdout)["workers"]
    return next((w["chunks_indexed"] for w in workers if w["worker_id"] == worker), 0)



def test_slow_or_dead_link_costs_the_deadline_never_wrong_bytes(namespaces, tmp_path):
    holder_ns, reader_ns, holder_dev, reader_dev = namespaces
    in_holder = ("ip", "netns", "exec", holder_ns)
    in_reader = ("ip", "netns", "exec", reader_ns)
    cluster = LocalCluster(controller_host=HOLDER_IP, heartbeat_timeout_s=30, runtime_dir=tmp_path)
    try:
        cluster.start_controller(prefix=in_holder, wait=False)  # not reachable from here
        wait_until(lambda: "listening on" in cluster.controller.log_text(), 10,
                   "the controller to listen")
        cluster.start_worker("holder", "32MiB", "--transports", "tcp", prefix=in_holder)
        cluster.start_worker("reader", "32MiB", "--transports", "tcp", "--fetch-timeout", "1",
                             prefix=in_reader)
        tokens = list(range(16 * 6))
        data = [os.urandom(300_000) for _ in range(6)]
        with cluster.client("holder") as holder, cluster.client("reader") as reader:
            holder.put(SIG, tokens, data)
            wait_until(lambda: reader.lookup(SIG, tokens).peer_tokens == 96, 10, "index")
            assert reader.get(SIG, tokens[:32]) == data[:2]  # across the veth, intact

            # a slow link (1 Mbit/s: the 1.2 MB left would take ~10 s): the 1 s fetch deadline
            # wins, and the hit is truncated to what is already local
            tc(holder_ns, "add", holder_dev, "tbf", "rate", "1mbit", "burst", "32kbit",
               "latency", "400ms")  # shapes the holder → reader direction, where chunks flow
            started = time.monotonic()
            got = reader.get(SIG, tokens)
            assert time.monotonic() - started < 4.0
            assert got == data[: len(got)] and len(got) < 6
            tc(holder_ns, "del", holder_dev)

            # a dead link (interface down): a clean miss within the deadline, no hang
            sh("ip", "-n", reader_ns, "link", "set", reader_dev, "down")
            other = list(range(5000, 5000 + 16 * 4))
            other_data = [os.urandom(100_000) for _ in range(4)]
            indexed = indexed_chunks(cluster, holder_ns, "holder")
            holder.put(SIG, other, other_data)
            # the admit reaches the controller from the holder, never the reader's lookup
            wait_until(lambda: indexed_chunks(cluster, holder_ns, "holder") == indexed + 4, 10,
                       "the holder's new chunks indexed")
            started = time.monotonic()
            assert reader.get(SIG, other) == []
            assert time.monotonic() - started < 4.0

            sh("ip", "-n", reader_ns, "link", "set", reader_dev, "up")
            wait_until(lambda: reader.get(SIG, tokens) == data, 20, "link healed")
    finally:
        cluster.stop()


def test_a_peer_behind_a_slow_link_is_not_fetched_when_recomputing_wins(namespaces, tmp_path):
    """Fetch only when it wins: the reader measures the holder's throughput from its own
    fetches; a lookup that says how fast the engine recomputes is offered the holder's chunks
    over a fast link, and not over a rate-limited one (the engine recomputes instead), and is
    offered them again once the link is fast and measured again."""
    from lmshare.keys import signature_keys

    holder_ns, reader_ns, holder_dev, _ = namespaces
    in_holder = ("ip", "netns", "exec", holder_ns)
    in_reader = ("ip", "netns", "exec", reader_ns)
    sig = ModelSignature(model="netns-rate", chunk_tokens=256)
    chunk = 512 * 1024
    recompute = 2_000.0  # tokens/s: 8 chunks of 256 tokens (4 MiB) in ~1 s, i.e. ~4 MB/s of KV
    cluster = LocalCluster(controller_host=HOLDER_IP, heartbeat_timeout_s=30, runtime_dir=tmp_path)
    try:
        cluster.start_controller(prefix=in_holder, wait=False)
        cluster.start_worker("holder", "64MiB", "--transports", "tcp", prefix=in_holder,
                             timeout_s=30)
        cluster.start_worker("reader", "64MiB", "--transports", "tcp", prefix=in_reader,
                             timeout_s=30)
        tokens = list(range(256 * 24))
        data = [os.urandom(chunk) for _ in range(24)]
        namespace, keys = sig.namespace(), signature_keys(sig, tokens)

        def offered(first: int, count: int) -> int:
            return reader.lookup_keys(namespace, keys[first : first + count], count=False,
                                      chunk_tokens=256, recompute_tokens_per_s=recompute,
                                      chunk_bytes=chunk)[1]

        with cluster.client("holder") as holder, cluster.client("reader") as reader:
            holder.put(sig, tokens, data)
            wait_until(lambda: reader.lookup(sig, tokens).peer_tokens == len(tokens), 10, "index")
            assert reader.get(sig, tokens[: 256 * 4]) == data[:4]  # measures the fast link
            assert offered(4, 8) == 8

            tc(holder_ns, "add", holder_dev, "tbf", "rate", "8mbit", "burst", "64kbit",
               "latency", "3s")  # ~1 MB/s holder -> reader, where chunks flow
            with cluster.client("reader", timeout_s=30) as slow:
                with slow.acquire_keys(namespace, keys[4:6]) as got:  # 1 MiB: measures the link
                    assert len(got) == 2
            # (lookups go through the controller, whose replies queue behind chunk bytes)
            wait_until(lambda: reader.lookup_keys(namespace, keys[8:16], count=False) == (0, 8),
                       30, "the shaped link to drain")
            assert offered(8, 8) == 0  # recomputing 2048 tokens (~1 s) beats fetching 4 MiB
            with cluster.client("reader") as reader2:
                skipped = reader2.stats()["counters"]["skipped_peer_chunks"]
            assert skipped >= 8
        tc(holder_ns, "del", holder_dev)
    finally:
        cluster.stop()
