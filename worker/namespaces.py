"""Which KV namespaces this worker's clients use, and their chunk size: reported with every
heartbeat so that a router can compute the keys a backend's engine will look up."""

from __future__ import annotations

import threading

from lmshare.keys import KEY_BYTES

MAX_NAMESPACES = 16
MAX_CHUNK_TOKENS = 1 << 20


class NamespaceLog:
    """namespace → (chunk tokens, lookups), the most used ``MAX_NAMESPACES`` kept."""

    def __init__(self) -> None:
        self._uses: dict[bytes, list[int]] = {}
        self._lock = threading.Lock()

    def record(self, namespace: bytes, chunk_tokens: object) -> None:
        """A client looked up keys of ``namespace`` (``chunk_tokens`` as it said; ignored when
        it is not a plausible chunk size)."""
        if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or \
                not 0 < chunk_tokens <= MAX_CHUNK_TOKENS or len(namespace) != KEY_BYTES:
            return
        with self._lock:
            entry = self._uses.get(namespace)
            if entry is None:
                if len(self._uses) >= MAX_NAMESPACES:
                    del self._uses[min(self._uses, key=lambda ns: self._uses[ns][1])]
                entry = self._uses[namespace] = [chunk_tokens, 0]
            entry[0] = chunk_tokens
            entry[1] += 1

    def snapshot(self) -> dict[bytes, list[int]]:
        """``{namespace: [chunk_tokens, lookups]}``."""
        with self._lock:
            return {ns: list(entry) for ns, entry in self._uses.items()}
