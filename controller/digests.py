"""Chunk digests as their writers recorded them: the reference a reader checks fetched bytes
against (never a digest the sender computes while sending).

A worker reports, with each chunk it admits, the digest of the chunk's bytes: computed when a
local client stored it, or the recorded one it checked when it fetched the chunk. The first
digest recorded for a key stands; a later admit of the key with another digest is refused (the
worker is not indexed as its holder). Bounded: past ``max_records`` the oldest records go (the
next holder's admit or sync records them again).

The records are spread over :data:`SHARDS` dicts by the key's (per-process salted) hash: a full
dict whose oldest records leave as new ones come is rebuilt by Python every ~1.8 times its size
in inserts, and one dict of 1M records took 80-105 ms of the controller's loop in one step; a
shard of ~4,000 takes well under a millisecond.
"""

from __future__ import annotations

from collections import deque

DIGEST_BYTES = 16
DEFAULT_MAX_RECORDS = 1_000_000
SHARDS = 256  # a power of two


class DigestRecords:
    def __init__(self, max_records: int = DEFAULT_MAX_RECORDS) -> None:
        self.max_records = max_records
        self._shards: list[dict[bytes, bytes]] = [{} for _ in range(SHARDS)]
        # keys in the order recorded: the oldest leaves first (next(iter(dict)) would skip over
        # every deleted entry at the dict's front, hundreds of µs a record once it is full)
        self._order: deque[bytes] = deque()
        self.conflicts = 0  # admits refused because their digest differed from the record

    def __len__(self) -> int:
        return len(self._order)

    def get(self, key: bytes) -> bytes | None:
        return self._shards[hash(key) & (SHARDS - 1)].get(key)

    def admit(self, keys: list[bytes], digests: dict[bytes, bytes]) -> list[bytes]:
        """Record the digests of ``keys`` not recorded yet; return the keys that may be indexed
        (those whose digest agrees with the record, or that come without one)."""
        accepted = []
        shards, order, mask = self._shards, self._order, SHARDS - 1
        for key in keys:
            digest = digests.get(key)
            if digest is not None:
                shard = shards[hash(key) & mask]
                recorded = shard.get(key)
                if recorded is None:
                    if len(order) >= self.max_records:
                        oldest = order.popleft()
                        del shards[hash(oldest) & mask][oldest]
                    shard[key] = digest
                    order.append(key)
                elif recorded != digest:
                    self.conflicts += 1
                    continue
            accepted.append(key)
        return accepted
