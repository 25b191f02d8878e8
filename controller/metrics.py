"""Prometheus metrics of the controller (``lmshare controller --metrics-port``).

Numbers are read at scrape time: the collector asks the controller for its ClusterStats over
the controller's own socket (the service is single-threaded, so the scrape never touches its
state directly), and the lookup-latency histogram is fed by a hook in the lookup handler.
One dedicated CollectorRegistry per process; every metric is listed in docs/operations.md.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from lmshare.control import ControllerClient
from lmshare.controller.service import ControllerService
from lmshare.errors import LMShareError
from lmshare.metrics_server import MetricsServer, lookup_chunks_family, serve_metrics
from lmshare.stats import ClusterStats, fetch_cluster_stats

log = logging.getLogger(__name__)

LOOKUP_BUCKETS = (10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3,
                  50e-3, 0.1, 0.25)
STATES = ("alive", "suspect", "dead", "left")


class ControllerCollector(Collector):
    """Reads the controller's ClusterStats at scrape time and turns it into metric families."""

    def __init__(self, service: ControllerService, timeout_s: float = 2.0) -> None:
        self._service = service
        host = service.config.host
        host = "127.0.0.1" if host in ("", "0.0.0.0", "*") else host
        self._client = ControllerClient(host, service.port, timeout_s, key=service.config.key)
        self._lock = threading.Lock()  # the client's socket is not thread-safe

    def _stats(self) -> ClusterStats | None:
        with self._lock:
            try:
                return fetch_cluster_stats(self._client)
            except LMShareError as exc:
                log.warning("metrics scrape: controller did not answer its stats: %s", exc)
                return None

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        responding = GaugeMetricFamily(
            "lmshare_controller_responding",
            "1 if the controller's loop answered the scrape's stats request in time")
        responding.add_metric([], 1.0 if stats is not None else 0.0)
        yield responding
        events = CounterMetricFamily("lmshare_controller_events", "Cluster events since start, "
                                     "by kind (join, leave, dead, restart, refused, resync)",
                                     labels=["kind"])
        for kind, count in sorted(dict(self._service.event_counts).items()):
            events.add_metric([kind], count)
        yield events
        refused = CounterMetricFamily(
            "lmshare_controller_refused_connections", "Control-plane connections refused "
            "because the peer does not hold the cluster key, by reason (wrong_key: CURVE with "
            "another key; handshake: no CURVE or not lmshare; retired_key: a message on a "
            "connection a key rotation retired)", labels=["reason"])
        counts = self._service.guard.counts() if self._service.guard is not None else {}
        for reason in ("wrong_key", "handshake", "retired_key"):
            refused.add_metric([reason], counts.get(reason, 0))
        yield refused
        if stats is None:
            return
        info = InfoMetricFamily("lmshare_controller", "The controller's identity",
                                labels=["controller_id", "epoch"])
        info.add_metric([stats.controller_id, str(stats.controller_epoch)], {})
        yield info
        yield _gauge("lmshare_controller_uptime_seconds", "Seconds since the controller started",
                     stats.uptime_s)
        workers = GaugeMetricFamily("lmshare_controller_workers",
                                    "Workers by state (left/dead ones are shown for 2 minutes)",
                                    labels=["state"])
        for state in STATES:
            workers.add_metric([state], stats.count(state))
        yield workers
        yield _gauge("lmshare_controller_indexed_chunks",
                     "Distinct chunks in the chunk → holders index", stats.chunks_indexed)
        yield _gauge("lmshare_controller_multi_holder_chunks",
                     "Indexed chunks held by more than one worker", stats.multi_holder_chunks)
        yield _gauge("lmshare_controller_namespaces", "Namespaces (model signatures) indexed",
                     stats.namespaces)
        yield _counter("lmshare_controller_lookups", "Lookups answered", stats.lookups)
        yield _counter("lmshare_controller_refused_messages",
                       "Malformed or invalid messages refused with an error reply",
                       stats.refused_messages)
        yield _gauge("lmshare_cluster_cached_bytes",
                     "Bytes cached in the pools of alive and suspect workers", stats.bytes_cached)
        yield _gauge("lmshare_cluster_capacity_bytes",
                     "Pool capacity of alive and suspect workers", stats.capacity_bytes)
        yield from _per_worker(stats)
        yield from _per_tenant(stats)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _per_tenant(stats: ClusterStats) -> Iterator[Metric]:
    """Each tenant's figures over the live pools ("" = the cluster key's chunks)."""
    used = GaugeMetricFamily("lmshare_controller_tenant_used_bytes",
                             "Bytes a tenant holds in the live workers' pools", labels=["tenant"])
    entries = GaugeMetricFamily("lmshare_controller_tenant_entries",
                                "Chunks a tenant holds in the live workers' pools",
                                labels=["tenant"])
    quota = GaugeMetricFamily("lmshare_controller_tenant_quota_bytes",
                              "A tenant's cluster-wide quota (0: none)", labels=["tenant"])
    events = CounterMetricFamily(
        "lmshare_controller_tenant_chunks", "A tenant's chunks by event, from heartbeats: hit "
        "and miss (its acquires), stored, quota_eviction, quota_refusal, expired",
        labels=["tenant", "event"])
    for t in stats.tenants:
        used.add_metric([t.tenant], t.used_bytes)
        entries.add_metric([t.tenant], t.entries)
        quota.add_metric([t.tenant], t.quota_bytes)
        for event, value in (("hit", t.hit_chunks), ("miss", t.miss_chunks),
                             ("stored", t.admits), ("quota_eviction", t.quota_evictions),
                             ("quota_refusal", t.quota_refusals), ("expired", t.expired)):
            events.add_metric([t.tenant, event], value)
    yield from (used, entries, quota, events)


