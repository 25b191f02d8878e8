"""Hand-offs: a leaving worker's chunks that only it holds go to peers with free space.

The leaving worker sends ``handoff`` with its chunk keys, most recently used first, and their
sizes. The controller keeps those that no other worker holds, spreads them over live peers of
the same tenant by their free pool space (as their heartbeats report it), and hands each peer
its share in its next heartbeat replies (``replicate``). A peer fetches them from the leaving
worker through its ordinary fetch path (authenticated, size- and digest-checked), within its own
free space, and announces them as usual; a ``handoff`` without keys asks how far it got.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

MAX_ORDERS = 65536  # chunks queued for one peer
ORDERS_PER_REPLY = 4096  # chunks handed to a peer in one heartbeat reply


@dataclass
class _Job:
    # key → (target, namespace, size)
    assigned: dict[bytes, tuple[str, bytes, int]] = field(default_factory=dict)
    unique: int = 0


@dataclass
class Target:
    """A peer that may take chunks: its name and free bytes."""

    worker_id: str
    free_bytes: int
    slab_bytes: int = 1  # its pool's allocation unit: a chunk takes whole slabs


def _slabs_cost(size: int, slab_bytes: int) -> int:
    """The pool bytes a chunk of ``size`` takes: whole slabs."""
    return -(-max(1, size) // slab_bytes) * slab_bytes


class Handoffs:
    def __init__(self) -> None:
        self._jobs: dict[str, _Job] = {}
        self._outbox: dict[str, deque[tuple[str, bytes, bytes, int]]] = {}

    def start(self, source: str, keys: list[bytes], sizes: list[int], targets: list[Target],
              holders_of: Callable[[bytes], Iterable[str]],
              namespace_of: Callable[[bytes], bytes | None]) -> _Job:
        """Assign ``source``'s chunks that nobody else holds to ``targets``, in the order given,
        each to the target with the most free bytes left, while any has room."""
        self.forget(source)
        slab = {t.worker_id: max(1, t.slab_bytes) for t in targets}
        # what other leavers' jobs promised a target and it does not hold yet is not free
        promised = self._promised(holders_of, slab)
        room = {t.worker_id: t.free_bytes - promised.get(t.worker_id, 0) for t in targets}
        room = {worker: free for worker, free in room.items() if free > 0}
        job = self._jobs[source] = _Job()
        for key, size in zip(keys, sizes):
            if set(holders_of(key)) != {source}:
                continue
            namespace = namespace_of(key)
            if namespace is None:
                continue
            job.unique += 1
            if not room:
                continue
            target = max(room, key=lambda w: (room[w], w))
            outbox = self._outbox.setdefault(target, deque())
            cost = _slabs_cost(size, slab[target])
            if room[target] < cost or len(outbox) >= MAX_ORDERS:
                del room[target]
                continue
            room[target] -= cost
            outbox.append((source, namespace, key, size))
            job.assigned[key] = (target, namespace, size)
        return job

    def _promised(self, holders_of: Callable[[bytes], Iterable[str]],
                  slab: dict[str, int]) -> dict[str, int]:
        """Bytes each target was assigned by the jobs under way and does not hold yet."""
        promised: dict[str, int] = {}
        for job in self._jobs.values():
            for key, (target, _, size) in job.assigned.items():
                if target not in set(holders_of(key)):
                    promised[target] = promised.get(target, 0) + \
                        _slabs_cost(size, slab.get(target, 1))
        return promised

    def status(self, source: str, holders_of: Callable[[bytes], Iterable[str]],
               can_take: Callable[[str], bool]) -> tuple[int, int, int, int]:
        """(unique, copied, failed, pending) chunks of ``source``'s hand-off: copied when another
        worker holds them now, failed when their peer left or drains itself."""
        job = self._jobs.get(source)
        if job is None:
            return 0, 0, 0, 0
        copied = failed = 0
        for key, (target, _, _) in job.assigned.items():
            if any(w != source for w in holders_of(key)):
                copied += 1
            elif not can_take(target):
                failed += 1
        return job.unique, copied, failed, len(job.assigned) - copied - failed

    def orders_for(self, target: str, limit: int = ORDERS_PER_REPLY) -> list[list]:
        """What ``target`` should fetch now: ``[[source, namespace, [keys], size], ...]``."""
        outbox = self._outbox.get(target)
        if not outbox:
            return []
        groups: dict[tuple[str, bytes, int], list[bytes]] = {}
        for _ in range(min(limit, len(outbox))):
            source, namespace, key, size = outbox.popleft()
            groups.setdefault((source, namespace, size), []).append(key)
        if not outbox:
            del self._outbox[target]
        return [[source, namespace, keys, size] for (source, namespace, size), keys in
                groups.items()]

    def forget(self, worker: str) -> None:
        """``worker`` left (or starts another hand-off): its job and the orders it would have
        taken go; orders to fetch from it are dropped where they wait."""
        self._jobs.pop(worker, None)
        self._outbox.pop(worker, None)
        for target in list(self._outbox):
            kept = deque(o for o in self._outbox[target] if o[0] != worker)
            if kept:
                self._outbox[target] = kept
            else:
                del self._outbox[target]

    def clear(self) -> None:
        self._jobs.clear()
        self._outbox.clear()
