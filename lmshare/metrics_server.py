"""The ``/metrics`` HTTP endpoint the controller and every worker serve (prometheus_client)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily

from lmshare.errors import ConfigError
from lmshare.misses import LOCAL, MISS_REASONS, PEER, counter_name


@dataclass
class MetricsServer:
    """A running ``/metrics`` HTTP endpoint."""

    host: str
    port: int
    registry: CollectorRegistry
    _server: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
    """Serve ``registry`` on ``http://host:port/metrics`` from a daemon thread."""
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port} ({exc.strerror}); choose "
                          "another --metrics-port or stop the process using it") from None
    return MetricsServer(host, server.server_port, registry, server, thread)


def lookup_chunks_family(name: str, documentation: str, labels: list[str],
                         rows: list[tuple[dict[str, int], list[str]]]) -> CounterMetricFamily:
    """``name_total{*labels, result, reason}`` from counter dicts (``WorkerCounters``'
    fields): hits by where (local, peer), misses by reason (lmshare/misses.py)."""
    family = CounterMetricFamily(name, documentation, labels=[*labels, "result", "reason"])
    for counters, values in rows:
        family.add_metric([*values, "hit", LOCAL], counters.get("local_hit_chunks", 0))
        family.add_metric([*values, "hit", PEER], counters.get("peer_hit_chunks", 0))
        for reason in MISS_REASONS:
            family.add_metric([*values, "miss", reason], counters.get(counter_name(reason), 0))
    return family