def _per_worker(stats: ClusterStats) -> Iterator[Metric]:
    state = GaugeMetricFamily("lmshare_controller_worker_state",
                              "1 for each worker, labelled with its state", labels=["worker",
                                                                                     "state"])
    age = GaugeMetricFamily("lmshare_controller_worker_heartbeat_age_seconds",
                            "Seconds since the worker's last heartbeat", labels=["worker"])
    chunks = GaugeMetricFamily("lmshare_controller_worker_indexed_chunks",
                               "Chunks the index lists for the worker", labels=["worker"])
    used = GaugeMetricFamily("lmshare_controller_worker_used_bytes",
                             "Bytes in the worker's pool (from its heartbeat)", labels=["worker"])
    capacity = GaugeMetricFamily("lmshare_controller_worker_capacity_bytes",
                                 "The worker's pool size", labels=["worker"])
    asked = CounterMetricFamily("lmshare_controller_worker_chunks",
                                "Chunks asked of the worker, by result (from its heartbeat)",
                                labels=["worker", "result"])
    served = CounterMetricFamily("lmshare_controller_worker_served_bytes",
                                 "Bytes the worker served to peers (from its heartbeat)",
                                 labels=["worker"])
    fetched = CounterMetricFamily("lmshare_controller_worker_fetched_bytes",
                                  "Bytes the worker fetched from peers (from its heartbeat)",
                                  labels=["worker"])
    for w in stats.workers:
        c = w.counters
        state.add_metric([w.worker_id, w.state], 1)
        age.add_metric([w.worker_id], w.heartbeat_age_s)
        if w.state in ("dead", "left"):
            continue  # counters of departed workers are frozen; drop their series
        chunks.add_metric([w.worker_id], w.chunks_indexed)
        used.add_metric([w.worker_id], c.used_bytes)
        capacity.add_metric([w.worker_id], c.capacity_bytes)
        for result, value in (("local_hit", c.local_hit_chunks), ("peer_hit", c.peer_hit_chunks),
                              ("miss", c.miss_chunks)):
            asked.add_metric([w.worker_id, result], value)
        served.add_metric([w.worker_id], c.bytes_served)
        fetched.add_metric([w.worker_id], c.bytes_fetched)
    yield from (state, age, chunks, used, capacity, asked, served, fetched)
    yield lookup_chunks_family(
        "lmshare_controller_lookup_chunks", "Chunks of the workers' lookups by result (hit, "
        "miss) and reason (local, peer; why each missed chunk was missed), from heartbeats",
        ["worker"], [(w.counters.to_dict(), [w.worker_id]) for w in stats.workers
                     if w.state not in ("dead", "left")])


def start_controller_metrics(service: ControllerService, port: int,
                             host: str = "127.0.0.1") -> MetricsServer:
    """Serve the controller's metrics on ``http://host:port/metrics`` (a daemon thread)."""
    registry = CollectorRegistry()
    lookup_seconds = Histogram("lmshare_controller_lookup_duration_seconds",
                               "Time the controller spent answering one lookup",
                               registry=registry, buckets=LOOKUP_BUCKETS)
    service.lookup_observers.append(lookup_seconds.observe)
    registry.register(ControllerCollector(service))
    endpoint = serve_metrics(registry, host, port)
    log.info("controller metrics on %s", endpoint.url)
    return endpoint
