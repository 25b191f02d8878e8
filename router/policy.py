"""Routing policies: which backend gets a request. Pure functions of the backends' state and,
for the prefix policies, of how many leading chunks of the prompt each backend's worker holds."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from lmshare.router.backends import Backend

# Why a backend was chosen (the ``reason`` label of lmshare_router_decisions_total).
ROTATION = "rotation"  # round-robin
LEAST_LOADED = "least_loaded"  # least-loaded
HIT = "hit"  # the backend whose worker holds the longest prefix
MISS = "miss"  # no worker holds any chunk of it: least-loaded
OVERLOADED = "overloaded"  # the holder is busier than the margin allows: least-loaded, peer fetch
LOOKUP_TIMEOUT = "lookup_timeout"  # the controller did not answer in time: least-loaded
LOOKUP_ERROR = "lookup_error"  # the controller refused / is unreachable: least-loaded
NO_SIGNATURE = "no_signature"  # no backend's KV namespace is known yet: least-loaded
NO_TOKENS = "no_tokens"  # the prompt could not be tokenized here: least-loaded
SHORT = "short"  # the prompt is shorter than one chunk: least-loaded


@dataclass(frozen=True)
class Decision:
    backend: Backend
    reason: str
    prefix_tokens: int = 0  # tokens of the prompt the chosen backend's worker holds


class Rotation:
    """A round-robin counter shared by the policies (ties are broken by it too)."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def next(self) -> int:
        return next(self._counter)


def round_robin(candidates: Sequence[Backend], rotation: Rotation) -> Decision:
    return Decision(candidates[rotation.next() % len(candidates)], ROTATION)


def least_loaded(candidates: Sequence[Backend], rotation: Rotation,
                 reason: str = LEAST_LOADED) -> Decision:
    """Fewest requests in flight, then fewest tokens in flight; ties rotate."""
    start = rotation.next()
    n = len(candidates)
    order = [candidates[(start + i) % n] for i in range(n)]
    return Decision(min(order, key=Backend.load), reason)


def by_prefix(candidates: Sequence[Backend], held_chunks: dict[str, int], chunk_tokens: int,
              rotation: Rotation, load_margin: int | None) -> Decision:
    """The backend holding the longest prefix (ties: the less loaded). ``load_margin`` set
    (prefix+load): when that backend has more than ``load_margin`` requests in flight beyond the
    least-loaded backend, the least-loaded one gets the request (its worker fetches the prefix
    from the holder)."""
    best = max((held_chunks.get(b.name, 0) for b in candidates), default=0)
    if best <= 0:
        return least_loaded(candidates, rotation, MISS)
    holders = [b for b in candidates if held_chunks.get(b.name, 0) == best]
    holder = least_loaded(holders, rotation).backend
    if load_margin is not None:
        idle = least_loaded(candidates, rotation).backend
        if holder.in_flight - idle.in_flight > load_margin:
            return Decision(idle, OVERLOADED, held_chunks.get(idle.name, 0) * chunk_tokens)
    return Decision(holder, HIT, best * chunk_tokens)
