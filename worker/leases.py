"""Handles a worker gives its local clients: pins and reservations, each with a deadline.

A client that dies cannot pin memory forever: an expired lease is released by the sweeper.
Handles are random 62-bit numbers (not a sequence another process could guess) and bound to
the client that took them: a release, commit or abort from another connection finds nothing.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lmshare.errors import PoolFullError
from lmshare.pool import Entry, KVPool, Reservation

log = logging.getLogger(__name__)


@dataclass
class Lease:
    deadline: float
    entries: list[Entry]
    reservation: Reservation | None = None
    on_end: list[Callable[[], None]] = field(default_factory=list)  # e.g. a holder's lease
    owner: bytes = b""  # the client connection that took it (b"": only the worker itself)


class LeaseTable:
    def __init__(self, pool: KVPool, max_lease_s: float = 300.0,
                 max_leases: int = 1_000_000) -> None:
        self._pool = pool
        self.max_lease_s = max_lease_s
        self.max_leases = max_leases
        self._lock = threading.Lock()
        self._leases: dict[int, Lease] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._leases)

    def add(self, lease_s: float, entries: list[Entry] | None = None,
            reservation: Reservation | None = None,
            on_end: list[Callable[[], None]] | None = None, owner: bytes = b"") -> int:
        """A new lease of ``lease_s`` seconds (at most ``max_lease_s``; a NaN or infinite
        lease is a bug in the caller and refused). Raises PoolFullError when ``max_leases``
        are open, after ending what the lease would have held (pins, reservation, on_end)."""
        if not math.isfinite(lease_s) or lease_s < 0:
            raise ValueError(f"a lease must last a finite, non-negative time, not {lease_s!r}")
        lease_s = min(lease_s, self.max_lease_s)
        lease = Lease(time.monotonic() + lease_s, entries or [], reservation, list(on_end or []),
                      owner)
        with self._lock:
            full = len(self._leases) >= self.max_leases
            if not full:
                handle = secrets.randbits(62) or 1
                while handle in self._leases:
                    handle = secrets.randbits(62) or 1
                self._leases[handle] = lease
        if full:
            self._end(lease)
            raise PoolFullError(f"{self.max_leases} leases are open on this worker; release "
                                "hits and reservations when done")
        return handle

    def take(self, handle: int, owner: bytes | None = None) -> Lease | None:
        """Remove and return the lease ``handle`` if ``owner`` took it (None: any owner, for
        the worker's own callers)."""
        with self._lock:
            lease = self._leases.get(handle)
            if lease is None or (owner is not None and lease.owner != owner):
                return None
            return self._leases.pop(handle)

    def release(self, handle: int, owner: bytes | None = None) -> bool:
        lease = self.take(handle, owner)
        if lease is None:
            return False
        self._end(lease)
        return True

    def _end(self, lease: Lease) -> None:
        for entry in lease.entries:
            self._pool.unpin(entry)
        if lease.reservation is not None and not lease.reservation.done:
            lease.reservation.abort()
        for callback in lease.on_end:
            try:
                callback()
            except Exception:  # the holder's lease expires on its own
                log.debug("ending a lease callback failed", exc_info=True)

    def sweep(self) -> int:
        """Release every expired lease; returns how many."""
        now = time.monotonic()
        with self._lock:
            expired = [h for h, lease in self._leases.items() if lease.deadline < now]
            leases = [self._leases.pop(h) for h in expired]
        for lease in leases:
            self._end(lease)
        if leases:
            log.warning("released %d expired client leases (a client died or forgot to release)",
                        len(leases))
        return len(leases)

    def release_all(self) -> None:
        with self._lock:
            leases, self._leases = list(self._leases.values()), {}
        for lease in leases:
            self._end(lease)
