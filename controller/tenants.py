"""The controller's side of tenants' limits and figures: what each tenant holds across the
cluster, the caps and TTLs each heartbeat reply hands a worker (see lmshare/tenancy.py), and
the per-tenant view of ``stats``."""

from __future__ import annotations

import time
from typing import Any

from lmshare.controller.registry import WorkerRecord, WorkerRegistry
from lmshare.credentials import TENANT_NAME
from lmshare.stats import TENANT_FIGURES, TenantView
from lmshare.tenancy import cluster_caps

CAPS_EVERY_S = 0.2  # caps are recomputed at most this often (a heartbeat storm costs nothing)


class ClusterTenants:
    """Cluster-wide quotas, TTLs and figures per tenant ("" = the cluster key's chunks)."""

    def __init__(self, registry: WorkerRegistry, quotas: dict[str, int],
                 ttls: dict[str, float]) -> None:
        self.registry = registry
        self.quotas, self.ttls = dict(quotas), dict(ttls)
        self._caps: dict[str, dict[str, int]] = {}
        self._caps_at = 0.0

    @staticmethod
    def attribute(record: WorkerRecord, reported: Any) -> dict[str, dict[str, int]]:
        """The figures per tenant a heartbeat reports (typed by the schema), as the controller
        keeps them: a tenant's worker holds only its own tenant's chunks, whatever it says; a
        cluster-key worker's tenant names must be tenant names."""
        if not isinstance(reported, dict):
            return {}
        figures: dict[str, dict[str, int]] = {}
        for tenant, numbers in reported.items():
            if record.tenant:
                tenant = record.tenant
            elif tenant and not TENANT_NAME.match(tenant):
                continue
            into = figures.setdefault(tenant, dict.fromkeys(TENANT_FIGURES, 0))
            for name in TENANT_FIGURES:
                into[name] += int(numbers.get(name, 0))
        return figures

    def _live(self) -> list[WorkerRecord]:
        return [w for w in self.registry.workers.values() if self.registry.state(w) != "dead"]

    def held(self) -> dict[str, dict[str, int]]:
        """{worker: {tenant: bytes}} of the live workers."""
        return {w.worker_id: {t: f["used_bytes"] for t, f in w.tenant_figures.items()}
                for w in self._live() if w.tenant_figures}

    def views(self, tenant: str | None = None) -> list[TenantView]:
        """Every tenant's figures over the live workers (``tenant``: that one's only), with
        its cluster-wide limits."""
        views: dict[str, TenantView] = {}
        for worker in self._live():
            names = set(worker.tenant_figures) | ({worker.tenant} if worker.tenant else set())
            for name in names:
                if tenant is not None and name != tenant:
                    continue
                view = views.setdefault(name, TenantView(name))
                view.workers += 1
                for figure, value in worker.tenant_figures.get(name, {}).items():
                    setattr(view, figure, getattr(view, figure) + value)
        if tenant is not None and tenant not in views:
            views[tenant] = TenantView(tenant)
        for name, view in views.items():
            view.quota_bytes = self.quotas.get(name, 0)
            view.ttl_s = self.ttls.get(name, 0.0)
        return sorted(views.values(), key=lambda v: (-v.used_bytes, v.tenant))

    def reply_fields(self, record: WorkerRecord) -> dict[str, Any]:
        """What a heartbeat reply tells ``record``: its caps (tenants near or over their cluster
        quota) and the TTLs of the tenants it stores for."""
        if not self.quotas and not self.ttls:
            return {}
        now = time.monotonic()
        if self.quotas and now - self._caps_at >= CAPS_EVERY_S:
            self._caps, self._caps_at = cluster_caps(self.quotas, self.held()), now
        if record.tenant:
            ttls = {record.tenant: self.ttls[record.tenant]} if record.tenant in self.ttls else {}
        else:
            ttls = dict(self.ttls)  # a cluster-key worker stores for any tenant
        return {"tenant_caps": self._caps.get(record.worker_id, {}), "tenant_ttls": ttls}
