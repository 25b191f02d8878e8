"""Which signatures the workers' clients use, and the mismatches among them.

A namespace that no other worker uses, while another worker serves the same model under a
different namespace, is a mismatch: the two engines can never share KV. The book names the
fields that differ (see :mod:`lmshare.signatures`). Workers are compared only with workers of
the same tenant (registration credential).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmshare.keys import ModelSignature
from lmshare.signatures import FieldDifference, describe, differences, sentence

MAX_CANDIDATES = 64  # namespaces of one model compared with a worker's namespace


@dataclass
class Mismatch:
    """A worker's namespace that no other worker shares, against the nearest one another worker
    uses for the same model."""

    worker: str
    namespace: str  # hex
    model: str
    peer: str
    peer_namespace: str  # hex
    fields: list[dict] = field(default_factory=list)  # {"field", "mine", "theirs"}
    differs: str = ""  # "kv_dtype float16 vs bfloat16; tokenizer_hash differs from b's"
    text: str = ""  # the whole sentence, as the worker's clients get it


@dataclass
class _Used:
    signature: ModelSignature
    workers: set[str]


class SignatureBook:
    """(tenant, namespace) → signature and the workers whose clients use it."""

    def __init__(self) -> None:
        self._by_ns: dict[tuple[str, bytes], _Used] = {}
        self._by_model: dict[tuple[str, str], set[bytes]] = {}
        self._by_worker: dict[str, tuple[str, set[bytes]]] = {}
        self.version = 0  # changes whenever a diagnosis may have changed
        self._cache: dict[str, tuple[int, list[Mismatch]]] = {}

    def update(self, worker: str, tenant: str, signatures: dict[bytes, ModelSignature]) -> None:
        """``worker`` (of ``tenant``) now reports exactly ``signatures``."""
        previous = self._by_worker.get(worker)
        if previous is not None and previous[0] == tenant and previous[1] == set(signatures):
            return
        self.remove(worker)
        for namespace, signature in signatures.items():
            used = self._by_ns.get((tenant, namespace))
            if used is None:
                used = self._by_ns[(tenant, namespace)] = _Used(signature, set())
                self._by_model.setdefault((tenant, signature.model), set()).add(namespace)
            used.workers.add(worker)
        self._by_worker[worker] = (tenant, set(signatures))
        self.version += 1

    def remove(self, worker: str) -> None:
        entry = self._by_worker.pop(worker, None)
        self._cache.pop(worker, None)
        if entry is None:
            return
        tenant, namespaces = entry
        for namespace in namespaces:
            used = self._by_ns[(tenant, namespace)]
            used.workers.discard(worker)
            if not used.workers:
                del self._by_ns[(tenant, namespace)]
                model = self._by_model[(tenant, used.signature.model)]
                model.discard(namespace)
                if not model:
                    del self._by_model[(tenant, used.signature.model)]
        self.version += 1

    def mismatches(self, worker: str) -> list[Mismatch]:
        """``worker``'s namespaces that nobody else uses, each with its nearest counterpart."""
        cached = self._cache.get(worker)
        if cached is not None and cached[0] == self.version:
            return cached[1]
        found = []
        tenant, namespaces = self._by_worker.get(worker, ("", set()))
        for namespace in sorted(namespaces):
            mismatch = self._diagnose(worker, tenant, namespace)
            if mismatch is not None:
                found.append(mismatch)
        self._cache[worker] = (self.version, found)
        return found

    def all_mismatches(self, tenant: str | None = None) -> list[Mismatch]:
        """Every worker's (of ``tenant`` only, unless None)."""
        return [m for worker in sorted(self._by_worker)
                if tenant is None or self._by_worker[worker][0] == tenant
                for m in self.mismatches(worker)]

    def _diagnose(self, worker: str, tenant: str, namespace: bytes) -> Mismatch | None:
        used = self._by_ns[(tenant, namespace)]
        if used.workers - {worker}:
            return None  # another worker's clients use it too: they share
        mine = used.signature
        best: tuple[int, str, bytes, list[FieldDifference]] | None = None
        others = sorted(self._by_model.get((tenant, mine.model), ()) - {namespace},
                        key=lambda ns: -len(self._by_ns[(tenant, ns)].workers))
        for other in others[:MAX_CANDIDATES]:
            users = self._by_ns[(tenant, other)].workers - {worker}
            if not users:
                continue
            diffs = differences(mine, self._by_ns[(tenant, other)].signature)
            peer = min(users)
            if best is None or (len(diffs), peer) < (best[0], best[1]):
                best = (len(diffs), peer, other, diffs)
        if best is None:
            return None
        _, peer, other, diffs = best
        return Mismatch(worker, namespace.hex(), mine.model, peer, other.hex(),
                        [{"field": d.field, "mine": d.mine, "theirs": d.theirs} for d in diffs],
                        describe(diffs, peer), sentence(diffs, peer, mine.model))
