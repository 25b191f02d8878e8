"""The controller's side of per-tenant limits: what each tenant holds across the cluster, and
the caps and TTLs each heartbeat reply hands a worker (see lmshare/tenancy.py)."""

from __future__ import annotations

import time
from typing import Any

from lmshare.controller.registry import WorkerRecord, WorkerRegistry
from lmshare.tenancy import cluster_caps

CAPS_EVERY_S = 0.2  # caps are recomputed at most this often (a heartbeat storm costs nothing)


class ClusterTenants:
    """Cluster-wide quotas and TTLs per tenant ("" = the cluster key's chunks)."""

    def __init__(self, registry: WorkerRegistry, quotas: dict[str, int],
                 ttls: dict[str, float]) -> None:
        self.registry = registry
        self.quotas, self.ttls = dict(quotas), dict(ttls)
        self._caps: dict[str, dict[str, int]] = {}
        self._caps_at = 0.0

    @staticmethod
    def attribute(record: WorkerRecord, reported: Any) -> dict[str, int]:
        """The bytes per tenant a heartbeat reports (checked by the schema). A tenant's worker
        holds only its own tenant's chunks, whatever it says."""
        if not isinstance(reported, dict):
            return {}
        if record.tenant:
            return {record.tenant: sum(reported.values())}
        return dict(reported)

    def held(self) -> dict[str, dict[str, int]]:
        """{worker: {tenant: bytes}} of the live workers."""
        return {w.worker_id: w.tenant_bytes for w in self.registry.workers.values()
                if self.registry.state(w) != "dead" and w.tenant_bytes}

    def totals(self) -> dict[str, int]:
        """Bytes each tenant holds in the live workers' pools."""
        totals: dict[str, int] = {}
        for pools in self.held().values():
            for tenant, nbytes in pools.items():
                totals[tenant] = totals.get(tenant, 0) + nbytes
        return totals

    def reply_fields(self, record: WorkerRecord) -> dict[str, Any]:
        """What a heartbeat reply tells ``record``: its caps (tenants near or over their cluster
        quota) and the TTLs of the tenants it stores for."""
        if not self.quotas and not self.ttls:
            return {}
        now = time.monotonic()
        if self.quotas and now - self._caps_at >= CAPS_EVERY_S:
            self._caps, self._caps_at = cluster_caps(self.quotas, self.held()), now
        ttls = {record.tenant: self.ttls[record.tenant]} if record.tenant in self.ttls else {}
        if not record.tenant:
            ttls = dict(self.ttls)  # a cluster-key worker stores for any tenant
        return {"tenant_caps": self._caps.get(record.worker_id, {}), "tenant_ttls": ttls}
