"""Digests of the chunks in a worker's pool, as their writers recorded them.

A chunk's digest is taken when a local client commits it (what the writer stored) or, for a
chunk fetched from a peer, is the record it was checked against; the worker reports it with
the chunk's admit so the controller keeps the writer's record (``controller/digests.py``), and
readers check fetched bytes against that record, never against a digest the sender computes.
"""

from __future__ import annotations

import hashlib
import threading

DIGEST_BYTES = 16


def chunk_digest(views) -> bytes:
    """SHA-256 (truncated to 16 bytes) of a chunk's bytes, given as buffers in order."""
    digest = hashlib.sha256()
    for view in views:
        digest.update(view)
    return digest.digest()[:DIGEST_BYTES]


class DigestStore:
    """key → digest of this worker's chunks; an evicted chunk's digest goes with it."""

    def __init__(self) -> None:
        self._digests: dict[bytes, bytes] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._digests)

    def record(self, key: bytes, digest: bytes) -> None:
        """The first record of a key stands (as the first commit of a key wins in the pool)."""
        with self._lock:
            self._digests.setdefault(key, digest)

    def get(self, key: bytes) -> bytes | None:
        return self._digests.get(key)

    def on_pool_event(self, event: str, namespace: bytes, key: bytes) -> None:
        if event == "evict":
            with self._lock:
                self._digests.pop(key, None)
