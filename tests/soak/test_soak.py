"""Soak: a cluster under mixed traffic while workers join, stop (SIGTERM), die (SIGKILL) and
freeze (SIGSTOP), and the controller restarts. Not in ``make test``: ``make soak`` runs it for
LMSHARE_SOAK_S seconds (default there: 300) and prints its figures (docs/reliability.md).

Checked: 0 wrong bytes ever returned; after each fault a new document put on one stable worker
is a peer hit on the other again (the time it took is reported); the stable workers' RSS and
open descriptors stay flat; shared-memory files are exactly those of the live workers once dead
workers' files are cleaned."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import threading
import time

import pytest

from lmshare.errors import LMShareError
from lmshare.keys import ModelSignature
from lmshare.local_cluster import LocalCluster
from lmshare.shm import remove_stale_regions
from lmshare.testing.waiting import wait_until

SOAK_S = float(os.environ.get("LMSHARE_SOAK_S", "0"))
pytestmark = pytest.mark.skipif(SOAK_S <= 0, reason="a soak test: run it with make soak")

SIG = ModelSignature(model="soak-model", chunk_tokens=16)
CHUNKS = 4


def tokens(doc: int) -> list[int]:
    return [doc * 100_000 + i for i in range(CHUNKS * SIG.chunk_tokens)]


def chunk(doc: int, i: int) -> bytes:
    seed = hashlib.sha256(f"{doc}/{i}".encode()).digest()
    return seed * (20_000 // len(seed))


def payload(doc: int) -> list[bytes]:
    return [chunk(doc, i) for i in range(CHUNKS)]


def rss(pid: int) -> int:
    """Private resident memory (the shared pools a process maps and touches are not its own)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon"))


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_kinds(pid: int) -> dict[str, int]:
    """Open descriptors by what they are (for a failure message)."""
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        kind = target.split(":")[0] if ":" in target else target
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


class Traffic(threading.Thread):
    """Puts and gets of random documents on every live worker; checks every byte it gets."""

    def __init__(self, cluster: LocalCluster, names: list[str]) -> None:
        super().__init__(daemon=True)
        self.cluster, self.names = cluster, names
        self.stop = threading.Event()
        self.ops = self.errors = self.wrong = 0

    def run(self) -> None:
        rnd = random.Random(7)
        while not self.stop.is_set():
            name = rnd.choice(list(self.names))
            doc = rnd.randrange(200)
            try:
                with self.cluster.client(name, timeout_s=3) as client:
                    for _ in range(10):
                        if rnd.random() < 0.3:
                            client.put(SIG, tokens(doc), payload(doc))
                        else:
                            got = client.get(SIG, tokens(doc))
                            if got != payload(doc)[:len(got)]:
                                self.wrong += 1
                        self.ops += 1
                        doc = rnd.randrange(200)
            except (LMShareError, OSError):
                self.errors += 1  # a worker being faulted: expected, bytes are what counts
                self.stop.wait(0.05)


