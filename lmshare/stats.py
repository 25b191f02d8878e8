"""The cluster's live numbers, as the controller reports them. ``lmshare status`` and the
dashboard both read this one data model (from the controller's ``stats`` reply)."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

from lmshare.errors import LMShareError
from lmshare.misses import MISS_REASONS, counter_name

MAX_NAME_CHARS = 200
MAX_TENANT_VIEWS = 1024
MAX_MISMATCHES = 200  # signature mismatches one stats reply lists


def printable(text: Any, limit: int = MAX_NAME_CHARS) -> str:
    """``text`` safe to print on a terminal: control and format characters (escape codes,
    bidirectional overrides…) become ``?``, and it is cut to ``limit`` characters. Every name
    that reaches ``status`` or the dashboard passes here (and they print it as plain Text, never
    as rich markup)."""
    return "".join("?" if unicodedata.category(ch)[0] == "C" else ch
                   for ch in str(text)[:limit])


@dataclass
class WorkerCounters:
    """Counters a worker reports in every heartbeat (monotonic, since the worker started)."""

    capacity_bytes: int = 0
    used_bytes: int = 0
    free_bytes: int = 0  # free slabs × slab size: what more chunks can take without evicting
    entries: int = 0
    pinned_entries: int = 0
    local_hit_chunks: int = 0
    peer_hit_chunks: int = 0
    direct_peer_chunks: int = 0  # peer hits a local client read in the holder's memory itself
    miss_chunks: int = 0
    bytes_served: int = 0
    bytes_fetched: int = 0
    fetch_failures: int = 0
    in_flight_fetches: int = 0
    lookups: int = 0
    skipped_peer_chunks: int = 0  # peer chunks not offered: recomputing was expected to win
    controller_lookups: int = 0  # lookups this worker asked the controller (one round trip each)
    admits: int = 0
    evictions: int = 0
    refused_connections: int = 0  # data-plane connections that failed the key handshake
    refused_chunks: int = 0  # fetched chunks refused for the size their holder announced
    digest_mismatches: int = 0  # fetched chunks whose bytes differed from the writer's digest
    # chunks missed, by reason (lmshare/misses.py; their sum but partial_chunk is miss_chunks)
    miss_new_prefix: int = 0
    miss_evicted: int = 0
    miss_holder_gone: int = 0
    miss_fetch_failed: int = 0
    miss_deadline: int = 0
    miss_recompute_faster: int = 0
    miss_partial_chunk: int = 0
    miss_unknown_namespace: int = 0
    miss_controller_unreachable: int = 0
    miss_peers_off: int = 0
    handed_off_chunks: int = 0  # chunks only it held that peers took over when it drained
    taken_over_chunks: int = 0  # chunks it fetched from draining peers

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerCounters:
        names = {f.name for f in fields(cls)}
        return cls(**{k: int(v) for k, v in data.items() if k in names and isinstance(v, (int, float))})

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def misses_by_reason(self) -> dict[str, int]:
        """{reason: chunks} of every miss reason (lmshare/misses.py)."""
        return {reason: getattr(self, counter_name(reason)) for reason in MISS_REASONS}


@dataclass
class WorkerView:
    """One worker as the controller sees it."""

    worker_id: str
    address: str
    host_id: str
    transports: list[str]
    state: str  # "alive" | "suspect" | "dead" | "left"
    heartbeat_age_s: float
    chunks_indexed: int
    counters: WorkerCounters
    # per-second rates over the last heartbeats
    served_bytes_per_s: float = 0.0
    fetched_bytes_per_s: float = 0.0
    # transport this worker uses towards the other live workers → how many peers
    peer_transports: dict[str, int] = field(default_factory=dict)
    # KV namespaces its clients look up: {"namespace": hex, "chunk_tokens": n, "lookups": n}
    namespaces: list[dict] = field(default_factory=list)
    tenant: str = ""  # the tenant whose credential the worker runs with ("" = cluster key)
    draining: bool = False  # handing the chunks only it holds to peers before it leaves

    @property
    def shown_state(self) -> str:
        """The state as tables print it: a live worker that is leaving reads "draining"."""
        return "draining" if self.draining and self.state in ("alive", "suspect") else self.state


_WORKER_FIELDS = frozenset(f for f in WorkerView.__dataclass_fields__)


def _worker_dict(view: WorkerView) -> dict[str, Any]:
    out = dict(view.__dict__)
    out["counters"] = dict(view.counters.__dict__)
    out["transports"] = list(view.transports)
    out["peer_transports"] = dict(view.peer_transports)
    out["namespaces"] = [dict(n) for n in view.namespaces]
    return out


TENANT_FIGURES = ("used_bytes", "entries", "admits", "hit_chunks", "miss_chunks",
                  "quota_evictions", "quota_refusals", "expired")


@dataclass
class TenantView:
    """One tenant's figures over the live workers' pools ("" = the cluster key's chunks):
    what it holds now, its acquires' hits and misses and what its limits cost it (since the
    workers started), and its cluster-wide limits (0 = none)."""

    tenant: str
    workers: int = 0  # pools holding its chunks, or running with its credential
    used_bytes: int = 0
    entries: int = 0
    admits: int = 0
    hit_chunks: int = 0
    miss_chunks: int = 0
    quota_evictions: int = 0
    quota_refusals: int = 0
    expired: int = 0
    quota_bytes: int = 0
    ttl_s: float = 0.0

    @classmethod
    def from_dict(cls, data: Any) -> TenantView | None:
        if not isinstance(data, dict):
            return None
        view = cls(printable(data.get("tenant", ""), 64))
        for name in ("workers", *TENANT_FIGURES, "quota_bytes"):
            value = data.get(name, 0)
            setattr(view, name, int(value) if isinstance(value, (int, float)) else 0)
        ttl = data.get("ttl_s", 0.0)
        view.ttl_s = float(ttl) if isinstance(ttl, (int, float)) else 0.0
        return view


@dataclass
class ShardView:
    """One controller shard's part of the index (``lmshare status`` and the dashboard show a
    line per shard when the key space is in shards)."""

    shard: str  # K/N
    chunks_indexed: int = 0
    lookups: int = 0
    error: str = ""  # why it did not answer ("" = it did)

    @classmethod
    def from_dict(cls, data: Any) -> ShardView | None:
        if not isinstance(data, dict):
            return None
        numbers = [data.get(name, 0) for name in ("chunks_indexed", "lookups")]
        return cls(printable(data.get("shard", ""), 20),
                   *(int(n) if isinstance(n, (int, float)) else 0 for n in numbers),
                   printable(data.get("error", ""), 400))


@dataclass
class ClusterEvent:
    time: float  # unix time
    kind: str  # join | leave | dead | restart | refused | resync
    detail: str


@dataclass
class ClusterStats:
    """Everything the dashboard and ``lmshare status`` show."""

    controller_id: str
    controller_epoch: int
    uptime_s: float
    workers: list[WorkerView]
    chunks_indexed: int
    multi_holder_chunks: int
    namespaces: int
    lookups: int
    lookup_p50_us: float
    lookup_p99_us: float
    # cluster hit rates over the last minute, one sample per second: (local, peer, miss) chunks
    hit_history: list[tuple[int, int, int]] = field(default_factory=list)
    events: list[ClusterEvent] = field(default_factory=list)
    refused_messages: int = 0
    role: str = "leader"  # "leader", or "standby" when controllers elect one through etcd
    leader: str = ""  # HOST:PORT of the leader, when elected through etcd
    # control-plane connections refused (no or wrong cluster key), by reason
    refused_connections: dict[str, int] = field(default_factory=dict)
    secure: bool = False  # the controller runs with a cluster key (CURVE)
    # ``workers`` is one page of a big cluster: workers [offset, offset + len) of this many
    workers_total: int = 0
    workers_offset: int = 0
    # namespaces no other worker shares while another serves the same model: {"worker",
    # "namespace", "model", "peer", "peer_namespace", "fields": [{"field", "mine", "theirs"}],
    # "differs", "text"} (controller/signatures.py)
    mismatches: list[dict] = field(default_factory=list)
    # chunks missed over the hit-history window, by reason (lmshare/misses.py)
    miss_reasons: dict[str, int] = field(default_factory=dict)
    # per tenant (lmshare/tenancy.py): every tenant for the cluster key, a tenant's own only
    # for its credential
    tenants: list[TenantView] = field(default_factory=list)
    shard: str = "0/1"  # the controller's part of the key space (K/N, lmshare/shards.py)
    # with shards: each shard's part, in order (``chunks_indexed`` is then their sum, and the
    # workers are shard 0's view of them); empty without shards
    shards: list[ShardView] = field(default_factory=list)

    @property
    def bytes_cached(self) -> int:
        return sum(w.counters.used_bytes for w in self.workers if w.state in ("alive", "suspect"))

    @property
    def capacity_bytes(self) -> int:
        return sum(w.counters.capacity_bytes for w in self.workers if w.state in ("alive", "suspect"))

    def count(self, state: str) -> int:
        return sum(1 for w in self.workers if w.state == state)

    def hit_rates(self) -> tuple[float, float, float]:
        """(local, peer, miss) fractions of chunks asked for over the history window."""
        local = sum(h[0] for h in self.hit_history)
        peer = sum(h[1] for h in self.hit_history)
        miss = sum(h[2] for h in self.hit_history)
        total = local + peer + miss
        if not total:
            return (0.0, 0.0, 0.0)
        return (local / total, peer / total, miss / total)

    def to_dict(self) -> dict[str, Any]:
        # as asdict() gives it, without its deep copies: 1000 workers took ~200 ms that way
        out = dict(self.__dict__)
        out["workers"] = [_worker_dict(w) for w in self.workers]
        out["events"] = [asdict(e) for e in self.events]
        out["tenants"] = [asdict(t) for t in self.tenants]
        out["shards"] = [asdict(s) for s in self.shards]
        out["hit_history"] = [tuple(h) for h in self.hit_history]
        for name in ("refused_connections", "miss_reasons"):
            out[name] = dict(out[name])
        out["mismatches"] = [dict(m) for m in self.mismatches]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterStats:
        workers = []
        for w in data.get("workers", []):
            w = dict(w)
            w["counters"] = WorkerCounters.from_dict(w.get("counters", {}))
            w["transports"] = [printable(t, 20) for t in w.get("transports", [])]
            for name in ("worker_id", "address", "host_id", "state", "tenant"):
                w[name] = printable(w.get(name, ""))
            w["peer_transports"] = {printable(t, 20): n
                                    for t, n in dict(w.get("peer_transports", {})).items()}
            w["draining"] = w.get("draining") is True
            workers.append(WorkerView(**{k: v for k, v in w.items() if k in _WORKER_FIELDS}))
        events = [ClusterEvent(e["time"], printable(e["kind"], 20), printable(e["detail"], 400))
                  for e in data.get("events", [])]
        history = [tuple(h) for h in data.get("hit_history", [])]
        mismatches = [_mismatch(m) for m in list(data.get("mismatches") or [])[:MAX_MISMATCHES]
                      if isinstance(m, dict)]
        reasons = {r: int(n) for r, n in dict(data.get("miss_reasons") or {}).items()
                   if r in MISS_REASONS and isinstance(n, (int, float))}
        tenants = [t for t in (TenantView.from_dict(d) for d in list(data.get("tenants") or [])
                               [:MAX_TENANT_VIEWS]) if t is not None]
        shards = [v for v in (ShardView.from_dict(d) for d in list(data.get("shards") or [])
                              [:256]) if v is not None]
        rest = {k: v for k, v in data.items()
                if k not in ("workers", "events", "hit_history", "mismatches", "miss_reasons",
                             "tenants", "shards")}
        for name in ("controller_id", "role", "leader", "shard"):
            if name in rest:
                rest[name] = printable(rest[name])
        return cls(workers=workers, events=events, hit_history=history, mismatches=mismatches,
                   miss_reasons=reasons, tenants=tenants, shards=shards, **rest)


def _mismatch(data: dict[str, Any]) -> dict[str, Any]:
    """A stats reply's signature mismatch, every name made printable."""
    out: dict[str, Any] = {name: printable(data.get(name, ""),
                                           600 if name in ("text", "differs") else 200)
                           for name in ("worker", "namespace", "model", "peer", "peer_namespace",
                                        "differs", "text")}
    out["fields"] = [{k: printable(f.get(k, ""), 60) for k in ("field", "mine", "theirs")}
                     for f in list(data.get("fields") or [])[:32] if isinstance(f, dict)]
    return out


