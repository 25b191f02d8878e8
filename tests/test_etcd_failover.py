"""Two controllers elect a leader through a real etcd (Debian's etcd-server, on loopback); the
standby takes over when the leader is killed, and workers carry on without restarting."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from lmshare import ModelSignature
from lmshare.control import ControllerClient
from lmshare.errors import ControllerUnavailable
from lmshare.local_cluster import LocalCluster, free_port
from lmshare.testing.waiting import wait_until

pytest.importorskip("aetcd", reason="needs the etcd client (pip install 'lmshare[etcd]')")
SIG = ModelSignature(model="ha-model", chunk_tokens=16)


@pytest.fixture
def etcd(tmp_path):
    binary = shutil.which("etcd")
    if binary is None:
        pytest.skip("needs Debian's etcd-server")
    client_port, peer_port = free_port(), free_port()
    process = subprocess.Popen(
        [binary, "--data-dir", str(tmp_path / "etcd"), "--name", "test",
         "--listen-client-urls", f"http://127.0.0.1:{client_port}",
         "--advertise-client-urls", f"http://127.0.0.1:{client_port}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
         "--initial-cluster", f"test=http://127.0.0.1:{peer_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    yield f"127.0.0.1:{client_port}"
    process.terminate()
    process.wait(10)


def role(port: int, key=None) -> str:
    client = ControllerClient("127.0.0.1", port, timeout_s=0.5, key=key)
    try:
        return client.call("ping")["role"]
    except ControllerUnavailable:
        return "down"
    finally:
        client.close()




def test_standby_takes_over_and_workers_follow(etcd, tmp_path):
    ports = [free_port(), free_port()]
    cluster = LocalCluster(runtime_dir=tmp_path, heartbeat_timeout_s=3,
                           controllers=",".join(f"127.0.0.1:{p}" for p in ports))
    controllers = []
    try:
        for index, port in enumerate(ports):
            controllers.append(cluster._spawn(f"controller-{index}", [
                "controller", "--port", str(port), "--etcd", etcd, "--election-ttl", "2",
                "--heartbeat-timeout", "3"]))
        leader = wait_until(lambda: next((p for p in ports if role(p, cluster.key) == "leader"),
                                         None), 20, "a leader")
        assert [role(p, cluster.key) for p in ports].count("leader") == 1
        cluster.start_worker("w1")
        cluster.start_worker("w2")
        tokens = list(range(16 * 4))
        data = [os.urandom(100_000) for _ in range(4)]
        with cluster.client("w1") as w1, cluster.client("w2") as w2:
            w1.put(SIG, tokens, data)
            wait_until(lambda: w2.lookup(SIG, tokens).peer_tokens == 64, 10, "index")
            assert w2.get(SIG, tokens) == data

            # the leader dies: the standby is elected, the workers register with it and
            # send full syncs; peer lookups work again without restarting any worker
            controllers[ports.index(leader)].process.send_signal(signal.SIGKILL)
            survivor = ports[1 - ports.index(leader)]
            started = time.monotonic()
            wait_until(lambda: role(survivor, cluster.key) == "leader", 15,
                       "the standby to take over")
            more = list(range(1000, 1000 + 16 * 2))
            more_data = [os.urandom(100_000) for _ in range(2)]
            w1.put(SIG, more, more_data)
            wait_until(lambda: w2.lookup(SIG, more).peer_tokens == 32, 15, "peer hits again")
            assert time.monotonic() - started < 20
            assert w2.get(SIG, more) == more_data

        def status() -> dict:
            result = subprocess.run([cluster.python, "-m", "lmshare", "status", "--json",
                                     "--controller", cluster.controllers],
                                    capture_output=True, text=True, timeout=30, env=cluster.env())
            assert result.returncode == 0, result.stderr
            return json.loads(result.stdout)

        wait_until(lambda: {w["worker_id"] for w in status()["workers"]
                            if w["state"] == "alive"} == {"w1", "w2"}, 15, "both registered")
        assert status()["role"] == "leader" and status()["leader"] == f"127.0.0.1:{survivor}"
    finally:
        cluster.stop()
        for controller in controllers:
            controller.terminate(5)
