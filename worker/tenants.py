"""A worker's tenants: who owns each chunk of its pool, and the limits each tenant stores under.

A chunk's tenant is its namespace's: on a worker run with a tenant's credential, always that
tenant; on a worker run with the cluster key, the tenant its local clients name for the
namespace (``ModelSignature.tenant``, sent with reserve and acquire; chunks fetched from peers
for an acquire belong to the acquirer's tenant). The limits are the worker's own
(``--tenant-quota``, ``--tenant-ttl``) tightened by what the controller sends in heartbeat
replies (cluster-wide caps and TTLs, see lmshare/tenancy.py).
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

from lmshare.credentials import TENANT_NAME
from lmshare.errors import ProtocolError
from lmshare.pool import KVPool
from lmshare.protocol import MAX_COUNTER
from lmshare.tenancy import MAX_TENANTS, merge_limits

log = logging.getLogger(__name__)


def _tenant_map(value: Any, kind: type) -> dict[str, Any]:
    """A controller's {tenant: number} (bounded, typed); {} for anything else."""
    if not isinstance(value, dict) or len(value) > MAX_TENANTS:
        return {}
    result = {}
    for tenant, number in value.items():
        if not isinstance(tenant, str) or (tenant and not TENANT_NAME.match(tenant)):
            continue
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            continue
        if not (math.isfinite(number) and 0 < number < MAX_COUNTER):
            continue
        result[tenant] = kind(number)
    return result


class PoolTenants:
    """The tenants of one worker's pool and the limits applied to them."""

    def __init__(self, pool: KVPool, tenant: str, quotas: dict[str, int],
                 ttls: dict[str, float]) -> None:
        self.pool = pool
        pool.tenant = tenant
        self.tenant = tenant  # the credential's ("" = the cluster key)
        self.quotas, self.ttls = dict(quotas), dict(ttls)
        self.caps: dict[str, int] = {}  # the controller's cluster-wide caps for this pool
        self._reads: dict[str, list[int]] = {}  # tenant → [hit chunks, miss chunks] of acquires
        self.cluster_ttls: dict[str, float] = {}
        self._lock = threading.Lock()
        pool.set_tenant_limits(merge_limits(self.quotas, self.ttls))

    def bind(self, namespace: bytes, declared: Any) -> None:
        """Note the tenant a local client names for ``namespace`` (None: it names none)."""
        if declared is None or declared == "":
            return
        if not isinstance(declared, str) or not TENANT_NAME.match(declared):
            raise ProtocolError(f"tenant {declared!r:.80} is not a tenant name")
        if self.tenant and declared != self.tenant:
            raise ProtocolError(f"this worker runs with tenant {self.tenant}'s credential: its "
                                f"clients store as {self.tenant}, not {declared}")
        bound = self.pool.bind_namespace(namespace, declared)
        if bound != declared:
            raise ProtocolError(f"this namespace's chunks belong to tenant {bound or '(cluster)'}"
                                f" in this pool, not to {declared}")

    def count_acquire(self, namespace: bytes, hits: int, misses: int) -> None:
        """Count an acquire's hit and missed chunks for the namespace's tenant."""
        tenant = self.pool.tenant_of(namespace)
        with self._lock:
            reads = self._reads.get(tenant)
            if reads is None:
                if len(self._reads) >= 4 * MAX_TENANTS:
                    return
                reads = self._reads[tenant] = [0, 0]
            reads[0] += hits
            reads[1] += misses

    def figures(self) -> dict[str, dict[str, int]]:
        """Per tenant: what it holds in the pool, and its acquires' and limits' counts."""
        with self._lock:
            reads = {t: list(r) for t, r in self._reads.items()}
        result = {}
        for tenant, usage in self.pool.tenant_usage().items():
            result[tenant] = {**usage.to_dict(), "hit_chunks": 0, "miss_chunks": 0}
        for tenant, (hits, misses) in reads.items():
            entry = result.setdefault(tenant, {"used_bytes": 0, "entries": 0})
            entry["hit_chunks"], entry["miss_chunks"] = hits, misses
        return result

    def heartbeat_fields(self) -> dict[str, Any]:
        """What each heartbeat reports: each tenant's figures in this pool (the largest
        tenants first, at most MAX_TENANTS)."""
        figures = self.figures()
        ranked = sorted(figures.items(), key=lambda item: -item[1].get("used_bytes", 0))
        return {"tenants": {t: {k: max(0, int(v)) for k, v in f.items()}
                            for t, f in ranked[:MAX_TENANTS]}}

    def on_heartbeat_reply(self, reply: dict[str, Any]) -> None:
        """Apply the controller's caps and TTLs; trim tenants above their new cap at once."""
        caps = _tenant_map(reply.get("tenant_caps"), int)
        ttls = _tenant_map(reply.get("tenant_ttls"), float)
        with self._lock:
            if caps == self.caps and ttls == self.cluster_ttls:
                changed = False
            else:
                self.caps, self.cluster_ttls, changed = caps, ttls, True
                limits = merge_limits(self.quotas, self.ttls, caps, ttls)
        if not changed:
            return
        self.pool.set_tenant_limits(limits)
        usage = self.pool.tenant_usage()
        for tenant, cap in caps.items():
            held = usage.get(tenant)
            if held is not None and held.used_bytes > cap:
                freed = self.pool.trim_tenant(tenant, held.used_bytes - cap)
                log.info("tenant %s is over its cluster quota: evicted %d bytes of its own "
                         "chunks (cap in this pool %d bytes)", tenant or "(cluster)", freed, cap)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per tenant: its figures in this pool and the limits it is held to."""
        limits = self.pool.tenant_limits()
        result = {}
        for tenant, figures in self.figures().items():
            limit = limits.get(tenant)
            result[tenant] = {**figures,
                              "quota_bytes": limit.quota_bytes if limit else None,
                              "ttl_s": limit.ttl_s if limit else None}
        return result
