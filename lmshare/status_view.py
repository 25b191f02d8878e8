"""What ``lmshare status`` prints: the workers' table, a line per controller shard (with
shards), then each signature mismatch (the dashboard shows shards and mismatches with
:func:`shard_line` and :func:`mismatch_line` too)."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from lmshare.stats import ClusterStats, ShardView
from lmshare.units import format_size


def status_table(stats: ClusterStats) -> Table:
    local, peer, miss = stats.hit_rates()
    table = Table(title=Text(
        f"controller {stats.controller_id} · up {stats.uptime_s:.0f}s · "
        f"{stats.count('alive')} alive / {stats.count('suspect')} suspect / "
        f"{stats.count('dead')} dead · {stats.chunks_indexed} chunks · "
        f"{format_size(stats.bytes_cached)} of {format_size(stats.capacity_bytes)} · "
        f"hits local {local:.0%} peer {peer:.0%} miss {miss:.0%} · "
        f"lookup p50 {stats.lookup_p50_us:.0f}µs p99 {stats.lookup_p99_us:.0f}µs"))
    # with shards, the workers are shard 0's view of them: their chunks are those it indexes
    chunks = "chunks (shard 0)" if stats.shards else "chunks"
    for column in ("worker", "address", "state", "hb age", chunks, "used", "capacity",
                   "local hits", "peer hits", "served", "fetched", "to peers via"):
        table.add_column(column)
    for w in sorted(stats.workers, key=lambda w: w.worker_id):
        c = w.counters
        table.add_row(Text(w.worker_id), Text(w.address), Text(w.shown_state),
                      f"{w.heartbeat_age_s:.1f}s",
                      str(w.chunks_indexed), format_size(c.used_bytes),
                      format_size(c.capacity_bytes), str(c.local_hit_chunks),
                      str(c.peer_hit_chunks), format_size(c.bytes_served),
                      format_size(c.bytes_fetched),
                      Text(" ".join(f"{t}×{n}" for t, n in sorted(w.peer_transports.items()))))
    return table


def tenant_name(tenant: str) -> str:
    return tenant or "(cluster key)"


def tenant_table(stats: ClusterStats) -> Table:
    """One row per tenant (every tenant for the operator's key, a tenant's own for its
    credential): what it holds, its acquires' hits and misses, what its limits cost it."""
    table = Table(title="tenants")
    for column in ("tenant", "workers", "chunks", "used", "quota", "ttl", "hits", "misses",
                   "stored", "quota evictions", "refused", "expired"):
        table.add_column(column)
    for t in stats.tenants:
        table.add_row(Text(tenant_name(t.tenant)), str(t.workers), str(t.entries),
                      format_size(t.used_bytes),
                      format_size(t.quota_bytes) if t.quota_bytes else "-",
                      f"{t.ttl_s:g}s" if t.ttl_s else "-", str(t.hit_chunks),
                      str(t.miss_chunks), str(t.admits), str(t.quota_evictions),
                      str(t.quota_refusals), str(t.expired))
    return table


def mismatch_line(mismatch: dict) -> Text:
    """One signature mismatch (see lmshare/signatures.py), names already made printable."""
    return Text.assemble(("signature mismatch ", "bold yellow"),
                         f"{mismatch.get('worker', '')} vs {mismatch.get('peer', '')} "
                         f"({mismatch.get('model', '')}): {mismatch.get('differs', '')}")


def shard_line(view: ShardView) -> Text:
    """One controller shard's part of the index, or why it did not answer."""
    if view.error:
        return Text.assemble((f"shard {view.shard} ", "bold"), ("unreachable", "bold red"),
                             f": {view.error}")
    return Text.assemble((f"shard {view.shard} ", "bold"),
                         f"{view.chunks_indexed:,} chunks indexed · {view.lookups:,} lookups")


def misses_line(stats: ClusterStats) -> Text:
    """Why the last minute's missed chunks were missed, by reason, most first."""
    reasons = sorted(((r, n) for r, n in stats.miss_reasons.items() if n > 0),
                     key=lambda item: -item[1])
    total = sum(n for _, n in reasons)
    return Text.assemble((f"missed in the last {len(stats.hit_history)}s ", "bold"),
                         " · ".join(f"{r} {n} ({n / total:.0%})" for r, n in reasons))


def status_report(stats: ClusterStats) -> Group:
    """What ``lmshare status`` prints: the table, the tenants' (when any tenant has figures),
    why the last minute's chunks were missed (when any were), then each signature mismatch."""
    tenants = [tenant_table(stats)] if any(t.tenant for t in stats.tenants) else []
    missed = [misses_line(stats)] if any(stats.miss_reasons.values()) else []
    return Group(status_table(stats), *(shard_line(view) for view in stats.shards), *tenants,
                 *missed, *(mismatch_line(m) for m in stats.mismatches))
