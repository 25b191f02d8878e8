"""Per-tenant limits: byte quotas (in each pool and cluster-wide) and TTLs.

Settings are given as ``TENANT=VALUE`` items (``--tenant-quota acme=2GiB --tenant-ttl
acme=600``, repeatable or comma-separated) on workers (a quota in that pool, a TTL of what it
stores) and on the controller (a quota over the whole cluster, a TTL it hands every worker).

The cluster-wide quota is met by the workers: each heartbeat tells the controller how many
bytes each tenant holds in the pool, and a tenant over its cluster quota gets, in every
heartbeat reply, a cap in each pool that holds it (its share of the quota, in proportion to
what the pool holds; given from half the quota on, so the caps add up to the quota before it is
reached, and a pool that held none of the tenant may overshoot for one heartbeat); the worker then evicts that tenant's own least-recently-used chunks down
to the cap and holds its new ones to it, as with a pool quota. Another tenant's chunks are never
evicted for it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from lmshare.credentials import TENANT_NAME
from lmshare.errors import ConfigError
from lmshare.pool import TenantLimits
from lmshare.units import parse_size

CLUSTER_TENANT = "-"  # how settings name the cluster key's own chunks (tenant "")
MAX_TENANTS = 64  # tenants a heartbeat reports, and settings name


def _items(values: Iterable[str], option: str) -> list[tuple[str, str]]:
    items = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            name, sep, setting = item.partition("=")
            name = name.strip()
            if not sep or not setting.strip():
                raise ConfigError(f"{option} {item!r}: give TENANT=VALUE, e.g. {option} "
                                  "acme=" + ("2GiB" if "quota" in option else "600"))
            if name != CLUSTER_TENANT and not TENANT_NAME.match(name):
                raise ConfigError(f"{option} {item!r}: {name!r} is not a tenant name (1-64 "
                                  "letters, digits, '.', '_' or '-'; '-' names the cluster "
                                  "key's own chunks)")
            items.append((name, setting.strip()))
    if len(items) > MAX_TENANTS:
        raise ConfigError(f"{option} names {len(items)} tenants; at most {MAX_TENANTS}")
    return items


def _tenant(name: str) -> str:
    return "" if name == CLUSTER_TENANT else name


def parse_quotas(values: Iterable[str], option: str = "--tenant-quota") -> dict[str, int]:
    """``["acme=2GiB", "globex=512MiB,initech=1GiB"]`` → {tenant: bytes}; ConfigError else."""
    quotas: dict[str, int] = {}
    for name, setting in _items(values, option):
        try:
            size = parse_size(setting)
        except (ConfigError, ValueError) as exc:
            raise ConfigError(f"{option} {name}={setting}: {exc}") from None
        if size <= 0:
            raise ConfigError(f"{option} {name}={setting}: a quota must be above 0 bytes")
        if _tenant(name) in quotas:
            raise ConfigError(f"{option} names tenant {name!r} twice")
        quotas[_tenant(name)] = size
    return quotas


def parse_ttls(values: Iterable[str], option: str = "--tenant-ttl") -> dict[str, float]:
    """``["acme=600"]`` → {tenant: seconds}; ConfigError for anything but positive seconds."""
    ttls: dict[str, float] = {}
    for name, setting in _items(values, option):
        try:
            seconds = float(setting.removesuffix("s"))
        except ValueError:
            raise ConfigError(f"{option} {name}={setting}: give the TTL in seconds") from None
        if not (math.isfinite(seconds) and seconds > 0):
            raise ConfigError(f"{option} {name}={setting}: a TTL must be a finite number of "
                              "seconds above 0")
        if _tenant(name) in ttls:
            raise ConfigError(f"{option} names tenant {name!r} twice")
        ttls[_tenant(name)] = seconds
    return ttls


def merge_limits(quotas: Mapping[str, int], ttls: Mapping[str, float],
                 caps: Mapping[str, int] | None = None,
                 cluster_ttls: Mapping[str, float] | None = None) -> dict[str, TenantLimits]:
    """A pool's limits: its own quotas and TTLs, tightened by the controller's caps and TTLs."""
    caps, cluster_ttls = caps or {}, cluster_ttls or {}
    limits = {}
    for tenant in {*quotas, *ttls, *caps, *cluster_ttls}:
        quota = min((q for q in (quotas.get(tenant), caps.get(tenant)) if q is not None),
                    default=None)
        ttl = min((t for t in (ttls.get(tenant), cluster_ttls.get(tenant)) if t is not None),
                  default=None)
        limits[tenant] = TenantLimits(quota, ttl)
    return limits


def cluster_caps(quotas: Mapping[str, int], held: Mapping[str, Mapping[str, int]]
                 ) -> dict[str, dict[str, int]]:
    """{worker: {tenant: cap}} for the tenants near or over their cluster quota (above half of
    it): each pool's share of the quota, in proportion to what it holds of the tenant, so the
    caps add up to the quota. ``held`` is {worker: {tenant: bytes}} of the live workers."""
    totals: dict[str, int] = {}
    for pools in held.values():
        for tenant, nbytes in pools.items():
            totals[tenant] = totals.get(tenant, 0) + nbytes
    caps: dict[str, dict[str, int]] = {}
    for tenant, quota in quotas.items():
        total = totals.get(tenant, 0)
        if total <= quota // 2:  # far from the quota: no pool needs a cap
            continue
        for worker, pools in held.items():
            nbytes = pools.get(tenant, 0)
            if nbytes:
                caps.setdefault(worker, {})[tenant] = max(1, quota * nbytes // total)
    return caps