def fetch_shard_stats(sources: Sequence[StatsSource]) -> ClusterStats:
    """The ClusterStats of a cluster whose controller is in shards (one source per shard, in
    order): shard 0's, with every shard's part of the index (``shards``) and their sum as
    ``chunks_indexed``. Raises what shard 0's ``call`` raises; a later shard that does not
    answer is shown as such. One source: :func:`fetch_cluster_stats`."""
    stats = fetch_cluster_stats(sources[0])
    if len(sources) == 1:
        return stats
    views = [ShardView(stats.shard, stats.chunks_indexed, stats.lookups)]
    for index, source in enumerate(sources[1:], 1):
        try:
            part = ClusterStats.from_dict(source.call("stats", limit=1)["stats"])
            views.append(ShardView(part.shard, part.chunks_indexed, part.lookups))
        except (LMShareError, KeyError, TypeError, ValueError) as exc:
            views.append(ShardView(f"{index}/{len(sources)}", error=printable(str(exc), 400)))
    stats.shards = views
    stats.chunks_indexed = sum(view.chunks_indexed for view in views)
    return stats


class StatsSource(Protocol):
    """What answers a ``stats`` request: a controller client (``lmshare.control``)."""

    def call(self, type_: str, timeout_s: float | None = None, **fields: Any) -> dict[str, Any]:
        ...


