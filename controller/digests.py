"""Chunk digests as their writers recorded them: the reference a reader checks fetched bytes
against (never a digest the sender computes while sending).

A worker reports, with each chunk it admits, the digest of the chunk's bytes: computed when a
local client stored it, or the recorded one it checked when it fetched the chunk. The first
digest recorded for a key stands; a later admit of the key with another digest is refused (the
worker is not indexed as its holder). Bounded: past ``max_records`` the oldest records go (the
next holder's admit or sync records them again).
"""

from __future__ import annotations

from collections import deque

DIGEST_BYTES = 16
DEFAULT_MAX_RECORDS = 1_000_000


class DigestRecords:
    def __init__(self, max_records: int = DEFAULT_MAX_RECORDS) -> None:
        self.max_records = max_records
        self._records: dict[bytes, bytes] = {}
        # keys in the order recorded: the oldest leaves first (next(iter(dict)) would skip over
        # every deleted entry at the dict's front, hundreds of µs a record once it is full)
        self._order: deque[bytes] = deque()
        self.conflicts = 0  # admits refused because their digest differed from the record

    def __len__(self) -> int:
        return len(self._records)

    def get(self, key: bytes) -> bytes | None:
        return self._records.get(key)

    def admit(self, keys: list[bytes], digests: dict[bytes, bytes]) -> list[bytes]:
        """Record the digests of ``keys`` not recorded yet; return the keys that may be indexed
        (those whose digest agrees with the record, or that come without one)."""
        accepted = []
        for key in keys:
            digest = digests.get(key)
            if digest is not None:
                recorded = self._records.get(key)
                if recorded is None:
                    if len(self._records) >= self.max_records:
                        del self._records[self._order.popleft()]
                    self._records[key] = digest
                    self._order.append(key)
                elif recorded != digest:
                    self.conflicts += 1
                    continue
            accepted.append(key)
        return accepted
