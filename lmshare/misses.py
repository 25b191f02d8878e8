"""Why a chunk of a lookup is, or is not, a hit: one reason per chunk.

A lookup's chunks are classified in order: the available prefix (``local``: the worker's own
pool; ``peer``: fetched from another worker), then, from where the prefix stops, one miss reason
per chunk. A chunk that is itself held somewhere but lies behind the stop (a hit is always a
prefix) takes the reason of the stop; a chunk that is held nowhere keeps its own reason. The
names here are what workers count (``WorkerCounters.miss_<reason>``), what lookup replies
carry, what the metrics label and what docs/operations.md explains.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any

LOCAL = "local"
PEER = "peer"
HIT_REASONS = (LOCAL, PEER)

NEW_PREFIX = "new_prefix"
EVICTED = "evicted"
HOLDER_GONE = "holder_gone"
FETCH_FAILED = "fetch_failed"
DEADLINE = "deadline"
RECOMPUTE_FASTER = "recompute_faster"
PARTIAL_CHUNK = "partial_chunk"
UNKNOWN_NAMESPACE = "unknown_namespace"
CONTROLLER_UNREACHABLE = "controller_unreachable"
PEERS_OFF = "peers_off"

MISS_REASONS = (NEW_PREFIX, EVICTED, HOLDER_GONE, FETCH_FAILED, DEADLINE, RECOMPUTE_FASTER,
                PARTIAL_CHUNK, UNKNOWN_NAMESPACE, CONTROLLER_UNREACHABLE, PEERS_OFF)

#: one line per reason, as ``lmshare explain`` and the connector's log say it
DESCRIPTIONS = {
    LOCAL: "held in this worker's pool",
    PEER: "held by another worker, fetched from it",
    NEW_PREFIX: "no worker holds it and none held it recently: never computed in this cluster",
    EVICTED: "held recently, evicted (LRU) to make room",
    HOLDER_GONE: "its holders left or died, taking it with them",
    FETCH_FAILED: "offered by a peer, but the fetch failed or came too late",
    DEADLINE: "the lookup was answered after the asker's deadline: it computed the prompt",
    RECOMPUTE_FASTER: "held by a peer, not fetched: recomputing it is expected to be faster",
    PARTIAL_CHUNK: "the prompt's last, partial chunk (only full chunks are shared)",
    UNKNOWN_NAMESPACE: "no worker ever held a chunk of this model signature (namespace)",
    CONTROLLER_UNREACHABLE: "the controller did not answer: only local chunks could be used",
    PEERS_OFF: "not held here, and the client asked without peers",
}

# The controller's word on a chunk past the held prefix of a lookup: one byte per chunk.
HELD, NEW, GONE, EVICTED_CODE = 0, 1, 2, 3
LOOKUP_CODES = 1024  # chunks past a lookup's held prefix that get a code (the rest: the stop's)
MAX_RUNS = 65537  # a lookup's keys, plus its partial chunk


def counter_name(reason: str) -> str:
    """The :class:`~lmshare.stats.WorkerCounters` field counting chunks missed for ``reason``."""
    return f"miss_{reason}"


def runs(reasons: Iterable[str]) -> list[list[Any]]:
    """``[[reason, count], ...]`` in chunk order (what a lookup reply carries)."""
    out: list[list[Any]] = []
    for reason in reasons:
        if out and out[-1][0] == reason:
            out[-1][1] += 1
        else:
            out.append([reason, 1])
    return out


def parse_runs(value: Any, limit: int) -> tuple[tuple[str, int], ...]:
    """A reply's ``misses`` checked (it came over a socket): known reasons, positive counts,
    at most ``limit`` chunks in all; anything else gives ``()``."""
    if not isinstance(value, (list, tuple)) or len(value) > MAX_RUNS:
        return ()
    out: list[tuple[str, int]] = []
    total = 0
    for run in value:
        if not (isinstance(run, (list, tuple)) and len(run) == 2 and run[0] in MISS_REASONS
                and type(run[1]) is int and run[1] > 0):
            return ()
        total += run[1]
        out.append((run[0], run[1]))
    return tuple(out) if total <= limit else ()


def describe_runs(misses: Sequence[tuple[str, int]]) -> str:
    """``"evicted ×1, new_prefix ×3"``."""
    return ", ".join(f"{reason} ×{count}" for reason, count in misses) or "none"


class RecentKeys:
    """The last ``capacity`` keys recorded, each with a small value: a fixed-size ring (the
    oldest record is overwritten), so its memory never grows. Thread-safe."""

    def __init__(self, capacity: int = 65536) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._ring: list[bytes | None] = [None] * capacity
        self._where: dict[bytes, tuple[int, Any]] = {}
        self._next = 0
        self._lock = threading.Lock()

    def add(self, key: bytes, value: Any = True) -> None:
        self.add_many(((key, value),))

    def add_many(self, records: Iterable[tuple[bytes, Any]]) -> None:
        """Record each ``(key, value)`` in order, under one lock."""
        ring, where, capacity = self._ring, self._where, self.capacity
        with self._lock:
            slot = self._next
            for key, value in records:
                old = where.pop(key, None)
                if old is not None:
                    ring[old[0]] = None
                dropped = ring[slot]
                if dropped is not None:
                    where.pop(dropped, None)
                ring[slot] = key
                where[key] = (slot, value)
                slot = slot + 1 if slot + 1 < capacity else 0
            self._next = slot

    def get(self, key: bytes) -> Any:
        """The value recorded with ``key``, or None."""
        found = self._where.get(key)
        return None if found is None else found[1]

    def __contains__(self, key: bytes) -> bool:
        return key in self._where

    def discard(self, key: bytes) -> None:
        with self._lock:
            old = self._where.pop(key, None)
            if old is not None:
                self._ring[old[0]] = None

    def __len__(self) -> int:
        return len(self._where)
