"""Tenants as an access boundary: each tenant's workers run with the tenant's credential
(``lmshare keygen --tenant``) and learn of, and fetch from, only each other."""

import os
import time

import pytest

from lmshare import ModelSignature
from lmshare.control import ControllerClient
from lmshare.credentials import load_key_file
from lmshare.errors import ControllerUnavailable, RemoteError
from lmshare.keys import signature_keys
from lmshare.pool import KVPool
from lmshare.testing.waiting import wait_until
from lmshare.transports.base import PeerInfo
from lmshare.transports.tcp import TcpTransport
from lmshare.worker.peer_fetch import PoolSink

from .conftest import run_cli

SIG = ModelSignature(model="tenant-model", chunk_tokens=16)


def credential(cluster, tmp_path, tenant: str):
    path = tmp_path / f"{tenant}.key"
    made = run_cli("keygen", "--tenant", tenant, "--key-file", cluster.key_file, "--out",
                   str(path))
    assert made.returncode == 0, made.stderr
    return path, load_key_file(path)


def test_tenants_see_and_fetch_only_their_own(cluster, tmp_path):
    acme_path, acme = credential(cluster, tmp_path, "acme")
    globex_path, globex = credential(cluster, tmp_path, "globex")
    outsider_path, _ = credential(cluster, tmp_path, "initech")  # not admitted
    cluster.start_controller("--tenants", "acme,globex")
    cluster.start_worker("a1", "16MiB", "--key-file", str(acme_path))
    cluster.start_worker("a2", "16MiB", "--key-file", str(acme_path))
    cluster.start_worker("g1", "16MiB", "--key-file", str(globex_path))
    tokens = list(range(16 * 4))
    keys = signature_keys(SIG, tokens)  # globex can compute them: same model, same prompt
    data = [os.urandom(100_000) for _ in range(4)]
    with cluster.client("a1") as a1, cluster.client("a2") as a2, cluster.client("g1") as g1:
        a1.put(SIG, tokens, data)
        wait_until(lambda: a2.lookup(SIG, tokens).peer_tokens == 64, 10, "acme's index")
        assert a2.get(SIG, tokens) == data  # the same tenant shares
        assert g1.lookup(SIG, tokens).tokens == 0  # another tenant learns nothing
        with g1.acquire(SIG, tokens) as hit:
            assert len(hit) == 0
        assert g1.stats()["counters"]["entries"] == 0

    # globex's credential, used directly: the controller hides acme's chunks and workers
    client = ControllerClient("127.0.0.1", cluster.controller_port, 2.0, key=globex)
    try:
        with pytest.raises(RemoteError) as unknown:
            client.call("lookup", namespace=SIG.namespace(), keys=keys)
        assert unknown.value.code == "unknown_namespace"
        stats = client.call("stats")["stats"]
        assert [w["worker_id"] for w in stats["workers"]] == ["g1"] and not stats["events"]
        # nor can it take over an acme worker's name
        with pytest.raises(RemoteError, match="another tenant"):
            client.call("register", worker_id="a1", host="127.0.0.1", data_port=9,
                        transports=["tcp"], capacity_bytes=1, host_id="h")
    finally:
        client.close()
    # and acme's data port refuses globex (and the cluster key) at the handshake
    a1_view = next(w for w in cluster.stats().workers if w.worker_id == "a1")
    host, port = a1_view.address.rsplit(":", 1)
    reader = KVPool(8 << 20, name="tenant-reader")
    try:
        for key in (globex, cluster.key):
            transport = TcpTransport(key=key)
            assert transport.fetch(PeerInfo("a1", host, int(port)), keys,
                                   PoolSink(reader, SIG.namespace()), time.monotonic() + 3) == 0
            transport.close()
        assert TcpTransport(key=acme).fetch(PeerInfo("a1", host, int(port)), keys[:1],
                                            PoolSink(reader, SIG.namespace()),
                                            time.monotonic() + 3) == 1
    finally:
        reader.close()
    # a tenant the controller does not admit gets nothing at all
    outsider = ControllerClient("127.0.0.1", cluster.controller_port, 1.0,
                                key=load_key_file(outsider_path))
    try:
        with pytest.raises(ControllerUnavailable):
            outsider.call("stats")
    finally:
        outsider.close()
    # the operator (the cluster key) sees every worker with its tenant
    assert {w.worker_id: w.tenant for w in cluster.stats().workers} == \
        {"a1": "acme", "a2": "acme", "g1": "globex"}
    status = run_cli("status", "--controller", cluster.controller_address, "--json",
                     "--key-file", str(globex_path), env=cluster.env())
    assert status.returncode == 0 and '"g1"' in status.stdout and '"a1"' not in status.stdout
