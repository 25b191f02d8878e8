"""The chunk index: which workers hold which chunk keys, in flat arrays.

Each key takes one slot of a bucketed open-addressing table of numpy arrays (the key's 16
bytes, its first holder's small integer id, that holding's namespace id): about 24 bytes a
slot, 32-64 a key at the table's load, and no Python object per key, so neither the memory nor
the garbage collector's walks grow with the keys. Holders beyond the first are kept in a side
map (key → packed ints), which only multi-holder keys enter.

Changes are applied in slices: a big change (a full sync part) is queued and absorbed
:data:`SLICE_KEYS` keys at a time between the controller's messages; the table grows by
doubling (a thread touches the new table's memory first, so its page faults stall nobody), then
moving :data:`MIGRATE_BUCKETS` buckets a step; a worker that leaves stops counting at
once (its id is retired, lookups skip it) and its keys are swept out :data:`SWEEP_SLOTS` slots
a step. So no lookup waits behind any of them. The index is a hint either way (a holder that no
longer has a chunk answers "missing" and the hit is truncated).

Worker ids are per incarnation: a worker that re-registers or re-syncs gets a new one, so a
sweep of its previous incarnation never touches what it announces now.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from lmshare.keys import KEY_BYTES

SLICE_KEYS = 1024  # keys applied per slice of queued work (~2 ms at 10M chunks)
DEFAULT_MAX_KEYS_PER_WORKER = 2_000_000
LANES = 16  # slots in one bucket
PREPARE_LOAD = 0.65  # past this share of its slots in use, the table starts doubling
MAX_LOAD = 0.8  # ... and past this one, it doubles at once
TOUCH_SLOTS = 1 << 20  # slots of the next table a growth thread touches at a time
MIGRATE_BUCKETS = 64  # buckets moved into a grown table per step (~650 keys; 128 took 7-16 ms
# of some steps at 10M chunks on a loaded machine)
SWEEP_SLOTS = 1 << 15  # slots checked for a departed worker's keys per step
INITIAL_BITS = 10  # 2**10 buckets to start with
_NS_BITS = 32  # an extra holding packs (worker id << 32 | namespace id)
_NS_MASK = (1 << _NS_BITS) - 1
_MIX = np.uint64(0x9E3779B97F4A7C15)
_MIX_INT, _U64 = int(_MIX), (1 << 64) - 1
SCALAR_KEYS = 64  # lookups of up to this many keys probe key by key (numpy's per-call cost
# outweighs a few probes), stopping at the first missing one

assert KEY_BYTES == 16


class _Table:
    """A bucketed open-addressing table of 16-byte keys; ``holder == 0`` marks a free slot.

    A key lives in its home bucket or, when that was full, a later one; ``ovf[b]`` counts the
    keys stored past bucket ``b``, so a search stops at the first bucket without them.
    """

    def __init__(self, bits: int, salt: np.uint64) -> None:
        self.bits = bits
        self.mask = (1 << bits) - 1
        self.salt = salt
        self.salt_int = int(salt)
        rows = 1 << bits
        self.lo = np.zeros((rows, LANES), np.uint64)
        self.hi = np.zeros((rows, LANES), np.uint64)
        self.holder = np.zeros((rows, LANES), np.int32)
        self.ns = np.zeros((rows, LANES), np.int32)
        self.ovf = np.zeros(rows, np.int32)
        # flat views: slot = bucket * LANES + lane
        self.lo_f, self.hi_f = self.lo.reshape(-1), self.hi.reshape(-1)
        self.holder_f, self.ns_f = self.holder.reshape(-1), self.ns.reshape(-1)
        self.used = 0

    @property
    def slots(self) -> int:
        return self.holder_f.size

    def home(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        mixed = (lo ^ (hi * _MIX)) * self.salt
        return (mixed >> np.uint64(64 - self.bits)).astype(np.int64)

    def find_one(self, lo: int, hi: int) -> int:
        """The slot of one key (its halves as Python ints, as :meth:`find` reads them), or -1."""
        if not self.used:
            return -1
        mixed = ((lo ^ ((hi * _MIX_INT) & _U64)) * self.salt_int) & _U64
        bucket = mixed >> (64 - self.bits)
        for _ in range(self.mask + 1):
            row = self.lo[bucket].tolist()
            lane = -1
            for _ in range(row.count(lo)):
                lane = row.index(lo, lane + 1)
                slot = bucket * LANES + lane
                if int(self.hi_f[slot]) == hi and self.holder_f[slot] > 0:
                    return slot
            if not self.ovf[bucket]:
                return -1
            bucket = (bucket + 1) & self.mask
        return -1

    def find(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """The slot of each key, or -1."""
        out = np.full(lo.size, -1, np.int64)
        if not self.used or not lo.size:
            return out
        bucket = self.home(lo, hi)
        active = np.arange(lo.size)
        for _ in range(self.mask + 1):
            klo, khi = lo[active, None], hi[active, None]
            eq = (self.lo[bucket] == klo) & (self.hi[bucket] == khi) & (self.holder[bucket] > 0)
            hit = eq.any(1)
            if hit.any():
                out[active[hit]] = bucket[hit] * LANES + eq[hit].argmax(1)
            more = ~hit & (self.ovf[bucket] > 0)
            if not more.any():
                break
            active, bucket = active[more], (bucket[more] + 1) & self.mask
        return out

    def insert(self, lo: np.ndarray, hi: np.ndarray, holder: np.ndarray,
               ns: np.ndarray) -> None:
        """Store keys that are not in the table (and distinct); the caller keeps room."""
        bucket = self.home(lo, hi)
        active = np.arange(lo.size)
        while active.size:
            free = self.holder[bucket] == 0
            # the n-th key aimed at a bucket takes its n-th free lane
            order = np.argsort(bucket, kind="stable")
            ordered = bucket[order]
            starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
            group = np.repeat(starts, np.diff(np.r_[starts, ordered.size]))
            rank = np.empty(ordered.size, np.int64)
            rank[order] = np.arange(ordered.size) - group
            fits = rank < free.sum(1)
            if fits.any():
                lane = (np.cumsum(free[fits], axis=1) <= rank[fits, None]).sum(1)
                slot = bucket[fits] * LANES + lane
                placed = active[fits]
                self.lo_f[slot], self.hi_f[slot] = lo[placed], hi[placed]
                self.holder_f[slot], self.ns_f[slot] = holder[placed], ns[placed]
            rest = ~fits
            if not rest.any():
                break
            np.add.at(self.ovf, bucket[rest], 1)
            active, bucket = active[rest], (bucket[rest] + 1) & self.mask
        self.used += lo.size

    def clear(self, slots: np.ndarray) -> None:
        """Free ``slots`` (and the overflow marks their keys left on the way)."""
        if not slots.size:
            return
        bucket = slots // LANES
        home = self.home(self.lo_f[slots], self.hi_f[slots])
        self.holder_f[slots] = 0
        distance = (bucket - home) & self.mask
        for step in range(int(distance.max())):
            passed = distance > step
            np.subtract.at(self.ovf, (home[passed] + step) & self.mask, 1)
        self.used -= slots.size


def _touch(table: _Table, done: threading.Event) -> None:
    """Write every page of a new table once (numpy drops the GIL while it fills)."""
    for start in range(0, table.slots, TOUCH_SLOTS):
        end = start + TOUCH_SLOTS
        for array in (table.lo_f, table.hi_f, table.holder_f, table.ns_f):
            array[start:end] = 0
        table.ovf[start // LANES:end // LANES] = 0
    done.set()


@dataclass
class _Work:
    kind: str  # "add" | "remove"
    worker_id: str
    namespace: bytes
    keys: list[bytes]
    done: int = 0


@dataclass
class _Sweep:
    """Removing the keys of retired worker ids: the table's slots, then their extra holdings."""

    table: _Table
    slot: int = 0
    extras: list[bytes] | None = None  # the multi-holder keys to check, once the table is done
    extra: int = 0


