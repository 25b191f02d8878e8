"""lmshare.Client(key_file=...): the local worker proves it holds the client's key (or its
tenant's credential derived from it) before the client maps its pool."""

import threading

import pytest
import zmq

from lmshare import protocol
from lmshare.client import Client
from lmshare.credentials import generate_key_file
from lmshare.errors import ConfigError
from lmshare.integrations.vllm.link import WorkerLink
from lmshare.integrations.vllm.settings import ConnectorSettings

from .conftest import run_cli


def test_a_client_with_the_key_accepts_only_a_worker_that_holds_it(cluster, tmp_path):
    acme_path = tmp_path / "acme.key"
    assert run_cli("keygen", "--tenant", "acme", "--key-file", cluster.key_file, "--out",
                   str(acme_path)).returncode == 0
    other = tmp_path / "other.key"
    generate_key_file(other)
    cluster.start_controller("--tenants", "acme")
    cluster.start_worker("w", "16MiB")
    cluster.start_worker("t", "16MiB", "--key-file", str(acme_path))
    w, t = cluster.worker_endpoint("w"), cluster.worker_endpoint("t")
    with Client(endpoint=w, key_file=cluster.key_file) as client:
        assert client.worker_id == "w"
    with Client(endpoint=t, key_file=cluster.key_file) as client:  # derives acme's
        assert client.worker_id == "t"
    with Client(endpoint=t, key_file=str(acme_path)) as client:
        assert client.worker_id == "t"
    for endpoint, key in ((w, other), (t, other), (w, acme_path)):
        with pytest.raises(ConfigError, match="does not hold this client's key"):
            Client(endpoint=endpoint, key_file=str(key))
    # the connector's key_file setting goes to its client
    link = WorkerLink(ConnectorSettings(endpoint=w, key_file=str(other), retry_s=0.1), 2.0)
    with pytest.raises(ConfigError, match="does not hold"):
        link.call(lambda c: c.worker_id)
    link.close()


def test_an_impostor_endpoint_is_refused(tmp_path):
    """A process answering hello like a worker, without the key, gets no client."""
    key = tmp_path / "cluster.key"
    generate_key_file(key)
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    endpoint = f"ipc://{runtime}/worker-fake.sock"
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.bind(endpoint)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            if sock.poll(100):
                *envelope, payload = sock.recv_multipart()
                request = protocol.decode_raw(payload)
                sock.send_multipart([*envelope, protocol.encode(protocol.ok(
                    request["id"], proof=bytes(32), tenant="", worker_id="fake",
                    incarnation="x", pool={"path": "/etc/passwd", "bytes": 4096,
                                           "gen_path": "/etc/passwd", "slab_bytes": 4096}))])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with pytest.raises(ConfigError, match="does not hold this client's key"):
            Client(endpoint=endpoint, key_file=str(key), timeout_s=2)
    finally:
        stop.set()
        thread.join()
        sock.close(linger=0)
        context.term()


def test_a_client_with_a_key_refuses_an_insecure_worker(tmp_path):
    from lmshare.local_cluster import LocalCluster

    key = tmp_path / "cluster.key"
    generate_key_file(key)
    with LocalCluster(runtime_dir=tmp_path / "c", key_file=None) as insecure:
        insecure.start_controller()
        insecure.start_worker("plain", "16MiB")
        with pytest.raises(ConfigError, match="--insecure"):
            Client(endpoint=insecure.worker_endpoint("plain"), key_file=str(key))
        with Client(endpoint=insecure.worker_endpoint("plain")) as client:  # no key: as before
            assert client.worker_id == "plain"
