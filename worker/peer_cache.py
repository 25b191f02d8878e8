"""What the controller's lookup replies told a worker, kept so that an acquire carrying a
lookup's plan (which workers hold which chunk) fetches without asking the controller again:
the peers' addresses (by worker id) and the digests their writers recorded (by chunk key).

Only the controller fills these: a client names holders by worker id, and a holder (or, with
digests on, a chunk's digest) the worker does not know sends the acquire back to the
controller. Bounded (least recently learned or used goes first); a peer is dropped when a fetch
from it fails or the controller lists it as a holder without its address.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

DEFAULT_ENTRIES = 1024


class PeerCache(Generic[K, V]):
    """Thread-safe bounded map (at most ``capacity`` entries, least recently used dropped)."""

    def __init__(self, capacity: int = DEFAULT_ENTRIES) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def learn(self, entries: Mapping[K, V], gone: Iterable[K] = ()) -> None:
        """Remember ``entries`` (the controller's latest word on them); forget ``gone``."""
        with self._lock:
            for key in gone:
                self._entries.pop(key, None)
            for key, value in entries.items():
                self._entries[key] = value
                self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def forget(self, key: K) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