def fetch_cluster_stats(client: StatsSource) -> ClusterStats:
    """The controller's ClusterStats, every page of its worker list (a big cluster's list is
    paged). Raises what ``client.call`` raises (an ``LMShareError``)."""
    stats = ClusterStats.from_dict(client.call("stats")["stats"])
    while stats.workers and len(stats.workers) < stats.workers_total:
        page = ClusterStats.from_dict(client.call("stats", offset=len(stats.workers))["stats"])
        if not page.workers:
            break
        stats.workers.extend(page.workers)
    return stats


@dataclass
class RouterBackendView:
    """One backend as ``lmshare router`` sees it."""

    name: str
    url: str = ""
    up: bool = False
    reason: str = ""
    in_flight: int = 0
    in_flight_tokens: int = 0
    requests: int = 0
    failures: int = 0
    chunk_tokens: int = 0  # 0 until the backend's KV namespace is known


@dataclass
class RouterStats:
    """What a router reports on ``/router/stats`` (the dashboard's router panel)."""

    policy: str
    requests: int = 0
    retries: int = 0
    decisions: dict[str, int] = field(default_factory=dict)  # reason → requests
    lookups: int = 0
    lookup_mean_ms: float = 0.0
    prompt_tokens: int = 0
    held_tokens: int = 0  # prompt tokens the chosen backend's worker held
    tokenizer: str = ""
    backends: list[RouterBackendView] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: Any) -> RouterStats:
        """From a router's JSON (checked: it came over the network)."""
        if not isinstance(data, dict) or not isinstance(data.get("policy"), str):
            raise ValueError("not a router stats object")
        names = {f.name for f in fields(RouterBackendView)}
        backends = [RouterBackendView(**{k: v for k, v in b.items() if k in names})
                    for b in data.get("backends", []) if isinstance(b, dict) and "name" in b]
        decisions = {str(k): int(v) for k, v in (data.get("decisions") or {}).items()
                     if isinstance(v, (int, float))}
        simple = {f.name for f in fields(cls)} - {"backends", "decisions"}
        return cls(backends=backends, decisions=decisions,
                   **{k: v for k, v in data.items() if k in simple})
