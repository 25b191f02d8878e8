"""The KV pool: one shared-memory region carved into fixed-size slabs.

An entry (the KV bytes of one chunk) spans one or more slabs. It is written in three steps —
:meth:`KVPool.reserve` (take free slabs, evicting LRU entries if needed), fill the reservation's
buffers, :meth:`Reservation.commit` — and is visible to readers only after commit. Readers
:meth:`KVPool.pin` an entry, copy from its slabs, and unpin it; eviction never takes a pinned
entry, so a pinned entry's bytes cannot change under a reader.

Generations: every slab has a 64-bit generation number in a second shared-memory region, bumped
each time the slab returns to the free list. A reader in another process that copies a slab
without the owner's help (same-host shared memory, RDMA) records the generations when it
locates the entry and checks them after the copy: a changed generation means the slab may have
been reused meanwhile, and the copy is discarded (a seqlock on the reader's side).

Locking: entries live in hash buckets, each with its own lock; the free-slab list has its own
lock. Locks are held only to change that bookkeeping, never while bytes are copied.

Tenants: every entry belongs to a tenant (its namespace's, see :meth:`KVPool.bind_namespace`;
by default the pool's own). :meth:`KVPool.set_tenant_limits` gives a tenant a byte quota in
this pool and a TTL: a reservation that would take a tenant past its quota evicts that
tenant's own least-recently-used entries first, and is refused (:class:`QuotaExceeded`) when
they are pinned; never another tenant's. An entry past its TTL is absent to every reader and
its slabs are reclaimed (:meth:`KVPool.reclaim_expired`, or the next reservation that needs
room).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from lmshare.errors import ConfigError, EntryTooLarge, PoolFullError
from lmshare.shm import SharedRegion

log = logging.getLogger(__name__)

DEFAULT_SLAB_BYTES = 256 * 1024
DEFAULT_BUCKETS = 64

# (event, namespace, key) with event "admit" or "evict"
PoolListener = Callable[[str, bytes, bytes], None]


def slab_runs(slabs: list[int], slab_bytes: int, nbytes: int) -> list[tuple[int, int]]:
    """Where an entry's ``nbytes`` lie in its pool region: ``(offset, length)`` per run of
    adjacent slabs, in entry order. Every reader of a pool (owner, local clients, same-host
    peers, UCX readers) finds entry bytes this way."""
    runs = []
    remaining = nbytes
    index = 0
    while index < len(slabs) and remaining > 0:
        run = 1
        while index + run < len(slabs) and slabs[index + run] == slabs[index] + run:
            run += 1
        size = min(remaining, run * slab_bytes)
        runs.append((slabs[index] * slab_bytes, size))
        remaining -= size
        index += run
    return runs


def slab_views(buffer: memoryview, slab_bytes: int, slabs: list[int],
               nbytes: int) -> list[memoryview]:
    """Views of an entry's bytes in a pool region ``buffer``, one per run of adjacent slabs."""
    return [buffer[start : start + size] for start, size in slab_runs(slabs, slab_bytes, nbytes)]


def fill_views(views: list[memoryview] | tuple[memoryview, ...], data: memoryview) -> None:
    """Copy ``data`` into ``views`` in order (their sizes add up to ``data``'s): how a writer
    fills a reservation's slabs."""
    offset = 0
    for view in views:
        view[:] = data[offset : offset + view.nbytes]
        offset += view.nbytes


MAX_BOUND_NAMESPACES = 65536


class QuotaExceeded(PoolFullError):
    """A tenant's reservation would pass its byte quota and its own entries are all pinned."""


@dataclass(frozen=True)
class TenantLimits:
    """What one tenant may hold in a pool: at most ``quota_bytes`` (None: the pool's size),
    each entry for at most ``ttl_s`` seconds after it was stored (None: until evicted)."""

    quota_bytes: int | None = None
    ttl_s: float | None = None


