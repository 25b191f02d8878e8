"""The worker registry: who is in the cluster, how to reach them, and whether they are alive."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from lmshare.stats import WorkerCounters

RATE_WINDOW_S = 5.0  # bytes served/fetched per second are averaged over this window


@dataclass
class WorkerRecord:
    """A registered worker."""

    worker_id: str
    epoch: int
    host: str
    data_port: int
    host_id: str
    transports: list[str]
    capacity_bytes: int
    extra: dict = field(default_factory=dict)
    tenant: str = ""  # whose credential registered it ("" = the cluster key)
    instance: bytes = b""  # the registering process's secret token (its retries send it again)
    last_heartbeat: float = field(default_factory=time.monotonic)
    last_seq: int = 0
    syncing: bool = False
    counters: WorkerCounters = field(default_factory=WorkerCounters)
    namespaces: list[dict] = field(default_factory=list)  # its clients' (from heartbeats)
    # its pool's figures per tenant (lmshare.stats.TENANT_FIGURES), from heartbeats
    tenant_figures: dict[str, dict[str, int]] = field(default_factory=dict)
    previous_counters: WorkerCounters | None = None
    previous_heartbeat: float = 0.0
    # (time, counters) of recent heartbeats, for rates smoothed over RATE_WINDOW_S
    samples: deque = field(default_factory=lambda: deque(maxlen=256), repr=False)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.data_port}"

    def heartbeat_age(self, now: float | None = None) -> float:
        return (now if now is not None else time.monotonic()) - self.last_heartbeat

    def record_heartbeat(self, counters: WorkerCounters) -> None:
        now = time.monotonic()
        self.previous_counters, self.previous_heartbeat = self.counters, self.last_heartbeat
        self.counters, self.last_heartbeat = counters, now
        self.samples.append((now, counters))
        while len(self.samples) > 2 and now - self.samples[1][0] >= RATE_WINDOW_S:
            self.samples.popleft()

    def rate(self, name: str) -> float:
        """Per-second change of a counter over the last ~RATE_WINDOW_S of heartbeats (between
        the last two heartbeats until there are more)."""
        if len(self.samples) >= 2:
            (start, first), (end, last) = self.samples[0], self.samples[-1]
        elif self.previous_counters is not None:
            start, first, end, last = (self.previous_heartbeat, self.previous_counters,
                                       self.last_heartbeat, self.counters)
        else:
            return 0.0
        if end - start <= 0:
            return 0.0
        return max(0.0, (getattr(last, name) - getattr(first, name)) / (end - start))

    def peer_info(self) -> dict:
        return {"worker_id": self.worker_id, "host": self.host, "data_port": self.data_port,
                "host_id": self.host_id, "transports": self.transports, "extra": self.extra}


class WorkerRegistry:
    """Registered workers by id, with liveness from heartbeat age."""

    def __init__(self, heartbeat_timeout_s: float) -> None:
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.workers: dict[str, WorkerRecord] = {}

    def get(self, worker_id: str, epoch: int) -> WorkerRecord | None:
        """The worker if it is registered under this epoch (a stale epoch counts as unknown)."""
        record = self.workers.get(worker_id)
        return record if record is not None and record.epoch == epoch else None

    def add(self, record: WorkerRecord) -> WorkerRecord | None:
        """Register; returns the record it replaces (same id, older incarnation), if any."""
        previous = self.workers.get(record.worker_id)
        self.workers[record.worker_id] = record
        return previous

    def remove(self, worker_id: str) -> WorkerRecord | None:
        return self.workers.pop(worker_id, None)

    def state(self, record: WorkerRecord, now: float | None = None) -> str:
        """"suspect" once half the timeout passed without a heartbeat, else "alive". A
        registered worker is never "dead": it is that once the controller has dropped it (and
        its chunks), which it does within a loop step or so of the whole timeout."""
        age = record.heartbeat_age(now)
        return "suspect" if age > self.heartbeat_timeout_s / 2 else "alive"

    def expired(self, now: float | None = None) -> list[WorkerRecord]:
        now = time.monotonic() if now is None else now
        return [w for w in self.workers.values() if w.heartbeat_age(now) > self.heartbeat_timeout_s]
