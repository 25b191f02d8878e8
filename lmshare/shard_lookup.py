"""One lookup over the controller's key-range shards (:mod:`lmshare.shards`): each shard is
asked for the keys it owns, in the lookup's order, and the answers merge into what one
controller holding every key would have answered.

A shard's answer covers its own keys only: the holders of each key of its held prefix (of its
keys), the writers' digests of those, and one miss code per key past it. The merged prefix ends
at the first key some shard does not hold; a key's holders, digest and code come from the shard
that owns it. A shard that did not answer (or answered something malformed: every answer is
checked before use) ends the prefix at its first key, and its keys are marked ``unreachable``;
the other shards' answers still count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lmshare import misses
from lmshare.errors import ErrorCode, LMShareError


@dataclass
class _Part:
    """One shard's answer, checked: its prefix's holders and digests, codes past it."""

    holders: list[list[str]]
    digests: list[bytes | None]
    workers: dict[str, dict]
    codes: bytes


@dataclass
class MergedLookup:
    """What one controller holding every key would answer (``reply()``), and which keys' shards
    did not answer (``unreachable``: positions in the lookup)."""

    holders: list[list[str]] = field(default_factory=list)  # per key of the held prefix
    digests: list[bytes | None] = field(default_factory=list)
    workers: dict[str, dict] = field(default_factory=dict)
    codes: bytes = b""  # per key past the prefix (the first misses.LOOKUP_CODES of them)
    unreachable: frozenset[int] = frozenset()
    unknown_namespace: bool = False  # every shard asked said it never saw the namespace

    @property
    def matched(self) -> int:
        return len(self.holders)

    def reply(self) -> dict[str, Any]:
        """The fields of a controller's ``lookup`` reply."""
        return {"matched": self.matched, "holders": self.holders, "workers": self.workers,
                "digests": self.digests, "misses": self.codes}


def _check_worker(name: Any, info: Any) -> bool:
    return isinstance(name, str) and isinstance(info, dict) \
        and isinstance(info.get("worker_id"), str) and isinstance(info.get("host"), str) \
        and type(info.get("data_port")) is int


def _part(reply: Any, asked: int) -> _Part | None:
    """A shard's ok reply to a lookup of ``asked`` keys, checked; None if malformed."""
    if not isinstance(reply, dict):
        return None
    holders = reply.get("holders")
    if not isinstance(holders, list) or len(holders) > asked or not all(
            isinstance(chunk, list) and all(isinstance(w, str) for w in chunk)
            for chunk in holders):
        return None
    digests = reply.get("digests")
    digests = [d if isinstance(d, bytes) else None for d in digests[:len(holders)]] \
        if isinstance(digests, list) else []
    workers = reply.get("workers")
    if not isinstance(workers, dict):
        return None
    workers = {w: info for w, info in workers.items() if _check_worker(w, info)}
    codes = reply.get("misses")
    codes = codes[:asked - len(holders)] if isinstance(codes, bytes) else b""
    return _Part(holders, digests, workers, codes)


def merge_lookups(keys: Sequence[bytes], positions: Sequence[Sequence[int]],
                  answers: Sequence[Any]) -> MergedLookup:
    """Merge the shards' ``answers`` to a lookup of ``keys``: ``positions[s]`` are the positions
    of the keys shard ``s`` was asked for (``split_by_shard``), ``answers[s]`` its ok reply,
    the ``LMShareError`` it raised (refused, or no answer in time), or None when it was asked
    nothing."""
    parts: list[_Part | None] = [None] * len(positions)
    shard_at = [0] * len(keys)  # each key's shard, and its index among that shard's keys
    sub_at = [0] * len(keys)
    stop = len(keys)
    unreachable: list[int] = []
    unknown = asked = 0
    for shard, where in enumerate(positions):
        if not where:
            continue
        asked += 1
        for sub, position in enumerate(where):
            shard_at[position], sub_at[position] = shard, sub
        answer = answers[shard]
        part = None if isinstance(answer, BaseException) else _part(answer, len(where))
        if part is None:
            if isinstance(answer, LMShareError) and answer.code == ErrorCode.UNKNOWN_NAMESPACE:
                unknown += 1  # none of its keys is held: as new as any
                part = _Part([], [], {}, bytes([misses.NEW]) * len(where))
            else:
                unreachable.extend(where)
        parts[shard] = part
        matched = len(part.holders) if part is not None else 0
        if matched < len(where):
            stop = min(stop, where[matched])
    merged = MergedLookup(unreachable=frozenset(unreachable),
                          unknown_namespace=asked > 0 and unknown == asked)
    for position in range(stop):
        part, sub = parts[shard_at[position]], sub_at[position]
        assert part is not None  # a key before the stop is in its shard's held prefix
        merged.holders.append(part.holders[sub])
        merged.digests.append(part.digests[sub] if sub < len(part.digests) else None)
        for worker in part.holders[sub]:
            info = part.workers.get(worker)
            if info is not None:
                merged.workers.setdefault(worker, info)
    codes = bytearray()
    for position in range(stop, min(len(keys), stop + misses.LOOKUP_CODES)):
        part, sub = parts[shard_at[position]], sub_at[position]
        if part is None:
            codes.append(misses.NEW)  # its shard did not answer (``unreachable`` says so)
        elif sub < len(part.holders):
            codes.append(misses.HELD)  # behind the stop
        else:
            past = sub - len(part.holders)
            # past a shard's codes, as past one controller's: the stop's reason
            codes.append(part.codes[past] if past < len(part.codes) else misses.HELD)
    merged.codes = bytes(codes)
    return merged