def test_soak(tmp_path, shm_dir, capsys):
    cluster = LocalCluster(heartbeat_timeout_s=1.5, runtime_dir=tmp_path)
    cluster.extra_env["LMSHARE_SHM_DIR"] = str(shm_dir)
    cluster.start_controller("--heartbeat-interval", "0.3")
    stable = ("s1", "s2")
    churn = ("c1", "c2", "c3")
    live = set(stable)
    for name in stable:
        cluster.start_worker(name, "64MiB")
    traffic = Traffic(cluster, sorted(live))
    rnd = random.Random(1)
    faults: list[tuple[str, float]] = []
    stops: list[tuple[str, float]] = []  # how long SIGTERM / SIGKILL took to end a worker
    fresh = [10_000]

    def recovered() -> float:
        """Seconds until a new document put on s1 is a byte-exact peer hit on s2."""
        started = time.monotonic()
        doc = fresh[0] = fresh[0] + 1
        with cluster.client("s1") as s1, cluster.client("s2") as s2:
            wait_until(lambda: s1.put(SIG, tokens(doc), payload(doc)) is not None and
                       s2.lookup(SIG, tokens(doc)).peer_tokens == CHUNKS * SIG.chunk_tokens,
                       30, "the index to hold a new document again")
            with s2.acquire(SIG, tokens(doc)) as hit:
                assert hit.peer_chunks == CHUNKS
                assert [bytes(hit.read(i)) for i in range(CHUNKS)] == payload(doc)
        return time.monotonic() - started

    try:
        recovered()
        for name in churn:  # warm up with every worker: each peer's mapping and sockets exist
            cluster.start_worker(name, "32MiB")
            live.add(name)
        traffic.names = sorted(live)
        traffic.start()
        time.sleep(min(20.0, SOAK_S / 5))
        base = {n: (rss(cluster.workers[n].process.pid), fds(cluster.workers[n].process.pid))
                for n in stable}
        deadline = time.monotonic() + SOAK_S
        while time.monotonic() < deadline:
            kind = rnd.choice(["join", "sigterm", "sigkill", "sigstop", "controller"])
            idle = [n for n in churn if n not in live]
            running = [n for n in churn if n in live]
            if kind == "join" or not running and kind != "controller":
                if not idle:
                    continue
                name = rnd.choice(idle)
                cluster.start_worker(name, "32MiB")
                live.add(name)
                traffic.names = sorted(live)
                kind = "join"
            elif kind == "controller":
                cluster.controller.terminate()
                cluster.start_controller("--heartbeat-interval", "0.3")
            else:
                name = rnd.choice(running)
                process = cluster.workers[name].process
                if kind == "sigstop":
                    process.send_signal(signal.SIGSTOP)
                    time.sleep(3.0)  # longer than the heartbeat timeout: declared dead
                    process.send_signal(signal.SIGCONT)
                    wait_until(lambda n=name: any(w.worker_id == n and w.state == "alive"
                                                  for w in cluster.stats().workers),
                               30, f"{name} to be back in the cluster after SIGCONT")
                else:
                    live.discard(name)
                    traffic.names = sorted(live)
                    stopping = time.monotonic()
                    process.send_signal(signal.SIGTERM if kind == "sigterm" else signal.SIGKILL)
                    try:
                        process.wait(60)
                    except subprocess.TimeoutExpired:
                        raise AssertionError(f"{name} did not stop within 60 s of {kind}: "
                                             f"{cluster.workers[name].log_text()[-3000:]}"
                                             ) from None
                    stops.append((kind, time.monotonic() - stopping))
            faults.append((kind, recovered()))
            assert traffic.wrong == 0
            time.sleep(rnd.uniform(0.5, 2.0))
        traffic.stop.set()
        traffic.join(30)
        end = {n: (rss(cluster.workers[n].process.pid), fds(cluster.workers[n].process.pid))
               for n in stable}
        kinds = {n: fd_kinds(cluster.workers[n].process.pid) for n in stable}
        # every file is old enough to be judged; the locks of live owners protect theirs
        for path in shm_dir.glob("lmshare-*"):
            os.utime(path, (0, 0))
        remove_stale_regions()
        files = {p.name for p in shm_dir.glob("lmshare-*")}
        regions = {name for name in files if not name.startswith("lmshare-worker-")}
        locks = {name for name in files if name.startswith("lmshare-worker-")}
        assert {name.rsplit("-", 1)[1].removesuffix(".lock") for name in locks} == live
        assert len(regions) == 2 * len(live)  # a pool and its generations per live worker
    finally:
        traffic.stop.set()
        cluster.stop()
    assert traffic.wrong == 0
    assert traffic.ops > 100
    for name in stable:
        (rss0, fds0), (rss1, fds1) = base[name], end[name]
        assert rss1 - rss0 < 24 << 20, f"{name} RSS grew {(rss1 - rss0) >> 20} MiB"
        assert fds1 - fds0 <= 8, f"{name} open descriptors {fds0} -> {fds1}: {kinds[name]}"
    by_kind: dict[str, list[float]] = {}
    for kind, seconds in faults:
        by_kind.setdefault(kind, []).append(seconds)
    with capsys.disabled():
        print(f"\nsoak {SOAK_S:.0f}s: {len(faults)} faults, {traffic.ops} operations, "
              f"{traffic.errors} client errors during faults, {traffic.wrong} wrong bytes")
        for kind, times in sorted(by_kind.items()):
            print(f"  {kind:10s} x{len(times):3d}: peer hits back in "
                  f"max {max(times):.2f}s, mean {sum(times) / len(times):.2f}s")
        for kind in ("sigterm", "sigkill"):
            times = [t for k, t in stops if k == kind]
            if times:
                print(f"  {kind} to exit: max {max(times):.2f}s, mean "
                      f"{sum(times) / len(times):.2f}s")
        for name in stable:
            (rss0, fds0), (rss1, fds1) = base[name], end[name]
            print(f"  {name}: private RSS {rss0 >> 20} -> {rss1 >> 20} MiB, "
                  f"fds {fds0} -> {fds1}")
        print(f"  shared-memory files at the end: {len(files)} for {len(live)} live workers")
