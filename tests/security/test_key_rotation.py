"""Key rotation without a restart: a running cluster (controller and workers started through
the CLI) steps its key file through add-next, promote and retire, each followed by SIGHUP,
while a client keeps storing on one worker and reading through the other over TCP; no request
fails, and afterwards the old key opens nothing."""

import os
import shutil
import signal
import threading
import time

import pytest

from lmshare import ModelSignature
from lmshare.control import ControllerClient
from lmshare.credentials import load_key_file, reload_key, rotate_key_file
from lmshare.errors import ConfigError, ControllerUnavailable
from lmshare.keys import signature_keys
from lmshare.pool import KVPool
from lmshare.testing.waiting import wait_until
from lmshare.transports.base import PeerInfo
from lmshare.transports.tcp import TcpTransport
from lmshare.worker.peer_fetch import PoolSink

from .conftest import run_cli

SIG = ModelSignature(model="rotation-model", chunk_tokens=16)


class Traffic(threading.Thread):
    """Store a new prompt on one worker, read it through the other (a peer fetch over TCP);
    every failure, short read or wrong byte is recorded."""

    def __init__(self, writer, reader) -> None:
        super().__init__(daemon=True)
        self.writer, self.reader = writer, reader
        self.rounds = 0
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        number = 0
        while not self.stop.is_set():
            number += 1
            tokens = list(range(number * 1000, number * 1000 + 48))
            data = [os.urandom(64 << 10) for _ in range(3)]
            try:
                self.writer.put(SIG, tokens, data)
                deadline = time.monotonic() + 10
                while self.reader.lookup(SIG, tokens).peer_tokens < 48:
                    if time.monotonic() > deadline:
                        raise TimeoutError("the index never showed the new prompt")
                    time.sleep(0.02)
                got = self.reader.get(SIG, tokens)
                if got != data:
                    self.failures.append(f"round {number}: read {len(got)} of 3 chunks "
                                         f"({'wrong bytes' if len(got) == 3 else 'short'})")
            except Exception as exc:  # any failed request is what this test looks for
                self.failures.append(f"round {number}: {type(exc).__name__}: {exc}")
            self.rounds += 1


def holder_peer(cluster, name: str) -> PeerInfo:
    worker = next(w for w in cluster.stats().workers if w.worker_id == name)
    host, port = worker.address.rsplit(":", 1)
    return PeerInfo(name, host, int(port))


def reloads(process) -> int:
    return process.log_text().count("key reloaded from")


