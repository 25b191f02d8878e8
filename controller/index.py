"""The chunk index: which workers hold which chunk keys."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable


class ChunkIndex:
    """key → holders, plus worker → keys so a worker's keys leave at once when it does.

    Keys are chained hashes that already include their namespace, so one flat map serves every
    namespace; namespaces are counted only to answer "unknown namespace" clearly.
    """

    def __init__(self) -> None:
        self._holders: dict[bytes, set[str]] = {}
        self._by_worker: dict[str, dict[bytes, bytes]] = {}  # worker → key → namespace
        self._namespaces: Counter[bytes] = Counter()

    def __len__(self) -> int:
        return len(self._holders)

    def add(self, worker_id: str, namespace: bytes, keys: Iterable[bytes]) -> None:
        held = self._by_worker.setdefault(worker_id, {})
        for key in keys:
            if key in held:
                continue
            held[key] = namespace
            self._namespaces[namespace] += 1
            holders = self._holders.get(key)
            if holders is None:
                self._holders[key] = {worker_id}
            else:
                holders.add(worker_id)

    def remove(self, worker_id: str, keys: Iterable[bytes]) -> None:
        held = self._by_worker.get(worker_id)
        if not held:
            return
        for key in keys:
            namespace = held.pop(key, None)
            if namespace is None:
                continue
            self._forget(worker_id, namespace, key)

    def _forget(self, worker_id: str, namespace: bytes, key: bytes) -> None:
        self._namespaces[namespace] -= 1
        if self._namespaces[namespace] <= 0:
            del self._namespaces[namespace]
        holders = self._holders.get(key)
        if holders is not None:
            holders.discard(worker_id)
            if not holders:
                del self._holders[key]

    def drop_worker(self, worker_id: str) -> int:
        """Remove every key of a worker; returns how many."""
        held = self._by_worker.pop(worker_id, {})
        for key, namespace in held.items():
            self._forget(worker_id, namespace, key)
        return len(held)

    def worker_chunks(self, worker_id: str) -> int:
        return len(self._by_worker.get(worker_id, ()))

    def knows_namespace(self, namespace: bytes) -> bool:
        return namespace in self._namespaces

    @property
    def namespaces(self) -> int:
        return len(self._namespaces)

    def multi_holder_chunks(self) -> int:
        return sum(1 for holders in self._holders.values() if len(holders) > 1)

    def longest_prefix(self, keys: Iterable[bytes]) -> list[list[str]]:
        """Holders of each chunk of the longest prefix of ``keys`` that some worker holds."""
        result = []
        for key in keys:
            holders = self._holders.get(key)
            if not holders:
                break
            result.append(sorted(holders))
        return result