@dataclass
class TenantUsage:
    """One tenant's figures in a pool (bytes and entries now; events since the pool started)."""

    used_bytes: int = 0  # committed and reserved
    entries: int = 0
    admits: int = 0
    quota_evictions: int = 0  # own entries evicted to stay within the quota
    quota_refusals: int = 0  # reservations refused: over quota, own entries pinned
    expired: int = 0  # entries dropped past their TTL

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class PoolExport:
    """Where a worker's pool lies for readers on its host: the shared region, its table of slab
    generations and their sizes. Readers take it from the worker itself (its ``hello`` and
    ``locate`` answers), never from a registration another party could forge."""

    path: str
    nbytes: int
    generation_path: str
    slab_bytes: int

    @property
    def num_slabs(self) -> int:
        return self.nbytes // self.slab_bytes

    def to_wire(self) -> dict[str, Any]:
        return {"path": self.path, "bytes": self.nbytes, "gen_path": self.generation_path,
                "slab_bytes": self.slab_bytes}

    @classmethod
    def from_wire(cls, where: dict[str, Any]) -> PoolExport:
        """From a worker's answer (raises KeyError, TypeError or ValueError on a bad one)."""
        return cls(str(where["path"]), int(where["bytes"]), str(where["gen_path"]),
                   int(where["slab_bytes"]))


@dataclass
class Entry:
    """A committed chunk: its key, where its bytes are, and who is reading it."""

    namespace: bytes
    key: bytes
    slabs: list[int]
    nbytes: int
    pins: int = 0
    last_used: float = field(default_factory=time.monotonic)
    tenant: str = ""
    expires: float = float("inf")  # time.monotonic() past which the entry is gone

    def expired(self, now: float) -> bool:
        return now >= self.expires


@dataclass
class PoolStats:
    capacity_bytes: int
    slab_bytes: int
    used_bytes: int  # bytes of committed entries
    reserved_bytes: int  # bytes of reservations not yet committed
    slabs_total: int
    slabs_free: int
    entries: int
    pinned_entries: int
    admits: int
    evictions: int


class Reservation:
    """Slabs taken for one entry that is being written. Commit or abort it exactly once."""

    def __init__(self, pool: KVPool, namespace: bytes, key: bytes, slabs: list[int], nbytes: int,
                 tenant: str = ""):
        self.pool = pool
        self.namespace = namespace
        self.key = key
        self.slabs = slabs
        self.nbytes = nbytes
        self.tenant = tenant
        self.done = False

    def buffers(self) -> list[memoryview]:
        """Writable views covering exactly ``nbytes``, slab by slab."""
        return self.pool.slab_views(self.slabs, self.nbytes)

    def write(self, data: bytes | memoryview) -> None:
        """Copy ``data`` (exactly ``nbytes`` long) into the reservation."""
        data = memoryview(data).cast("B")
        if data.nbytes != self.nbytes:
            raise ValueError(f"reservation holds {self.nbytes} bytes, got {data.nbytes}")
        offset = 0
        for view in self.buffers():
            view[:] = data[offset : offset + view.nbytes]
            offset += view.nbytes

    def commit(self) -> bool:
        """Make the entry visible. False if the key was already present (this copy is dropped)."""
        return self.pool.commit(self)

    def abort(self) -> None:
        self.pool.abort(self)


class _Bucket:
    __slots__ = ("lock", "entries")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: OrderedDict[bytes, Entry] = OrderedDict()  # LRU order: oldest first


