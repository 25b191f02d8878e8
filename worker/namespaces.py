"""Which KV namespaces this worker's clients use, their chunk size and their signatures:
reported with heartbeats, so that a router can compute the keys a backend's engine will look
up and the controller can say why a namespace shares with nobody (see
:mod:`lmshare.signatures`). The controller's diagnoses come back in heartbeat replies."""

from __future__ import annotations

import threading
from typing import Any

from lmshare.keys import KEY_BYTES
from lmshare.signatures import MAX_DIAGNOSIS_CHARS, from_wire

MAX_NAMESPACES = 16
MAX_CHUNK_TOKENS = 1 << 20
SIGNATURES_EVERY = 10  # heartbeats between reports of unchanged signatures


class NamespaceLog:
    """namespace → (chunk tokens, lookups), the most used ``MAX_NAMESPACES`` kept, with the
    signatures clients described them by."""

    def __init__(self) -> None:
        self._uses: dict[bytes, list[int]] = {}
        self._signatures: dict[bytes, dict[str, Any]] = {}
        self._mismatches: dict[bytes, str] = {}
        self._reported: set[bytes] = set()
        self._heartbeats = 0
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
                    dropped = min(self._uses, key=lambda ns: self._uses[ns][1])
                    del self._uses[dropped]
                    self._signatures.pop(dropped, None)
                entry = self._uses[namespace] = [chunk_tokens, 0]
            entry[0] = chunk_tokens
            entry[1] += 1

    def describe(self, namespace: bytes, signature: Any) -> bool:
        """A client says ``signature`` (wire form) is behind ``namespace``; kept if it hashes
        to it and the namespace is one of the logged ones. Returns whether it was kept."""
        if from_wire(signature, namespace) is None:
            return False
        with self._lock:
            if namespace not in self._uses:
                return False
            self._signatures[namespace] = dict(signature)
            return True

    def snapshot(self) -> dict[bytes, list[int]]:
        """``{namespace: [chunk_tokens, lookups]}``."""
        with self._lock:
            return {ns: list(entry) for ns, entry in self._uses.items()}

    def heartbeat_fields(self) -> dict[str, Any]:
        """What the next heartbeat carries: the namespaces, and their signatures when they
        changed or every ``SIGNATURES_EVERY`` heartbeats (a restarted controller learns them)."""
        fields: dict[str, Any] = {"namespaces": self.snapshot()}
        with self._lock:
            self._heartbeats += 1
            if set(self._signatures) != self._reported or \
                    self._heartbeats % SIGNATURES_EVERY == 1:
                fields["signatures"] = {ns: dict(s) for ns, s in self._signatures.items()}
                self._reported = set(self._signatures)
        return fields

    def on_heartbeat_reply(self, reply: dict[str, Any]) -> None:
        """Keep the controller's diagnoses of this worker's namespaces (checked: bounded)."""
        found = reply.get("mismatches")
        if not isinstance(found, dict):
            return
        kept = {ns: text[:MAX_DIAGNOSIS_CHARS] for ns, text in list(found.items())[:MAX_NAMESPACES]
                if isinstance(ns, bytes) and len(ns) == KEY_BYTES and isinstance(text, str)}
        with self._lock:
            self._mismatches = kept

    def mismatch(self, namespace: bytes) -> str:
        """The controller's diagnosis of ``namespace`` ('' when none)."""
        with self._lock:
            return self._mismatches.get(namespace, "")
