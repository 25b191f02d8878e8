"""The garbage collector in the controller's process: young collections as usual, full ones
rare.

A full collection walks every object the collector tracks: at 10,000 workers about 150,000
(their records and counters) and the 1M keys of the digest records' order, 50-130 ms of one
step of the single-threaded loop. Each heartbeat replaces a worker's counters, so at 10,000
workers enough young objects reached the oldest generation to start one every few seconds.
The controller's long-lived state holds no reference cycles (reference counting frees it), so
the young generations' collections, which still free cycles among new objects, are kept, and a
full one runs only after :data:`FULL_EVERY` collections of the middle generation (more than a
day at fleet size) instead of after 10. The middle generation is collected every
:data:`MIDDLE_EVERY` young collections: at 10,000 heartbeating workers it held ~12,000 objects
after 10 of them (6-8 ms a collection on a loaded machine), ~4,000 after 3 (2.6 ms at most).
"""

from __future__ import annotations

import gc
import threading

FULL_EVERY = 1_000_000  # middle-generation collections before a full one (CPython: 10)
MIDDLE_EVERY = 3  # young collections before a middle one (CPython: 10)

_lock = threading.Lock()
_loops = 0  # serve loops running in this process
_before: tuple[int, ...] = ()


def rare_full_collections() -> None:
    """Set the thresholds above while a loop runs (the first loop in the process sets them)."""
    global _loops, _before
    with _lock:
        if not _loops:
            _before = gc.get_threshold()
            gc.set_threshold(_before[0], MIDDLE_EVERY, FULL_EVERY)
        _loops += 1


def restore() -> None:
    """The thresholds from before, once the last loop in the process has ended."""
    global _loops
    with _lock:
        _loops -= 1
        if not _loops:
            gc.set_threshold(*_before)
