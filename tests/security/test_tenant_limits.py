"""Per-tenant byte quotas (in a pool and across the cluster) and TTLs, set through the CLI:
a tenant over its quota loses its own chunks, or is refused, never another tenant's; a chunk
past its tenant's TTL is not served and its room is reclaimed."""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmshare import ModelSignature
from lmshare.errors import PoolFullError, RemoteError
from lmshare.keys import signature_keys
from lmshare.pool import KVPool, TenantLimits
from lmshare.testing.waiting import wait_until

from .conftest import run_cli

CHUNK = 256 << 10
ACME = ModelSignature(model="quota-model", chunk_tokens=16, tenant="acme")
GLOBEX = ModelSignature(model="quota-model", chunk_tokens=16, tenant="globex")


def tokens(count: int, start: int = 0) -> list[int]:
    return list(range(start, start + 16 * count))


def chunks(count: int) -> list[bytes]:
    return [os.urandom(CHUNK) for _ in range(count)]


def tenant_figures(client, tenant: str) -> dict:
    return client.stats()["tenants"].get(tenant, {})


def test_a_tenant_at_its_pool_quota_evicts_its_own_chunks_then_is_refused(cluster):
    cluster.start_controller()
    cluster.start_worker("quota-w1", "16MiB", "--tenant-quota", "acme=1MiB")
    with cluster.client("quota-w1") as client:
        globex_data = chunks(4)
        client.put(GLOBEX, tokens(4), globex_data)
        first = chunks(4)
        assert client.put(ACME, tokens(4), first) == 4  # 1 MiB: at its quota
        later = chunks(2)
        assert client.put(ACME, tokens(2, start=10_000), later) == 2
        # acme's two oldest chunks made room; globex lost nothing though the pool had room
        assert client.lookup(ACME, tokens(4), peers=False).tokens == 0  # its first chunk went
        assert client.get(ACME, tokens(2, start=10_000)) == later
        assert client.get(GLOBEX, tokens(4)) == globex_data
        acme = tenant_figures(client, "acme")
        assert acme["used_bytes"] <= 1 << 20 and acme["quota_bytes"] == 1 << 20
        assert acme["quota_evictions"] == 2
        assert tenant_figures(client, "globex")["entries"] == 4

        # every acme chunk in use: a new one is refused, and still nothing of globex's goes
        kept = signature_keys(ACME, tokens(4))[2:] + signature_keys(ACME, tokens(2, start=10_000))
        hits = [client.acquire_keys(ACME.namespace(), [key], peers=False) for key in kept]
        try:
            assert [len(hit) for hit in hits] == [1, 1, 1, 1]
            with pytest.raises(RemoteError) as refused:
                client.put(ACME, tokens(4, start=50_000), chunks(4))
            assert refused.value.code == "pool_full" and "quota" in refused.value.message
        finally:
            for hit in hits:
                hit.release()
        assert client.get(GLOBEX, tokens(4)) == globex_data
        assert tenant_figures(client, "acme")["quota_refusals"] >= 1


def test_chunks_past_their_tenants_ttl_are_not_served_and_are_reclaimed(cluster):
    cluster.start_controller("--tenant-ttl", "globex=3600")
    cluster.start_worker("ttl-w1", "16MiB", "--tenant-ttl", "acme=1")
    cluster.start_worker("ttl-w2", "16MiB")
    with cluster.client("ttl-w1") as holder, cluster.client("ttl-w2") as reader:
        acme_data, globex_data = chunks(3), chunks(3)
        holder.put(ACME, tokens(3), acme_data)
        holder.put(GLOBEX, tokens(3), globex_data)
        assert tenant_figures(holder, "acme")["ttl_s"] == 1.0
        assert tenant_figures(holder, "globex")["ttl_s"] == 3600  # the controller's
        # expired: gone from the pool (reclaimed, counted) and from the cluster's index
        wait_until(lambda: tenant_figures(holder, "acme").get("expired") == 3, 15,
                   "acme's chunks expire")
        assert holder.lookup(ACME, tokens(3), peers=False).tokens == 0
        with holder.acquire(ACME, tokens(3)) as hit:
            assert len(hit) == 0
        assert tenant_figures(holder, "acme")["used_bytes"] == 0
        wait_until(lambda: reader.lookup(ACME, tokens(3)).peer_tokens == 0, 10,
                   "the index forgets expired chunks")
        assert reader.get(ACME, tokens(3)) == []
        # another tenant's chunks stay, locally and for peers
        assert holder.get(GLOBEX, tokens(3)) == globex_data
        wait_until(lambda: reader.lookup(GLOBEX, tokens(3)).peer_tokens == 48, 10, "index")
        assert reader.get(GLOBEX, tokens(3)) == globex_data


