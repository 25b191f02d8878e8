"""Prometheus metrics of a worker (``lmshare worker --metrics-port``).

Counters are read from the agent at scrape time (its counters are lock-protected); the
peer-fetch latency histogram is fed by the fetcher's ``on_fetch`` hook. One dedicated
CollectorRegistry per process; every metric is listed in docs/operations.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from lmshare.errors import ConfigError
from lmshare.metrics_server import MetricsServer, lookup_chunks_family, serve_metrics
from lmshare.worker.agent import WorkerAgent

log = logging.getLogger(__name__)

FETCH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                 10.0)


class WorkerCollector(Collector):
    """Turns the agent's counters and pool state into metric families at scrape time."""

    def __init__(self, agent: WorkerAgent) -> None:
        self._agent = agent

    def collect(self) -> Iterator[Metric]:
        agent = self._agent
        c = agent.counter_snapshot()
        info = InfoMetricFamily("lmshare_worker", "The worker's identity",
                                labels=["worker", "controller_id", "data_address"])
        info.add_metric([agent.worker_id, agent.link.controller_id or "",
                         f"{agent.peer_server.host}:{agent.peer_server.port}"], {})
        yield info
        yield GaugeMetricFamily("lmshare_worker_registered",
                                "1 while the worker is registered with a controller",
                                value=1.0 if agent.registered() else 0.0)
        for name, key, doc in (
                ("capacity_bytes", "capacity_bytes", "Size of the shared-memory pool"),
                ("used_bytes", "used_bytes", "Bytes of committed chunks in the pool"),
                ("entries", "entries", "Chunks in the pool"),
                ("pinned_entries", "pinned_entries", "Chunks pinned by readers (not evictable)"),
                ("in_flight_fetches", "in_flight_fetches",
                 "Peer fetches this worker is running plus peer reads it is serving")):
            yield GaugeMetricFamily(f"lmshare_worker_{name}", doc, value=c[key])
        yield GaugeMetricFamily("lmshare_worker_leases",
                                "Open leases (pins and reservations held for local clients)",
                                value=len(agent.leases))
        chunks = CounterMetricFamily(
            "lmshare_worker_chunks", "Chunks asked for by local clients, by result: local_hit "
            "and peer_hit count at acquire/get, miss at lookup", labels=["result"])
        for result, key in (("local_hit", "local_hit_chunks"), ("peer_hit", "peer_hit_chunks"),
                            ("miss", "miss_chunks")):
            chunks.add_metric([result], c[key])
        yield chunks
        yield lookup_chunks_family(
            "lmshare_worker_lookup_chunks", "Chunks of local clients' lookups by result (hit, "
            "miss) and reason (local, peer; why each missed chunk was missed)", [], [(c, [])])
        for name, key, doc in (
                ("lookups", "lookups", "Lookups by local clients"),
                ("controller_lookups", "controller_lookups",
                 "Lookups this worker asked the controller (one round trip each)"),
                ("direct_peer_chunks", "direct_peer_chunks",
                 "Peer hits local clients read in a same-host holder's pool in place (no copy)"),
                ("served_bytes", "bytes_served", "Chunk bytes served to peers"),
                ("fetched_bytes", "bytes_fetched", "Chunk bytes fetched from peers"),
                ("fetch_failures", "fetch_failures",
                 "Per-holder fetches that returned fewer chunks than asked (hit truncated)"),
                ("admits", "admits", "Chunks committed to the pool"),
                ("evictions", "evictions", "Chunks evicted (LRU) to make room"),
                ("skipped_peer_chunks", "skipped_peer_chunks",
                 "Peer chunks not offered to a lookup: fetching them was expected to take "
                 "longer than the asker recomputing them (measured peer throughput)"),
                ("digest_mismatches", "digest_mismatches",
                 "Fetched chunks dropped because their bytes did not match the digest their "
                 "writer recorded (a corrupt or lying holder)"),
                ("handed_off_chunks", "handed_off_chunks",
                 "Chunks only this worker held that peers took over when it drained"),
                ("taken_over_chunks", "taken_over_chunks",
                 "Chunks this worker fetched from draining peers (within its free space)"),
                ("refused_chunks", "refused_chunks",
                 "Fetched chunks refused before any reservation: their holder announced a size "
                 "other than asked (or more than the namespace's chunks)")):
            yield CounterMetricFamily(f"lmshare_worker_{name}", doc, value=c[key])
        refused = CounterMetricFamily(
            "lmshare_worker_refused_connections", "Data-port connections refused before any "
            "request: the peer failed the cluster-key handshake (bad_mac), or did not finish it "
            "(timeout, closed)", labels=["reason"])
        counts = agent.peer_server.refused_counts()
        for reason in sorted({"bad_mac", "timeout", "closed", *counts}):
            refused.add_metric([reason], counts.get(reason, 0))
        yield refused
        by_transport = dict(getattr(agent.fetcher, "chunks_by_transport", {}) or {})
        fetched = CounterMetricFamily("lmshare_worker_fetched_chunks",
                                      "Chunks fetched from peers, by transport",
                                      labels=["transport"])
        if by_transport:
            for transport, count in sorted(by_transport.items()):
                fetched.add_metric([transport], count)
        else:
            fetched.add_metric(["all"], agent.fetcher.chunks_fetched)
        yield fetched
        rates = GaugeMetricFamily("lmshare_worker_peer_fetch_bytes_per_second",
                                  "Measured fetch throughput from each peer (what decides "
                                  "whether a peer chunk is worth fetching)", labels=["peer"])
        for peer, rate in sorted(agent.fetch_policy.rates().items()):
            rates.add_metric([peer], rate)
        yield rates


def start_worker_metrics(agent: WorkerAgent, port: int, host: str | None = None
                         ) -> MetricsServer:
    """Serve the worker's metrics on ``http://host:port/metrics`` (a daemon thread); ``host``
    defaults to the worker's data-plane address."""
    host = host if host is not None else agent.peer_server.host
    registry = CollectorRegistry()
    fetch_seconds = Histogram("lmshare_worker_fetch_duration_seconds",
                              "Duration of one peer fetch (all chunks of one request, striped "
                              "over their holders)", registry=registry, buckets=FETCH_BUCKETS)
    agent.fetcher.on_fetch = lambda seconds, _asked, _received: fetch_seconds.observe(seconds)
    registry.register(WorkerCollector(agent))
    try:
        endpoint = serve_metrics(registry, host, port)
    except ConfigError:
        agent.fetcher.on_fetch = None
        raise
    log.info("worker metrics on %s", endpoint.url)
    return endpoint
