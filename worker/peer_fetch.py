"""Fetching chunks from peers into the local pool: striped across holders, in parallel.

The chunks of one request are spread over the workers that hold them (round-robin per chunk),
each holder's share goes over up to :data:`STREAMS_PER_PEER` transport calls (connections), and
all of them run at once. Whatever arrives
is committed to the pool; the usable hit is the prefix of chunks present, so a failed or late
chunk truncates the hit and vLLM recomputes the rest.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from lmshare.errors import LMShareError
from lmshare.pool import KVPool, Reservation
from lmshare.transports.base import PeerInfo, Transport
from lmshare.worker.digests import DigestStore, chunk_digest
from lmshare.worker.fetch_policy import FetchPolicy

log = logging.getLogger(__name__)


class PoolSink:
    """A ChunkSink that lands fetched chunks in pool reservations.

    The size a peer announces for a chunk is checked before anything is reserved (or evicted
    to make room): it must be ``exact`` when the asker said how large its chunks are, and at
    most ``max_bytes`` in any case; a chunk that is not is refused (the hit stops there)."""

    def __init__(self, pool: KVPool, namespace: bytes, max_bytes: int | None = None,
                 exact: int | None = None, digests: dict[bytes, bytes] | None = None,
                 store: DigestStore | None = None) -> None:
        self._pool = pool
        self._namespace = namespace
        self.max_bytes = max_bytes
        self.exact = exact
        # key → the digest its writer recorded: a fetched chunk must match it to be committed
        self.digests = digests
        self._store = store
        self.digest_mismatches = 0
        self._open: dict[bytes, Reservation] = {}
        self.bytes_received = 0
        self.chunks_received = 0
        self.refused_chunks = 0

    def begin(self, key: bytes, nbytes: int) -> list[memoryview] | None:
        if (self.exact is not None and nbytes != self.exact) or \
                (self.max_bytes is not None and nbytes > self.max_bytes):
            self.refused_chunks += 1
            wanted = f"exactly {self.exact}" if self.exact is not None else \
                f"at most {self.max_bytes}"
            log.warning("a peer announced a chunk of %d bytes where %s were asked for; refused "
                        "before reserving anything", nbytes, wanted)
            return None
        try:
            reservation = self._pool.reserve(self._namespace, key, nbytes)
        except LMShareError as exc:
            log.warning("cannot make room for a fetched chunk: %s", exc)
            return None
        self._open[key] = reservation
        return reservation.buffers()

    def end(self, key: bytes, ok: bool) -> None:
        reservation = self._open.pop(key)
        if ok and self.digests is not None:
            expected = self.digests.get(key)
            if expected is None or chunk_digest(reservation.buffers()) != expected:
                ok = False
                self.digest_mismatches += 1
                log.warning("a fetched chunk's bytes do not match the digest its writer "
                            "recorded; dropped (the hit stops before it)")
            elif self._store is not None:
                self._store.record(key, expected)
        if ok:
            reservation.commit()
            self.bytes_received += reservation.nbytes
            self.chunks_received += 1
        else:
            reservation.abort()


#: parallel connections to one holder for one fetch: a single Python TCP stream moves ~1.5 GB/s
STREAMS_PER_PEER = 4


@dataclass
class FetchPlan:
    """Which keys to ask each holder for, in key order."""

    by_peer: dict[str, list[bytes]] = field(default_factory=dict)

    @classmethod
    def stripe(cls, keys: list[bytes], holders: list[list[str]]) -> FetchPlan:
        plan = cls()
        for index, (key, chunk_holders) in enumerate(zip(keys, holders)):
            peer = chunk_holders[index % len(chunk_holders)]
            plan.by_peer.setdefault(peer, []).append(key)
        return plan

    def streams(self, per_peer: int = STREAMS_PER_PEER) -> list[tuple[str, list[bytes]]]:
        """(holder, keys) per connection: each holder's keys in up to ``per_peer`` contiguous
        runs of near-equal length, fetched at the same time."""
        out = []
        for peer, keys in self.by_peer.items():
            count = max(1, min(per_peer, len(keys)))
            for i in range(count):
                part = keys[i * len(keys) // count : (i + 1) * len(keys) // count]
                if part:
                    out.append((peer, part))
        return out


class PeerFetcher:
    """Runs fetch plans with the best transport for each peer."""

    def __init__(self, pool: KVPool, transports: list[Transport], fetch_timeout_s: float,
                 checksum: bool = False, max_parallel: int = 16,
                 choose: Callable[[PeerInfo], str] | None = None,
                 policy: FetchPolicy | None = None, store: DigestStore | None = None) -> None:
        self._pool = pool
        self._store = store  # where checked digests of fetched chunks are recorded
        self._transports = {t.name: t for t in transports}
        self._choose = choose or (lambda peer: "tcp")
        self.policy = policy  # learns each peer's throughput from these fetches
        self.chunks_by_transport: dict[str, int] = {name: 0 for name in self._transports}
        self.fetch_timeout_s = fetch_timeout_s
        self.checksum = checksum
        self._executor = ThreadPoolExecutor(max_parallel, thread_name_prefix="lmshare-fetch")
        self._lock = threading.Lock()
        self.in_flight = 0
        self.bytes_fetched = 0
        self.chunks_fetched = 0
        self.failures = 0
        self.refused_chunks = 0  # chunks refused because of the size their holder announced
        self.digest_mismatches = 0  # chunks whose bytes did not match their writer's digest
        # the largest chunk local writers stored per namespace: what a peer's chunk of the
        # namespace may announce at most (without it, a quarter of the pool)
        self._known_sizes: dict[bytes, int] = {}
        # called after every fetch with (seconds, chunks asked for, chunks that arrived)
        self.on_fetch: Callable[[float, int, int], None] | None = None
        # called with the worker id of each holder that delivered fewer chunks than asked
        self.on_peer_failure: Callable[[str], None] | None = None

    def transport_for(self, peer: PeerInfo) -> Transport:
        return self._transports.get(self._choose(peer)) or self._transports["tcp"]

    def note_size(self, namespace: bytes, nbytes: int) -> None:
        """A local writer stores a chunk of ``nbytes`` in ``namespace``."""
        with self._lock:
            if nbytes > self._known_sizes.get(namespace, 0):
                if len(self._known_sizes) >= 10_000:
                    self._known_sizes.clear()
                self._known_sizes[namespace] = nbytes

    def size_limit(self, namespace: bytes) -> int:
        """The most bytes a fetched chunk of ``namespace`` may announce."""
        with self._lock:
            known = self._known_sizes.get(namespace)
        return known if known is not None else max(1, self._pool.capacity_bytes // 4)

    def fetch(self, namespace: bytes, keys: list[bytes], holders: list[list[str]],
              peers: dict[str, PeerInfo], chunk_bytes: int | None = None,
              digests: dict[bytes, bytes] | None = None) -> int:
        """Fetch ``keys`` (chunk i held by ``holders[i]``); returns how many arrived.
        ``chunk_bytes``: the size every chunk must have (when the asker knows it);
        ``digests``: key → the digest its writer recorded, checked before a chunk is kept."""
        started = time.monotonic()
        deadline = started + self.fetch_timeout_s
        plan = FetchPlan.stripe(keys, holders)
        received = 0
        with self._lock:
            self.in_flight += 1
        try:
            futures = []
            for peer_id, peer_keys in plan.streams():
                peer = peers.get(peer_id)
                if peer is None:
                    continue
                futures.append((peer_id, len(peer_keys), self._executor.submit(
                    self._fetch_one, peer, namespace, peer_keys, deadline, chunk_bytes,
                    digests)))
            bytes_by_peer: dict[str, int] = {}
            for peer_id, asked, future in futures:
                left = max(0.0, deadline - time.monotonic()) + 1.0
                got = 0
                try:
                    got, nbytes = future.result(timeout=left)
                    bytes_by_peer[peer_id] = bytes_by_peer.get(peer_id, 0) + nbytes
                except Exception as exc:  # includes the futures timeout
                    log.warning("peer fetch from %s failed: %s", peer_id, exc)
                received += got
                if got < asked and self.on_peer_failure is not None:
                    self.on_peer_failure(peer_id)
            if self.policy is not None:  # each peer's throughput, as this fetch saw it
                elapsed = time.monotonic() - started
                for peer_id, nbytes in bytes_by_peer.items():
                    self.policy.observe(peer_id, nbytes, elapsed)
            return received
        finally:
            with self._lock:
                self.in_flight -= 1
            if self.on_fetch is not None:
                self.on_fetch(time.monotonic() - started, len(keys), received)

    def _fetch_one(self, peer: PeerInfo, namespace: bytes, keys: list[bytes],
                   deadline: float, chunk_bytes: int | None = None,
                   digests: dict[bytes, bytes] | None = None) -> tuple[int, int]:
        sink = PoolSink(self._pool, namespace, self.size_limit(namespace), chunk_bytes,
                        digests, self._store)
        transport = self.transport_for(peer)
        transport.fetch(peer, keys, sink, deadline, checksum=self.checksum)
        with self._lock:
            self.bytes_fetched += sink.bytes_received
            self.chunks_fetched += sink.chunks_received
            self.chunks_by_transport[transport.name] += sink.chunks_received
            self.refused_chunks += sink.refused_chunks
            self.digest_mismatches += sink.digest_mismatches
            if sink.chunks_received < len(keys):
                self.failures += 1
        return sink.chunks_received, sink.bytes_received

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        for transport in self._transports.values():
            transport.close()
