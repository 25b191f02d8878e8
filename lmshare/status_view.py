"""What ``lmshare status`` prints: the workers' table, then each signature mismatch (the
dashboard shows mismatches with :func:`mismatch_line` too)."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from lmshare.stats import ClusterStats
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
    for column in ("worker", "address", "state", "hb age", "chunks", "used", "capacity",
                   "local hits", "peer hits", "served", "fetched", "to peers via"):
        table.add_column(column)
    for w in sorted(stats.workers, key=lambda w: w.worker_id):
        c = w.counters
        table.add_row(Text(w.worker_id), Text(w.address), Text(w.state),
                      f"{w.heartbeat_age_s:.1f}s",
                      str(w.chunks_indexed), format_size(c.used_bytes),
                      format_size(c.capacity_bytes), str(c.local_hit_chunks),
                      str(c.peer_hit_chunks), format_size(c.bytes_served),
                      format_size(c.bytes_fetched),
                      Text(" ".join(f"{t}×{n}" for t, n in sorted(w.peer_transports.items()))))
    return table


def mismatch_line(mismatch: dict) -> Text:
    """One signature mismatch (see lmshare/signatures.py), names already made printable."""
    return Text.assemble(("signature mismatch ", "bold yellow"),
                         f"{mismatch.get('worker', '')} vs {mismatch.get('peer', '')} "
                         f"({mismatch.get('model', '')}): {mismatch.get('differs', '')}")


def status_report(stats: ClusterStats) -> Group:
    """What ``lmshare status`` prints: the table, then each signature mismatch."""
    return Group(status_table(stats), *(mismatch_line(m) for m in stats.mismatches))