class KVPool:
    """Slab-allocated, LRU-evicted store of KV chunks in a shared-memory region."""

    def __init__(self, capacity_bytes: int, slab_bytes: int = DEFAULT_SLAB_BYTES,
                 name: str = "pool", region: SharedRegion | None = None,
                 num_buckets: int = DEFAULT_BUCKETS) -> None:
        if slab_bytes <= 0:
            raise ConfigError(f"slab size must be positive, got {slab_bytes}")
        num_slabs = capacity_bytes // slab_bytes
        if num_slabs < 1:
            raise ConfigError(f"cache size {capacity_bytes} bytes is smaller than one slab "
                              f"({slab_bytes} bytes); give a larger --cache-size")
        self.slab_bytes = slab_bytes
        self.num_slabs = num_slabs
        self.capacity_bytes = num_slabs * slab_bytes
        self.region = region or SharedRegion.create(name, self.capacity_bytes)
        self.generation_region = SharedRegion.create(f"{name}.gen", num_slabs * 8)
        self._generations = self.generation_region.buffer.cast("Q")
        self._buffer = self.region.buffer
        self._free_lock = threading.Lock()
        self._free: list[int] = list(range(num_slabs - 1, -1, -1))
        self._buckets = [_Bucket() for _ in range(num_buckets)]
        self._counter_lock = threading.Lock()
        self._used_bytes = 0
        self._reserved_bytes = 0
        self._entries = 0
        self._admits = 0
        self._evictions = 0
        self._listeners: list[PoolListener] = []
        self.tenant = ""  # the tenant of entries whose namespace no client bound to another
        self._namespace_tenants: dict[bytes, str] = {}
        self._limits: dict[str, TenantLimits] = {}
        self._usage: dict[str, TenantUsage] = {}  # under _counter_lock

    # ----------------------------------------------------------------- bookkeeping helpers
    def add_listener(self, listener: PoolListener) -> None:
        """Call ``listener(event, namespace, key)`` on every admit and eviction."""
        self._listeners.append(listener)

    def _bucket(self, key: bytes) -> _Bucket:
        return self._buckets[int.from_bytes(key[:4], "little") % len(self._buckets)]

    def slabs_for(self, nbytes: int) -> int:
        return max(1, -(-nbytes // self.slab_bytes))

    def slab_views(self, slabs: list[int], nbytes: int) -> list[memoryview]:
        return slab_views(self._buffer, self.slab_bytes, slabs, nbytes)

    def _emit(self, event: str, namespace: bytes, key: bytes) -> None:
        for listener in self._listeners:
            try:
                listener(event, namespace, key)
            except Exception:  # a listener must never break the data path
                log.exception("pool listener failed on %s", event)

    # ----------------------------------------------------------------- tenants
    def bind_namespace(self, namespace: bytes, tenant: str) -> str:
        """Make ``tenant`` the owner of ``namespace``'s entries (the first binding stays);
        returns the namespace's tenant."""
        with self._counter_lock:
            current = self._namespace_tenants.get(namespace)
            if current is None and len(self._namespace_tenants) < MAX_BOUND_NAMESPACES:
                self._namespace_tenants[namespace] = current = tenant
            return current if current is not None else self.tenant

    def tenant_of(self, namespace: bytes) -> str:
        return self._namespace_tenants.get(namespace, self.tenant)

    def set_tenant_limits(self, limits: dict[str, TenantLimits]) -> None:
        """Quotas and TTLs per tenant (a tenant not named has neither). A new TTL applies to
        entries stored from now on; a lower quota is met by the next reservations."""
        self._limits = dict(limits)

    def tenant_limits(self) -> dict[str, TenantLimits]:
        return dict(self._limits)

    def tenant_usage(self) -> dict[str, TenantUsage]:
        with self._counter_lock:
            return {t: TenantUsage(**u.__dict__) for t, u in self._usage.items()}

    def _usage_of(self, tenant: str) -> TenantUsage:  # under _counter_lock
        usage = self._usage.get(tenant)
        if usage is None:
            usage = self._usage[tenant] = TenantUsage()
        return usage

    def _take_quota(self, tenant: str, nbytes: int) -> None:
        """Count ``nbytes`` against ``tenant``'s quota, evicting its own LRU entries to make
        room; QuotaExceeded when they are all pinned."""
        quota = self._limits.get(tenant, TenantLimits()).quota_bytes
        if quota is not None and nbytes > quota:
            with self._counter_lock:
                self._usage_of(tenant).quota_refusals += 1
            raise QuotaExceeded(f"an entry of {nbytes} bytes is larger than tenant "
                                f"{tenant or '(cluster)'}'s quota of {quota} bytes in this pool")
        while True:
            with self._counter_lock:
                usage = self._usage_of(tenant)
                if quota is None or usage.used_bytes + nbytes <= quota:
                    usage.used_bytes += nbytes
                    return
            if not self._evict_one(tenant=tenant):
                with self._counter_lock:
                    self._usage_of(tenant).quota_refusals += 1
                raise QuotaExceeded(f"tenant {tenant or '(cluster)'} is at its quota of {quota} "
                                    "bytes in this pool and its own entries are all in use; "
                                    "retry later")
            with self._counter_lock:
                self._usage_of(tenant).quota_evictions += 1

    def _give_quota(self, tenant: str, nbytes: int) -> None:
        with self._counter_lock:
            self._usage_of(tenant).used_bytes -= nbytes

    def trim_tenant(self, tenant: str, nbytes: int) -> int:
        """Evict ``tenant``'s own LRU entries until ``nbytes`` are freed (or none is left
        unpinned): how a tenant over its cluster-wide quota gives bytes back. Bytes freed."""
        freed = 0
        while freed < nbytes:
            entry = self._evict_one(tenant=tenant)
            if not entry:
                break
            freed += entry
            with self._counter_lock:
                self._usage_of(tenant).quota_evictions += 1
        return freed

    def reclaim_expired(self) -> int:
        """Drop every unpinned entry past its TTL now; how many were dropped."""
        if not any(limit.ttl_s is not None for limit in self._limits.values()):
            return 0
        now = time.monotonic()
        dropped = []
        for bucket in self._buckets:
            with bucket.lock:
                gone = [e for e in bucket.entries.values() if e.pins == 0 and e.expired(now)]
                for entry in gone:
                    del bucket.entries[entry.key]
            dropped += gone
        for entry in dropped:
            self._drop(entry, expired=True)
        return len(dropped)

    # ----------------------------------------------------------------- write path
    def reserve(self, namespace: bytes, key: bytes, nbytes: int) -> Reservation:
        """Take slabs for an entry of ``nbytes``, evicting least-recently-used entries if needed
        (only the namespace's tenant's own, when it is at its quota)."""
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        needed = self.slabs_for(nbytes)
        if needed > self.num_slabs:
            raise EntryTooLarge(f"an entry of {nbytes} bytes needs {needed} slabs but the pool "
                                f"has {self.num_slabs}; give a larger --cache-size")
        tenant = self.tenant_of(namespace)
        self._take_quota(tenant, nbytes)
        try:
            slabs = self._take_slabs(needed, nbytes)
        except BaseException:
            self._give_quota(tenant, nbytes)
            raise
        with self._counter_lock:
            self._reserved_bytes += nbytes
        return Reservation(self, namespace, key, slabs, nbytes, tenant)

    def _take_slabs(self, needed: int, nbytes: int) -> list[int]:
        slabs: list[int] = []
        while True:
            with self._free_lock:
                take = min(needed - len(slabs), len(self._free))
                for _ in range(take):
                    slabs.append(self._free.pop())
            if len(slabs) == needed:
                break
            if not self._evict_one():
                self._release_slabs(slabs)
                raise PoolFullError(f"no room for {nbytes} bytes: every entry is pinned or being "
                                    "written; retry later or give a larger --cache-size")
        return slabs

    def commit(self, reservation: Reservation) -> bool:
        self._finish(reservation)
        bucket = self._bucket(reservation.key)
        stale = None
        with bucket.lock:
            existing = bucket.entries.get(reservation.key)
            if existing is not None and existing.pins == 0 and existing.expired(time.monotonic()):
                stale = bucket.entries.pop(reservation.key)  # a fresh copy replaces it
            duplicate = reservation.key in bucket.entries
            if not duplicate:
                ttl = self._limits.get(reservation.tenant, TenantLimits()).ttl_s
                bucket.entries[reservation.key] = Entry(
                    reservation.namespace, reservation.key, reservation.slabs, reservation.nbytes,
                    tenant=reservation.tenant,
                    expires=time.monotonic() + ttl if ttl is not None else float("inf"))
        if stale is not None:
            self._drop(stale, expired=True)
        if duplicate:
            self._release_slabs(reservation.slabs)
            self._give_quota(reservation.tenant, reservation.nbytes)
            return False
        with self._counter_lock:
            self._used_bytes += reservation.nbytes
            self._entries += 1
            self._admits += 1
            usage = self._usage_of(reservation.tenant)
            usage.entries += 1
            usage.admits += 1
        self._emit("admit", reservation.namespace, reservation.key)
        return True

    def abort(self, reservation: Reservation) -> None:
        self._finish(reservation)
        self._release_slabs(reservation.slabs)
        self._give_quota(reservation.tenant, reservation.nbytes)

    def _finish(self, reservation: Reservation) -> None:
        if reservation.done:
            raise ValueError("reservation was already committed or aborted")
        reservation.done = True
        with self._counter_lock:
            self._reserved_bytes -= reservation.nbytes

    def _release_slabs(self, slabs: Iterable[int]) -> None:
        with self._free_lock:
            # pushed in reverse so the next reservation pops them in the same ascending order:
            # an entry's slabs tend to stay adjacent, and adjacent slabs copy as one block
            for slab in reversed(list(slabs)):
                self._generations[slab] += 1  # before the slab can be reused
                self._free.append(slab)

    def generations(self, slabs: Iterable[int]) -> list[int]:
        """Current generation of each slab (see the module docstring)."""
        return [self._generations[slab] for slab in slabs]

    def put(self, namespace: bytes, key: bytes, data: bytes | memoryview) -> bool:
        """Reserve, fill and commit in one call. False if the key was already present."""
        data = memoryview(data).cast("B")
        reservation = self.reserve(namespace, key, data.nbytes)
        try:
            reservation.write(data)
        except BaseException:
            reservation.abort()
            raise
        return reservation.commit()

    # ----------------------------------------------------------------- eviction
    def _evict_one(self, tenant: str | None = None) -> int:
        """Evict the least-recently-used unpinned entry (of ``tenant`` only, if given; an
        expired one first). Its size, or 0 if there is none."""
        now = time.monotonic()
        for _ in range(4):  # entries may be pinned or touched between the scan and the removal
            oldest: Entry | None = None
            oldest_bucket: _Bucket | None = None
            for bucket in self._buckets:
                with bucket.lock:
                    for entry in bucket.entries.values():
                        if entry.pins == 0 and (tenant is None or entry.tenant == tenant):
                            if entry.expired(now):
                                oldest, oldest_bucket = entry, bucket
                                break
                            if oldest is None or (not oldest.expired(now)
                                                  and entry.last_used < oldest.last_used):
                                oldest, oldest_bucket = entry, bucket
                            if tenant is None:
                                break  # buckets are in LRU order
                if oldest is not None and oldest.expired(now):
                    break
            if oldest is None or oldest_bucket is None:
                return 0
            with oldest_bucket.lock:
                current = oldest_bucket.entries.get(oldest.key)
                if current is not oldest or oldest.pins:
                    continue
                del oldest_bucket.entries[oldest.key]
            self._drop(oldest, expired=oldest.expired(now))
            return max(1, oldest.nbytes)
        return 0

    def _drop(self, entry: Entry, expired: bool = False) -> None:
        self._release_slabs(entry.slabs)
        with self._counter_lock:
            self._used_bytes -= entry.nbytes
            self._entries -= 1
            self._evictions += 1
            usage = self._usage_of(entry.tenant)
            usage.used_bytes -= entry.nbytes
            usage.entries -= 1
            if expired:
                usage.expired += 1
        self._emit("evict", entry.namespace, entry.key)

    def remove(self, key: bytes) -> bool:
        """Drop an entry now if it is not pinned. False if absent or pinned."""
        bucket = self._bucket(key)
        with bucket.lock:
            entry = bucket.entries.get(key)
            if entry is None or entry.pins:
                return False
            del bucket.entries[key]
        self._drop(entry)
        return True

    # ----------------------------------------------------------------- read path
    def contains(self, key: bytes) -> bool:
        bucket = self._bucket(key)
        with bucket.lock:
            entry = bucket.entries.get(key)
            return entry is not None and not entry.expired(time.monotonic())

    def prefix_length(self, keys: Iterable[bytes]) -> int:
        """How many of ``keys``, from the first, are present."""
        count = 0
        for key in keys:
            if not self.contains(key):
                break
            count += 1
        return count

    def pin(self, key: bytes) -> Entry | None:
        """Pin an entry for reading (marks it recently used). None if absent."""
        bucket = self._bucket(key)
        with bucket.lock:
            entry = bucket.entries.get(key)
            now = time.monotonic()
            if entry is None or entry.expired(now):
                return None  # an expired entry is reclaimed by reclaim_expired or eviction
            entry.pins += 1
            entry.last_used = now
            bucket.entries.move_to_end(key)
            return entry

    def unpin(self, entry: Entry) -> None:
        bucket = self._bucket(entry.key)
        with bucket.lock:
            if entry.pins <= 0:
                raise ValueError("unpin of an entry that is not pinned")
            entry.pins -= 1

    def views(self, entry: Entry) -> list[memoryview]:
        """Views of a pinned entry's bytes, slab by slab."""
        return self.slab_views(entry.slabs, entry.nbytes)

    def read(self, key: bytes) -> bytes | None:
        """A copy of an entry's bytes, or None if absent."""
        entry = self.pin(key)
        if entry is None:
            return None
        try:
            return b"".join(self.views(entry))
        finally:
            self.unpin(entry)

    # ----------------------------------------------------------------- inspection
    def entries_by_namespace(self) -> dict[bytes, list[bytes]]:
        """Every committed key, grouped by namespace (for a full sync)."""
        result: dict[bytes, list[bytes]] = {}
        for bucket in self._buckets:
            with bucket.lock:
                for entry in bucket.entries.values():
                    result.setdefault(entry.namespace, []).append(entry.key)
        return result

    def entries_by_recency(self) -> list[tuple[bytes, int]]:
        """(key, bytes) of every committed entry, most recently used first."""
        found: list[tuple[float, bytes, int]] = []
        for bucket in self._buckets:
            with bucket.lock:
                found.extend((e.last_used, e.key, e.nbytes) for e in bucket.entries.values())
        found.sort(reverse=True)
        return [(key, nbytes) for _, key, nbytes in found]

    def stats(self) -> PoolStats:
        with self._free_lock:
            free = len(self._free)
        pinned = 0
        for bucket in self._buckets:
            with bucket.lock:
                pinned += sum(1 for entry in bucket.entries.values() if entry.pins)
        with self._counter_lock:
            return PoolStats(self.capacity_bytes, self.slab_bytes, self._used_bytes,
                             self._reserved_bytes, self.num_slabs, free, self._entries, pinned,
                             self._admits, self._evictions)

    def export(self) -> PoolExport:
        """The pool as readers on this host map it."""
        return PoolExport(str(self.region.path), self.capacity_bytes,
                          str(self.generation_region.path), self.slab_bytes)

    def close(self) -> None:
        self._buffer = None
        self._generations.release()
        self.region.close()
        self.generation_region.close()