def test_rotating_the_key_in_a_running_cluster_fails_no_request(cluster, tmp_path):
    old = tmp_path / "old.key"
    shutil.copy(cluster.key_file, old)
    os.chmod(old, 0o600)
    cluster.start_controller()
    cluster.start_worker("rot-w1", "32MiB", "--transports", "tcp")
    cluster.start_worker("rot-w2", "32MiB", "--transports", "tcp")
    processes = [cluster.controller, *cluster.workers.values()]
    with cluster.client("rot-w1") as writer, cluster.client("rot-w2") as reader:
        traffic = Traffic(writer, reader)
        traffic.start()
        try:
            wait_until(lambda: traffic.rounds >= 2, 30, "traffic flows")
            # connections opened with the old key before the rotation (an ex-member's)
            early_keys = signature_keys(SIG, list(range(1000, 1048)))
            early_peer = holder_peer(cluster, "rot-w1")
            early_data = TcpTransport(key=load_key_file(old))
            early_pool = KVPool(4 << 20, name=f"rot-early-{os.getpid()}")
            assert early_data.fetch(early_peer, early_keys, PoolSink(early_pool, SIG.namespace()),
                                    time.monotonic() + 5) == 3
            for key in early_keys:
                early_pool.remove(key)
            early_control = ControllerClient("127.0.0.1", cluster.controller_port, 2.0,
                                             key=load_key_file(old))
            early_control.call("ping")
            for number, step in enumerate(("add-next", "promote", "retire"), start=1):
                done = run_cli("keygen", "--rotate", step, "--key-file", cluster.key_file)
                assert done.returncode == 0, done.stderr
                for process in processes:
                    os.kill(process.process.pid, signal.SIGHUP)
                for process in processes:
                    wait_until(lambda p=process, n=number: reloads(p) >= n, 15,
                               f"{process.name} reloads the key ({step})")
                rounds = traffic.rounds
                wait_until(lambda r=rounds: traffic.rounds >= r + 3, 60,
                           f"requests go on after {step}")
        finally:
            traffic.stop.set()
            traffic.join(timeout=30)
        assert not traffic.failures, traffic.failures
        # what the old key opened before is closed to it now
        with pytest.raises(ControllerUnavailable):
            early_control.call("ping", timeout_s=1.0)
        early_control.close()
        cluster.key = load_key_file(cluster.key_file)
        assert early_data.fetch(early_peer, early_keys, PoolSink(early_pool, SIG.namespace()),
                                time.monotonic() + 5) == 0
        early_data.close()
        early_pool.close()
        assert traffic.rounds >= 10

        new = load_key_file(cluster.key_file)
        assert not new.accepted and new.secret != load_key_file(old).secret
        # the new key reaches everything; the old one nothing
        status = run_cli("status", "--controller", cluster.controller_address, "--json",
                         "--key-file", cluster.key_file)
        assert status.returncode == 0 and "rot-w2" in status.stdout, status.stderr
        refused = run_cli("status", "--controller", cluster.controller_address,
                          "--key-file", str(old), "--timeout", "1")
        assert refused.returncode != 0
        peer = holder_peer(cluster, "rot-w1")
        keys = signature_keys(SIG, list(range(traffic.rounds * 1000, traffic.rounds * 1000 + 48)))
        pool = KVPool(4 << 20, name=f"rot-attacker-{os.getpid()}")
        try:
            stale = TcpTransport(key=load_key_file(old))
            assert stale.fetch(peer, keys,
                               PoolSink(pool, SIG.namespace()), time.monotonic() + 3) == 0
            stale.close()
        finally:
            pool.close()
        tokens = list(range(10**6, 10**6 + 48))  # members still store and read, over TCP
        data = [os.urandom(64 << 10) for _ in range(3)]
        writer.put(SIG, tokens, data)
        wait_until(lambda: reader.lookup(SIG, tokens).peer_tokens == 48, 10, "index")
        assert reader.get(SIG, tokens) == data


def test_rotation_steps_and_reload_checks(tmp_path):
    path = tmp_path / "cluster.key"
    assert run_cli("keygen", "--out", str(path)).returncode == 0
    first = load_key_file(path)
    server = first.curve_server()[0]
    for step, wrong in (("add-next", "retire"), ("promote", "add-next"), ("retire", "promote")):
        refused = run_cli("keygen", "--rotate", wrong, "--key-file", str(path))
        assert refused.returncode != 0 and "first" in refused.stderr, refused.stderr
        before = load_key_file(path)
        after = rotate_key_file(path, step)
        assert reload_key(before) == load_key_file(path) == after
        assert after.curve_server()[0] == server  # clients keep the controller's key
        assert set(before.secrets) & set(after.secrets)
        assert os.stat(path).st_mode & 0o777 == 0o600
    # a tenant's credential follows the rotation when remade
    tenant = tmp_path / "acme.key"
    assert run_cli("keygen", "--tenant", "acme", "--key-file", str(path), "--out",
                   str(tenant)).returncode == 0
    rotate_key_file(path, "add-next")
    again = run_cli("keygen", "--tenant", "acme", "--key-file", str(path), "--out", str(tenant),
                    "--replace")
    assert again.returncode == 0, again.stderr
    acme = load_key_file(tenant)
    assert acme.tenant == "acme" and len(acme.secrets) == 2
    assert acme.server_public == server
    # a file that shares no key with the running one is not taken
    other = tmp_path / "other.key"
    assert run_cli("keygen", "--out", str(other)).returncode == 0
    shutil.copy(other, path)
    with pytest.raises(ConfigError, match="shares no secret"):
        reload_key(first)
