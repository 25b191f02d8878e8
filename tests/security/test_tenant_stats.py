"""Stats and the dashboard per tenant, through the CLI: the operator's key sees every tenant's
figures, a tenant's credential its own only, and outsiders nothing."""

import json
import os

from lmshare import ModelSignature
from lmshare.credentials import generate_key_file
from lmshare.local_cluster import free_port
from lmshare.testing.waiting import wait_until

from .conftest import run_cli, scrape

CHUNK = 100_000
MODEL = "tenant-stats-model"


def credential(cluster, tmp_path, tenant: str) -> str:
    path = tmp_path / f"{tenant}.key"
    made = run_cli("keygen", "--tenant", tenant, "--key-file", cluster.key_file, "--out",
                   str(path))
    assert made.returncode == 0, made.stderr
    return str(path)


def status(cluster, key_file: str, *extra: str):
    return run_cli("status", "--controller", cluster.controller_address, "--key-file",
                   key_file, "--timeout", "2", *extra)


def tenants_of(cluster, key_file: str) -> dict[str, dict]:
    done = status(cluster, key_file, "--json")
    assert done.returncode == 0, done.stderr
    return {t["tenant"]: t for t in json.loads(done.stdout)["tenants"]}


def test_each_credential_sees_its_own_tenants_figures_and_the_operator_all(cluster, tmp_path):
    acme, globex = credential(cluster, tmp_path, "acme"), credential(cluster, tmp_path, "globex")
    metrics_port = free_port()
    cluster.start_controller("--tenants", "acme,globex", "--tenant-quota", "acme=8MiB",
                             "--tenant-ttl", "globex=3600", "--heartbeat-interval", "0.3",
                             "--metrics-port", str(metrics_port))
    cluster.start_worker("ts-a1", "16MiB", "--key-file", acme)
    cluster.start_worker("ts-g1", "16MiB", "--key-file", globex)
    cluster.start_worker("ts-op", "16MiB")  # the operator's, its clients naming their tenant
    plain = ModelSignature(model=MODEL, chunk_tokens=16)
    initech = ModelSignature(model=MODEL, chunk_tokens=16, tenant="initech")
    with cluster.client("ts-a1") as a1, cluster.client("ts-g1") as g1, \
            cluster.client("ts-op") as op:
        a1.put(plain, list(range(48)), [os.urandom(CHUNK) for _ in range(3)])
        assert len(a1.get(plain, list(range(48)))) == 3  # 3 hits
        assert a1.get(plain, list(range(1000, 1016))) == []  # 1 miss
        g1.put(plain, list(range(32)), [os.urandom(CHUNK) for _ in range(2)])
        op.put(initech, list(range(16)), [os.urandom(CHUNK)])

        def operator_view():
            seen = tenants_of(cluster, cluster.key_file)
            ready = (seen.get("acme", {}).get("hit_chunks") == 3
                     and seen.get("globex", {}).get("entries") == 2
                     and seen.get("initech", {}).get("entries") == 1)
            return ready and seen

        seen = wait_until(operator_view, 20, "every tenant's figures reach the controller")
        assert seen["acme"]["workers"] == 1 and seen["acme"]["entries"] == 3
        assert seen["acme"]["used_bytes"] >= 3 * CHUNK and seen["acme"]["miss_chunks"] == 1
        assert seen["acme"]["quota_bytes"] == 8 << 20
        assert seen["globex"]["ttl_s"] == 3600 and seen["globex"]["used_bytes"] >= 2 * CHUNK
        assert seen["initech"]["entries"] == 1
        metrics = scrape(metrics_port)  # the operator's scrape: the same figures per tenant
        assert metrics[("lmshare_controller_tenant_entries", (("tenant", "acme"),))] == 3
        assert metrics[("lmshare_controller_tenant_quota_bytes", (("tenant", "acme"),))] \
            == 8 << 20
        assert metrics[("lmshare_controller_tenant_chunks_total",
                        (("event", "hit"), ("tenant", "acme")))] == 3

        # a tenant's credential: its own figures, and no word of the others
        done = status(cluster, acme, "--json")
        assert done.returncode == 0, done.stderr
        mine = json.loads(done.stdout)["tenants"]
        assert [t["tenant"] for t in mine] == ["acme"] and mine[0]["entries"] == 3
        assert "globex" not in done.stdout and "initech" not in done.stdout
        theirs = {t["tenant"]: t for t in json.loads(status(cluster, globex, "--json").stdout)
                  ["tenants"]}
        assert list(theirs) == ["globex"] and theirs["globex"]["entries"] == 2

        # the text status and the dashboard show the same rows
        text = status(cluster, cluster.key_file)
        assert text.returncode == 0 and "tenants" in text.stdout
        for name in ("acme", "globex", "initech"):
            assert name in text.stdout
        board = run_cli("dashboard", "--controller", cluster.controller_address, "--once",
                        "--key-file", cluster.key_file)
        assert board.returncode == 0, board.stderr
        assert "tenants: 3" in board.stdout, board.stdout
        acme_row = next(line for line in board.stdout.splitlines() if line.startswith("acme"))
        assert "3 ch" in acme_row and "/8.0M" in acme_row and "hit 75% of 4" in acme_row
        own = run_cli("dashboard", "--controller", cluster.controller_address, "--once",
                      "--key-file", acme)
        assert own.returncode == 0 and "tenants: 1" in own.stdout
        assert "globex" not in own.stdout and "initech" not in own.stdout

    # an outsider (another cluster's key, or none) learns nothing, not even the names
    stranger = generate_key_file(tmp_path / "stranger.key")
    for args in (["--key-file", stranger.path], ["--insecure"]):
        done = run_cli("status", "--controller", cluster.controller_address, "--json",
                       "--timeout", "1", *args)
        assert done.returncode != 0
        assert "acme" not in done.stdout + done.stderr
