"""The chunk index: which workers hold which chunk keys.

Changes are applied in slices: a big change (a full sync part, or a worker with many keys
leaving) is queued and absorbed :data:`SLICE_KEYS` keys at a time between the controller's
messages, so no lookup waits behind it. The index is a hint either way (a holder that no longer
has a chunk answers "missing" and the hit is truncated), so answering from a half-applied sync
is safe.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

SLICE_KEYS = 2048  # keys applied per slice of queued work
DEFAULT_MAX_KEYS_PER_WORKER = 2_000_000
SHARDS = 256  # maps of keys are split by a key byte, so no single resize stalls the loop


class _Sharded:
    """A dict of chunk keys split in :data:`SHARDS` dicts (keys are hashes: evenly spread)."""

    __slots__ = ("maps",)

    def __init__(self) -> None:
        self.maps: list[dict] = [{} for _ in range(SHARDS)]

    def __len__(self) -> int:
        return sum(len(m) for m in self.maps)

    def __contains__(self, key: bytes) -> bool:
        return key in self.maps[key[-1]]

    def get(self, key: bytes, default=None):
        return self.maps[key[-1]].get(key, default)

    def set(self, key: bytes, value) -> None:
        self.maps[key[-1]][key] = value

    def pop(self, key: bytes, default=None):
        return self.maps[key[-1]].pop(key, default)

    def items(self):
        for m in self.maps:
            yield from m.items()


@dataclass
class _Work:
    kind: str  # "add" | "remove" | "forget"
    worker_id: str
    namespace: bytes
    keys: list[bytes] | list[tuple[bytes, bytes]]
    done: int = 0


class ChunkIndex:
    """key → holders, plus worker → keys so a worker's keys leave at once when it does.

    Keys are chained hashes that already include their namespace, so one flat map serves every
    namespace; namespaces are counted only to answer "unknown namespace" clearly. A worker holds
    at most ``max_keys_per_worker`` keys; more are dropped (and counted in ``dropped``).
    """

    def __init__(self, max_keys_per_worker: int = DEFAULT_MAX_KEYS_PER_WORKER) -> None:
        self.max_keys_per_worker = max_keys_per_worker
        # key → its holder (a str), or its holders (a tuple of str): no per-key container for
        # the garbage collector to walk
        self._holders = _Sharded()
        self._by_worker: dict[str, _Sharded] = {}  # worker → key → namespace
        self._namespaces: dict[bytes, int] = {}
        self._multi = 0  # keys with more than one holder
        self._work: deque[_Work] = deque()
        self.dropped: dict[str, int] = {}  # worker → keys refused over its cap
        self.on_capped: Callable[[str], None] | None = None  # a worker's first refused key
        # a key's last holder let it go: (key, that worker, True if the worker left or died,
        # False if it evicted the key) — what tells a miss "holder gone" from "evicted"
        self.on_orphaned: Callable[[bytes, str, bool], None] | None = None

    def __len__(self) -> int:
        return len(self._holders)

    # ------------------------------------------------------------------ changes (queued)
    def add(self, worker_id: str, namespace: bytes, keys: list[bytes]) -> None:
        self._submit(_Work("add", worker_id, namespace, keys))

    def remove(self, worker_id: str, keys: list[bytes]) -> None:
        self._submit(_Work("remove", worker_id, b"", keys))

    def drop_worker(self, worker_id: str) -> int:
        """Remove every key of a worker (it stops counting as theirs at once, its keys leave
        the map slice by slice); returns how many."""
        if any(w.worker_id == worker_id and w.kind != "forget" for w in self._work):
            # its queued adds and removes are moot; an earlier incarnation's forget is not
            self._work = deque(w for w in self._work
                               if w.worker_id != worker_id or w.kind == "forget")
        held = self._by_worker.pop(worker_id, None)
        self.dropped.pop(worker_id, None)
        if held is None:
            return 0
        self._submit(_Work("forget", worker_id, b"", list(held.items())))
        return len(held)

    def _submit(self, work: _Work) -> None:
        if not work.keys:
            return
        self._work.append(work)
        if len(self._work) == 1 and len(work.keys) <= SLICE_KEYS:
            self.absorb()  # a small change with nothing queued: apply it now

    @property
    def pending(self) -> int:
        """Keys still queued."""
        return sum(len(w.keys) - w.done for w in self._work)

    def absorb(self, budget: int = SLICE_KEYS) -> int:
        """Apply up to ``budget`` keys of queued changes; returns how many were applied."""
        applied = 0
        while self._work and applied < budget:
            work = self._work[0]
            end = min(len(work.keys), work.done + budget - applied)
            part = work.keys[work.done:end]
            if work.kind == "add":
                self._add_now(work.worker_id, work.namespace, part)  # type: ignore[arg-type]
            elif work.kind == "remove":
                self._remove_now(work.worker_id, part)  # type: ignore[arg-type]
            else:
                for key, namespace in part:  # type: ignore[misc]
                    self._forget(work.worker_id, namespace, key, gone=True)
            applied += end - work.done
            work.done = end
            if work.done >= len(work.keys):
                self._work.popleft()
        return applied

    # ------------------------------------------------------------------ applying
    def _add_now(self, worker_id: str, namespace: bytes, keys: list[bytes]) -> None:
        held = self._by_worker.get(worker_id)
        if held is None:
            held = self._by_worker[worker_id] = _Sharded()
        room = self.max_keys_per_worker - len(held)
        added = 0
        for key in keys:
            if key in held:
                continue
            if room <= 0:
                if worker_id not in self.dropped and self.on_capped is not None:
                    self.on_capped(worker_id)
                self.dropped[worker_id] = self.dropped.get(worker_id, 0) + 1
                continue
            room -= 1
            added += 1
            held.set(key, namespace)
            holders = self._holders.get(key)
            if holders is None:
                self._holders.set(key, worker_id)
            elif type(holders) is str:
                self._holders.set(key, (holders, worker_id))
                self._multi += 1
            else:
                self._holders.set(key, (*holders, worker_id))
        if added:
            self._namespaces[namespace] = self._namespaces.get(namespace, 0) + added

    def _remove_now(self, worker_id: str, keys: list[bytes]) -> None:
        held = self._by_worker.get(worker_id)
        if not held:
            return
        for key in keys:
            namespace = held.pop(key, None)
            if namespace is not None:
                self._forget(worker_id, namespace, key)

    def _forget(self, worker_id: str, namespace: bytes, key: bytes, gone: bool = False) -> None:
        count = self._namespaces.get(namespace, 0) - 1
        if count <= 0:
            self._namespaces.pop(namespace, None)
        else:
            self._namespaces[namespace] = count
        holders = self._holders.get(key)
        if holders is None:
            return
        if type(holders) is str:
            if holders == worker_id:
                self._holders.pop(key)
                if self.on_orphaned is not None:
                    self.on_orphaned(key, worker_id, gone)
            return
        rest = tuple(h for h in holders if h != worker_id)
        if len(rest) == 1:
            self._holders.set(key, rest[0])
            self._multi -= 1
        elif len(rest) < len(holders):
            self._holders.set(key, rest)

    # ------------------------------------------------------------------ reading
    def worker_chunks(self, worker_id: str) -> int:
        return len(self._by_worker.get(worker_id, ()))

    def holders_of(self, key: bytes) -> tuple[str, ...]:
        """The workers holding ``key``."""
        holders = self._holders.get(key)
        return () if holders is None else (holders,) if type(holders) is str else holders

    def namespace_of(self, worker_id: str, key: bytes) -> bytes | None:
        """The namespace of ``key`` as ``worker_id`` announced it (None: it does not hold it)."""
        held = self._by_worker.get(worker_id)
        return held.get(key) if held is not None else None

    def knows_namespace(self, namespace: bytes) -> bool:
        return namespace in self._namespaces

    @property
    def namespaces(self) -> int:
        return len(self._namespaces)

    def multi_holder_chunks(self) -> int:
        return self._multi

    def holds(self, key: bytes) -> bool:
        """Whether any worker holds ``key``."""
        return key in self._holders

    def holders(self, key: bytes) -> list[str]:
        """The workers holding ``key`` ([] if none)."""
        holders = self._holders.get(key)
        if holders is None:
            return []
        return [holders] if type(holders) is str else sorted(holders)

    def longest_prefix(self, keys: Iterable[bytes]) -> list[list[str]]:
        """Holders of each chunk of the longest prefix of ``keys`` that some worker holds."""
        result = []
        for key in keys:
            holders = self._holders.get(key)
            if holders is None:
                break
            result.append([holders] if type(holders) is str else sorted(holders))
        return result