def test_a_tenant_over_its_cluster_quota_loses_only_its_own_chunks(cluster):
    cluster.start_controller("--tenant-quota", "acme=2MiB", "--heartbeat-interval", "0.3")
    cluster.start_worker("cq-w1", "16MiB")
    cluster.start_worker("cq-w2", "16MiB")
    with cluster.client("cq-w1") as w1, cluster.client("cq-w2") as w2:
        g1, g2 = chunks(4), chunks(4)
        w1.put(GLOBEX, tokens(4), g1)
        w2.put(GLOBEX, tokens(4, start=20_000), g2)
        w1.put(ACME, tokens(8), chunks(8))  # 2 MiB in each pool: 4 MiB in all
        w2.put(ACME, tokens(8, start=30_000), chunks(8))

        def acme_total() -> int:
            return sum(tenant_figures(c, "acme").get("used_bytes", 0) for c in (w1, w2))

        wait_until(lambda: acme_total() <= 2 << 20, 15, "acme trimmed to its cluster quota")
        assert acme_total() >= (2 << 20) - 2 * CHUNK  # trimmed to the quota, not emptied
        # globex's chunks are all there, in both pools
        assert w1.get(GLOBEX, tokens(4), peers=False) == g1
        assert w2.get(GLOBEX, tokens(4, start=20_000), peers=False) == g2
        # more acme stores stay within the quota (each pool holds its share)
        w1.put(ACME, tokens(4, start=60_000), chunks(4))
        wait_until(lambda: acme_total() <= 2 << 20, 15, "still within the quota")
        assert tenant_figures(w1, "acme")["quota_evictions"] >= 4
        assert tenant_figures(w1, "globex")["entries"] == 4


def test_a_tenants_worker_stores_only_as_that_tenant(cluster, tmp_path):
    path = tmp_path / "acme.key"
    assert run_cli("keygen", "--tenant", "acme", "--key-file", cluster.key_file,
                   "--out", str(path)).returncode == 0
    cluster.start_controller("--tenants", "acme")
    cluster.start_worker("tenant-w1", "16MiB", "--key-file", str(path),
                         "--tenant-quota", "acme=512KiB")
    with cluster.client("tenant-w1") as client:
        with pytest.raises(RemoteError) as refused:
            client.put(GLOBEX, tokens(1), chunks(1))
        assert refused.value.code == "bad_message" and "acme" in refused.value.message
        plain = ModelSignature(model="quota-model", chunk_tokens=16)  # names no tenant
        assert client.put(plain, tokens(2), chunks(2)) == 2  # acme's: the quota applies
        assert client.put(plain, tokens(1, start=5_000), chunks(1)) == 1
        figures = tenant_figures(client, "acme")
        assert figures["used_bytes"] == 2 * CHUNK and figures["quota_evictions"] == 1
        with pytest.raises(RemoteError) as refused:  # more at once than its whole quota
            client.put(plain, tokens(3, start=9_000), chunks(3))
        assert refused.value.code == "pool_full"


@pytest.mark.parametrize("args, message", [
    (["--tenant-quota", "acme"], "give TENANT=VALUE"),
    (["--tenant-quota", "acme=lots"], "acme=lots"),
    (["--tenant-quota", "acme=0"], "above 0"),
    (["--tenant-quota", "a b=1GiB"], "not a tenant name"),
    (["--tenant-quota", "acme=1GiB,acme=2GiB"], "twice"),
    (["--tenant-ttl", "acme=-5"], "above 0"),
    (["--tenant-ttl", "acme=soon"], "in seconds"),
])
def test_bad_tenant_limits_are_refused_with_a_clear_message(args, message):
    for command in (["worker", "--controller", "127.0.0.1:1"], ["controller", "--port", "0"]):
        done = run_cli(*command, "--insecure", *args)
        assert done.returncode != 0 and message in done.stderr, (command, done.stderr)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["acme", "globex", ""]), st.integers(1, 3),
                          st.booleans()), min_size=1, max_size=40))
def test_pool_quotas_never_evict_another_tenants_chunks(operations):
    """Any sequence of stores (some pinned) of three tenants, two with quotas: each tenant
    stays within its quota, and a store that meets a quota removes only its tenant's chunks."""
    slab = 4096
    pool = KVPool(64 * slab, slab, name=f"quota-prop-{os.getpid()}")
    try:
        quotas = {"acme": 6 * slab, "globex": 10 * slab}
        pool.set_tenant_limits({t: TenantLimits(quota_bytes=q) for t, q in quotas.items()})
        for tenant in ("acme", "globex", ""):
            pool.bind_namespace(tenant.encode().ljust(16, b"."), tenant)
        pinned = []
        for number, (tenant, slabs, pin) in enumerate(operations):
            namespace = tenant.encode().ljust(16, b".")
            before = {t: pool.tenant_usage().get(t) for t in ("acme", "globex", "")}
            key = number.to_bytes(16, "big")
            try:
                pool.put(namespace, key, os.urandom(slabs * slab))
            except PoolFullError:
                pass
            after = pool.tenant_usage()
            for other in {"acme", "globex", ""} - {tenant}:
                if before[other] is not None:  # nobody else's chunk went for this store
                    assert after[other].entries >= before[other].entries
            for name, quota in quotas.items():
                assert after.get(name) is None or after[name].used_bytes <= quota
            if pin and pool.contains(key):
                pinned.append(pool.pin(key))
        total = sum(u.used_bytes for u in pool.tenant_usage().values())
        assert total == pool.stats().used_bytes
    finally:
        for entry in pinned:
            pool.unpin(entry)
        pool.close()