def _split(keys: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    raw = b"".join(keys)
    if len(raw) != KEY_BYTES * len(keys):
        raise ValueError(f"chunk keys must be {KEY_BYTES} bytes")
    pairs = np.frombuffer(raw, np.uint64).reshape(-1, 2)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


def _first_of_each(lo: np.ndarray, hi: np.ndarray) -> np.ndarray | None:
    """Positions of the first occurrence of each distinct key, in order; None if all differ."""
    if lo.size < 2:
        return None
    pairs = np.empty((lo.size, 2), np.uint64)
    pairs[:, 0], pairs[:, 1] = lo, hi
    _, first = np.unique(pairs.view(np.dtype((np.void, 16))).ravel(), return_index=True)
    if first.size == lo.size:
        return None
    first.sort()
    return first


class ChunkIndex:
    """key → holders, with each worker's count, so a worker's keys leave at once when it does.

    Keys are chained hashes that already include their namespace, so one flat table serves
    every namespace; namespaces are counted only to answer "unknown namespace" clearly. A worker
    holds at most ``max_keys_per_worker`` keys; more are dropped (and counted in ``dropped``).
    """

    def __init__(self, max_keys_per_worker: int = DEFAULT_MAX_KEYS_PER_WORKER,
                 initial_bits: int = INITIAL_BITS) -> None:
        self.max_keys_per_worker = max_keys_per_worker
        self._salt = np.uint64(int.from_bytes(np.random.bytes(8), "little") | 1)
        self._table = _Table(initial_bits, self._salt)
        self._next: _Table | None = None  # the table to grow into, its memory being touched
        self._touched = threading.Event()  # ... set once it is
        self._old: _Table | None = None  # being moved into _table after a growth
        self._moved = 0  # buckets of _old moved so far
        self._keys = 0
        self._extras: dict[bytes, tuple[int, ...]] = {}  # key → packed holders past the first
        # worker ids: one per incarnation, never reused; 0 means a free slot
        self._ids: dict[str, int] = {}
        self._names: list[str] = [""]
        self._gone = np.zeros(64, bool)  # retired ids (their keys are being swept)
        self._held: list[int] = [0]  # keys held, per id
        self._extra_held: list[int] = [0]  # of which as an extra holder
        self._ns_ids: dict[bytes, int] = {}
        self._ns_names: dict[int, bytes] = {}
        self._ns_count: dict[int, int] = {}  # holdings per namespace id
        self._next_ns = 1
        self._sweeps: deque[_Sweep] = deque()
        self._work: deque[_Work] = deque()
        self.dropped: dict[str, int] = {}  # worker → keys refused over its cap
        self.on_capped: Callable[[str], None] | None = None  # a worker's first refused key
        # a key's last holder let it go: (key, that worker, True if the worker left or died,
        # False if it evicted the key) — what tells a miss "holder gone" from "evicted"
        # (keys that left the index, the worker that held each, whether it left or died)
        self.on_orphaned: Callable[[list[bytes], list[str], bool], None] | None = None

    def __len__(self) -> int:
        return self._keys

    # ------------------------------------------------------------------ changes (queued)
    def add(self, worker_id: str, namespace: bytes, keys: list[bytes],
            queue: bool = False) -> None:
        """Index ``keys`` as held by ``worker_id``: at once if they are few and nothing is
        queued, else slice by slice; ``queue``: leave even a few to the next :meth:`absorb`
        (the loop's next step: a message that also costs decoding stays short)."""
        self._submit(_Work("add", worker_id, namespace, keys), queue)

    def remove(self, worker_id: str, keys: list[bytes]) -> None:
        self._submit(_Work("remove", worker_id, b"", keys))

    def drop_worker(self, worker_id: str) -> int:
        """Remove every key of a worker (it stops counting as theirs at once, its keys leave
        the table slice by slice); returns how many."""
        if any(w.worker_id == worker_id for w in self._work):
            self._work = deque(w for w in self._work if w.worker_id != worker_id)
        self.dropped.pop(worker_id, None)
        wid = self._ids.pop(worker_id, None)
        if wid is None:
            return 0
        self._gone[wid] = True
        held = self._held[wid]
        if held:
            last = self._sweeps[-1] if self._sweeps else None
            if last is None or last.slot or last.extras is not None or last.table is not self._table:
                self._sweeps.append(_Sweep(self._table))
            # (else a sweep of the table that has not started yet covers this id too)
        return held

    def _submit(self, work: _Work, queue: bool = False) -> None:
        if not work.keys:
            return
        self._work.append(work)
        if not queue and len(self._work) == 1 and len(work.keys) <= SLICE_KEYS:
            self.absorb()  # a small change with nothing queued: apply it now

    @property
    def pending(self) -> int:
        """Keys (and slots or buckets of background work) that :meth:`absorb` can apply now.
        A table being touched by the growth thread is not counted until it is ready: a loop
        that absorbs while anything is pending would otherwise spin on it (465,945 empty steps
        while a 10M-chunk table's 0.8 GB were touched), holding the GIL the thread needs."""
        queued = sum(len(w.keys) - w.done for w in self._work)
        if self._old is not None:
            queued += self._old.mask + 1 - self._moved
        if self._next is not None:
            queued += self._touched.is_set()
        elif self._table.used > PREPARE_LOAD * self._table.slots:
            queued += 1
        for sweep in self._sweeps:
            queued += max(1, sweep.table.slots - sweep.slot)
        return queued

    def absorb(self, budget: int = SLICE_KEYS) -> int:
        """Apply up to ``budget`` keys of queued changes (after one step of any growth or
        sweep); returns how many keys were applied."""
        self._grow_step()
        if self._sweeps:
            self._sweep_step()
        applied = 0
        while self._work and applied < budget:
            work = self._work[0]
            end = min(len(work.keys), work.done + budget - applied)
            part = work.keys[work.done:end]
            if work.kind == "add":
                self._add_now(work.worker_id, work.namespace, part)
            else:
                self._remove_now(work.worker_id, part)
            applied += end - work.done
            work.done = end
            if work.done >= len(work.keys):
                self._work.popleft()
        return applied

    # ------------------------------------------------------------------ ids
    def _new_id(self, worker_id: str) -> int:
        wid = len(self._names)
        self._names.append(worker_id)
        self._held.append(0)
        self._extra_held.append(0)
        if wid >= self._gone.size:
            self._gone = np.concatenate([self._gone, np.zeros(self._gone.size, bool)])
        self._ids[worker_id] = wid
        return wid

    def _ns_id(self, namespace: bytes) -> int:
        nid = self._ns_ids.get(namespace)
        if nid is None:
            nid = self._ns_ids[namespace] = self._next_ns
            self._ns_names[nid] = namespace
            self._ns_count[nid] = 0
            self._next_ns += 1
        return nid

    def _uncount_ns(self, nid: int, count: int = 1) -> None:
        left = self._ns_count[nid] - count
        if left > 0:
            self._ns_count[nid] = left
        else:
            del self._ns_count[nid]
            del self._ns_ids[self._ns_names.pop(nid)]

    # ------------------------------------------------------------------ locating
    def _locate(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each key's slot in the table (or -1), and in the table being moved (or -1)."""
        here = self._table.find(lo, hi)
        there = np.full(lo.size, -1, np.int64)
        if self._old is not None:
            missing = here < 0
            if missing.any():
                there[missing] = self._old.find(lo[missing], hi[missing])
        return here, there

    def _slot_of(self, key: bytes) -> tuple[_Table | None, int]:
        """One key's table and slot (None, -1 when no table has it), probed without numpy
        temporaries."""
        lo, hi = int.from_bytes(key[:8], "little"), int.from_bytes(key[8:], "little")
        slot = self._table.find_one(lo, hi)
        if slot >= 0:
            return self._table, slot
        if self._old is not None:
            slot = self._old.find_one(lo, hi)
            if slot >= 0:
                return self._old, slot
        return None, -1

    def _first_holders(self, here: np.ndarray, there: np.ndarray) -> np.ndarray:
        first = np.zeros(here.size, np.int64)
        mask = here >= 0
        first[mask] = self._table.holder_f[here[mask]]
        if self._old is not None:
            mask = there >= 0
            first[mask] = self._old.holder_f[there[mask]]
        return first

    # ------------------------------------------------------------------ applying
    def _add_now(self, worker_id: str, namespace: bytes, keys: list[bytes]) -> None:
        lo, hi = _split(keys)
        first = _first_of_each(lo, hi)
        if first is not None:
            lo, hi, keys = lo[first], hi[first], [keys[i] for i in first]
        wid = self._ids.get(worker_id) or self._new_id(worker_id)
        here, there = self._locate(lo, hi)
        present = (here >= 0) | (there >= 0)
        # a new holding: a key not indexed, or indexed without this worker among its holders
        new = ~present | (self._first_holders(here, there) != wid)
        if self._extras:
            for i in np.flatnonzero(new & present):
                extra = self._extras.get(keys[i])
                if extra is not None and any(x >> _NS_BITS == wid for x in extra):
                    new[i] = False
        room = self.max_keys_per_worker - self._held[wid]
        wanted = int(new.sum())
        if wanted > room:
            cut = np.flatnonzero(new)[max(room, 0)]  # the first key past the cap
            new[cut:] = False
            if worker_id not in self.dropped and self.on_capped is not None:
                self.on_capped(worker_id)
            self.dropped[worker_id] = self.dropped.get(worker_id, 0) + wanted - max(room, 0)
        added = int(new.sum())
        if not added:
            return
        nid = self._ns_id(namespace)
        self._held[wid] += added
        self._ns_count[nid] += added  # first: a move below may uncount others of it
        packed = wid << _NS_BITS | nid
        for i in np.flatnonzero(new & present):
            self._extras[keys[i]] = (*self._extras.get(keys[i], ()), packed)
            self._extra_held[wid] += 1
        fresh = new & ~present
        count = int(fresh.sum())
        if count:
            self._make_room(count)
            self._table.insert(lo[fresh], hi[fresh], np.full(count, wid, np.int32),
                               np.full(count, nid, np.int32))
            self._keys += count
            if self._old is not None:
                self._migrate(max(1, count // 16))

    def _remove_now(self, worker_id: str, keys: list[bytes]) -> None:
        wid = self._ids.get(worker_id)
        if wid is None or not self._held[wid]:
            return
        lo, hi = _split(keys)
        first = _first_of_each(lo, hi)
        if first is not None:
            lo, hi, keys = lo[first], hi[first], [keys[i] for i in first]
        here, there = self._locate(lo, hi)
        holders = self._first_holders(here, there)
        if self._extras:
            for i in np.flatnonzero((holders != wid) & ((here >= 0) | (there >= 0))):
                extra = self._extras.get(keys[i])
                if extra is not None:
                    kept = tuple(x for x in extra if x >> _NS_BITS != wid)
                    if len(kept) < len(extra):
                        self._drop_extras(keys[i], extra, kept)
        mine = holders == wid
        for table, slots in ((self._table, here), (self._old, there)):
            if table is not None:
                chosen = mine & (slots >= 0)
                self._release(table, slots[chosen], [keys[i] for i in np.flatnonzero(chosen)]
                              if self._extras or self.on_orphaned else None, gone=False)

    def _drop_extras(self, key: bytes, extra: tuple[int, ...], kept: tuple[int, ...]) -> None:
        """Replace a key's extra holdings ``extra`` by ``kept`` (a subset), uncounting the rest."""
        for x in extra:
            if x not in kept:
                wid = x >> _NS_BITS
                self._held[wid] -= 1
                self._extra_held[wid] -= 1
                self._uncount_ns(x & _NS_MASK)
        if kept:
            self._extras[key] = kept
        else:
            del self._extras[key]

    def _release(self, table: _Table, slots: np.ndarray, keys: list[bytes] | None,
                 gone: bool) -> None:
        """Drop the first holding of ``slots``: an extra holder takes its place, or the key
        leaves. ``keys`` are their keys (None when no key has extra holders); ``gone``: their
        holder left or died (else it evicted them)."""
        if not slots.size:
            return
        wids = table.holder_f[slots].tolist()
        for wid in wids:
            self._held[wid] -= 1
        nids, counts = np.unique(table.ns_f[slots], return_counts=True)
        for nid, count in zip(nids.tolist(), counts.tolist()):
            self._uncount_ns(nid, count)
        leave = np.ones(slots.size, bool)
        if keys is not None:
            for i, key in enumerate(keys):
                extra = self._extras.get(key)
                if extra is None:
                    continue
                kept = tuple(x for x in extra if not self._gone[x >> _NS_BITS])
                if len(kept) < len(extra):
                    self._drop_extras(key, extra, kept)
                if kept:
                    slot = slots[i]
                    table.holder_f[slot] = kept[0] >> _NS_BITS
                    table.ns_f[slot] = kept[0] & _NS_MASK
                    self._extra_held[kept[0] >> _NS_BITS] -= 1
                    if len(kept) > 1:
                        self._extras[key] = kept[1:]
                    else:
                        del self._extras[key]
                    leave[i] = False
        if self.on_orphaned is not None:
            if keys is None:
                keys = self._keys_of(table, slots)
            names = self._names
            left = np.flatnonzero(leave).tolist()
            self.on_orphaned([keys[i] for i in left], [names[wids[i]] for i in left], gone)
        table.clear(slots[leave])
        self._keys -= int(leave.sum())

    def _keys_of(self, table: _Table, slots: np.ndarray) -> list[bytes]:
        pairs = np.empty((slots.size, 2), np.uint64)
        pairs[:, 0], pairs[:, 1] = table.lo_f[slots], table.hi_f[slots]
        raw = pairs.tobytes()
        return [raw[i:i + KEY_BYTES] for i in range(0, len(raw), KEY_BYTES)]

    # ------------------------------------------------------------------ background work
    def _grow_step(self) -> None:
        """One step of growing the table: allocate the next one (a thread touches its memory:
        the first write to a page costs a page fault, which must not stall the loop), then,
        once it is ready, move the buckets over a slice at a time."""
        if self._old is not None:
            self._migrate(MIGRATE_BUCKETS)
        elif self._next is not None:
            if self._touched.is_set():
                self._switch()
        elif self._table.used > PREPARE_LOAD * self._table.slots:
            self._next, self._touched = _Table(self._table.bits + 1, self._salt), threading.Event()
            threading.Thread(target=_touch, args=(self._next, self._touched), daemon=True,
                             name="lmshare-index-grow").start()

    def _switch(self) -> None:
        """Keys go to the next table from now on, and the old one's move over."""
        assert self._next is not None
        self._old, self._moved = self._table, 0
        self._table, self._next = self._next, None

    def _make_room(self, count: int) -> None:
        table = self._table
        if table.used + count <= MAX_LOAD * table.slots:
            return
        # a flood outran the growth steps: finish growing now
        if self._old is not None:
            self._migrate(self._old.mask + 1)
        bits = table.bits + 1
        while (table.used + count) * 2 > MAX_LOAD * (LANES << bits):
            bits += 1
        if self._next is None or self._next.bits < bits:
            self._next, self._touched = _Table(bits, self._salt), threading.Event()
            _touch(self._next, self._touched)
        self._touched.wait()
        self._switch()

    def _migrate(self, buckets: int) -> None:
        """Move ``buckets`` more buckets of the old table into the new one (keys of retired
        ids are dropped on the way)."""
        old = self._old
        assert old is not None
        end = min(old.mask + 1, self._moved + buckets)
        start, self._moved = self._moved, end
        rows = old.holder[start:end]
        slots = np.flatnonzero(rows > 0) + start * LANES
        if slots.size:
            gone = self._gone[old.holder_f[slots]]
            if gone.any():
                stale = slots[gone]
                self._release(old, stale, self._keys_of(old, stale) if self._extras else None,
                              gone=True)
                slots = slots[old.holder_f[slots] > 0]
            self._table.insert(old.lo_f[slots], old.hi_f[slots], old.holder_f[slots],
                               old.ns_f[slots])
            old.holder_f[slots] = 0
            old.used -= slots.size
        if end > old.mask:
            self._old = None

    def _sweep_step(self) -> None:
        sweep = self._sweeps[0]
        if sweep.extras is None:
            table = sweep.table
            if table is self._table:
                end = min(table.slots, sweep.slot + SWEEP_SLOTS)
                holders = table.holder_f[sweep.slot:end]
                stale = np.flatnonzero(self._gone[holders] & (holders > 0)) + sweep.slot
                sweep.slot = end
                if stale.size:
                    self._release(table, stale,
                                  self._keys_of(table, stale) if self._extras else None,
                                  gone=True)
                if end < table.slots:
                    return
            # (a table that was moved since: the move dropped the retired ids' keys)
            sweep.slot = table.slots
            sweep.extras = list(self._extras) if any(
                self._extra_held[w] for w in np.flatnonzero(self._gone).tolist()) else []
        part = sweep.extras[sweep.extra:sweep.extra + SLICE_KEYS]
        sweep.extra += len(part)
        for key in part:
            extra = self._extras.get(key)
            if extra is not None:
                kept = tuple(x for x in extra if not self._gone[x >> _NS_BITS])
                if len(kept) < len(extra):
                    self._drop_extras(key, extra, kept)
        if sweep.extra >= len(sweep.extras):
            self._sweeps.popleft()

    # ------------------------------------------------------------------ reading
    def worker_chunks(self, worker_id: str) -> int:
        wid = self._ids.get(worker_id)
        return 0 if wid is None else self._held[wid]

    def _holder_ids(self, key: bytes) -> tuple[list[int], list[int]]:
        """The ids holding ``key`` (departed ones not swept out yet included), and the
        namespace id of each holding."""
        if len(key) != KEY_BYTES or not self._keys:
            return [], []
        table, slot = self._slot_of(key)
        if table is None:
            return [], []
        wids, nids = [int(table.holder_f[slot])], [int(table.ns_f[slot])]
        for x in self._extras.get(key, ()):
            wids.append(x >> _NS_BITS)
            nids.append(x & _NS_MASK)
        return wids, nids

    def holders_of(self, key: bytes) -> tuple[str, ...]:
        """The workers holding ``key`` (a departed one until its keys are swept out)."""
        return tuple(self._names[w] for w in self._holder_ids(key)[0])

    def holders(self, key: bytes) -> list[str]:
        """The workers holding ``key``, sorted ([] if none)."""
        return sorted(self.holders_of(key))

    def namespace_of(self, worker_id: str, key: bytes) -> bytes | None:
        """The namespace of ``key`` as ``worker_id`` announced it (None: it does not hold it)."""
        wid = self._ids.get(worker_id)
        if wid is None:
            return None
        for holder, nid in zip(*self._holder_ids(key)):
            if holder == wid:
                return self._ns_names[nid]
        return None

    def knows_namespace(self, namespace: bytes) -> bool:
        return namespace in self._ns_ids

    @property
    def namespaces(self) -> int:
        return len(self._ns_ids)

    def multi_holder_chunks(self) -> int:
        return len(self._extras)

    def longest_prefix(self, keys: Iterable[bytes]) -> list[list[str]]:
        """Holders of each chunk of the longest prefix of ``keys`` that some worker holds."""
        keys = list(keys)
        good = next((i for i, key in enumerate(keys) if len(key) != KEY_BYTES), len(keys))
        keys = keys[:good]
        if not keys or not self._keys:
            return []
        if len(keys) <= SCALAR_KEYS:
            firsts, found = [], []
            for key in keys:  # up to the first missing key: nothing after it is asked for
                table, slot = self._slot_of(key)
                if table is None:
                    break
                firsts.append(int(table.holder_f[slot]))
                found.append(True)
        else:
            lo, hi = _split(keys)
            here, there = self._locate(lo, hi)
            firsts = self._first_holders(here, there).tolist()
            found = ((here >= 0) | (there >= 0)).tolist()
        gone, names, extras = self._gone, self._names, self._extras
        result = []
        for i, key in enumerate(keys):
            if i >= len(found) or not found[i]:
                break
            holders = [] if gone[firsts[i]] else [names[firsts[i]]]
            extra = extras.get(key) if extras else None
            if extra is not None:
                holders += [names[x >> _NS_BITS] for x in extra if not gone[x >> _NS_BITS]]
            if not holders:
                break
            holders.sort()
            result.append(holders)
        return result
