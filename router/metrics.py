"""Prometheus metrics of the router (served on its own ``/metrics``). Per-backend numbers are
read from the backends' state at scrape time; every metric is listed in docs/router.md."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lmshare.router.backends import Backend

LOOKUP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
FIRST_BYTE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _BackendCollector(Collector):
    def __init__(self, backends: Sequence[Backend]) -> None:
        self._backends = backends

    def collect(self) -> Iterator[Metric]:
        families = {
            "up": GaugeMetricFamily("lmshare_router_backend_up",
                                    "1 while the backend answers", labels=["backend"]),
            "in_flight": GaugeMetricFamily("lmshare_router_backend_in_flight",
                                           "Requests the router has in flight at the backend",
                                           labels=["backend"]),
            "in_flight_tokens": GaugeMetricFamily(
                "lmshare_router_backend_in_flight_tokens",
                "Prompt plus max_tokens of the requests in flight at the backend",
                labels=["backend"]),
            "requests": CounterMetricFamily("lmshare_router_backend_requests",
                                            "Requests sent to the backend", labels=["backend"]),
            "failures": CounterMetricFamily("lmshare_router_backend_failures",
                                            "Times the backend failed (request or health check)",
                                            labels=["backend"]),
        }
        for b in self._backends:
            families["up"].add_metric([b.name], 1.0 if b.up else 0.0)
            families["in_flight"].add_metric([b.name], b.in_flight)
            families["in_flight_tokens"].add_metric([b.name], b.in_flight_tokens)
            families["requests"].add_metric([b.name], b.requests)
            families["failures"].add_metric([b.name], b.failures)
        yield from families.values()


class RouterMetrics:
    """The router's metrics in one dedicated registry."""

    def __init__(self, backends: Sequence[Backend]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("lmshare_router_requests", "Requests answered, by endpoint and "
                                "HTTP status", ["endpoint", "code"], registry=self.registry)
        self.decisions = Counter("lmshare_router_decisions", "Routing decisions by policy and "
                                 "reason", ["policy", "reason"], registry=self.registry)
        self.retries = Counter("lmshare_router_retries", "Requests sent to another backend "
                               "after one failed", registry=self.registry)
        self.prefix_tokens = Counter("lmshare_router_prefix_tokens", "Prompt tokens of routed "
                                     "requests: all, and those the chosen backend's worker held",
                                     ["kind"], registry=self.registry)
        self.lookup_seconds = Histogram("lmshare_router_lookup_seconds", "Controller prefix "
                                        "lookups as the router waited for them",
                                        buckets=LOOKUP_BUCKETS, registry=self.registry)
        self.first_byte_seconds = Histogram("lmshare_router_first_byte_seconds", "From "
                                            "receiving a request to the backend's first "
                                            "response bytes", ["backend"],
                                            buckets=FIRST_BYTE_BUCKETS, registry=self.registry)
        self.registry.register(_BackendCollector(backends))
