"""The Python client of a local worker: what applications and the vLLM connector use.

A client talks to the worker on the same host over its local endpoint (an IPC socket) and maps
the worker's shared-memory pool, so chunk bytes never pass through a socket on this host:
``put`` writes straight into reserved slabs, ``acquire`` pins a prefix and exposes its slabs.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from lmshare.control import RpcClient
from lmshare.credentials import KEY_ENV, ClusterKey, load_key_file
from lmshare.errors import ConfigError, RemoteError, WorkerRestarted, WorkerUnavailable
from lmshare.keys import ModelSignature, signature_keys
from lmshare.local_files import check_private_dir
from lmshare.misses import parse_runs
from lmshare.pool import PoolExport, fill_views, slab_views
from lmshare.protocol import DEFAULT_LEASE_S, ErrorCode
from lmshare.shm import SharedRegion
from lmshare.signatures import MAX_DIAGNOSIS_CHARS, to_wire
from lmshare.stats import printable
from lmshare.transports.shm import PeerRegion, PeerRegions

log = logging.getLogger(__name__)

SIGNATURE_EVERY_S = 30.0  # a namespace's signature goes with its lookups this often
# calls that name slabs of the mapped pool carry the worker's incarnation: a restarted worker
# (same name, new pool) refuses them instead of handing out slabs of a pool we do not map
_POOL_CALLS = {"reserve", "commit", "abort", "acquire", "release"}


def runtime_dir() -> Path:
    """Where workers put their local endpoints: $LMSHARE_RUNTIME_DIR or a per-user temp dir."""
    configured = os.environ.get("LMSHARE_RUNTIME_DIR")
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / f"lmshare-{os.getuid()}"


def worker_endpoint(name: str) -> str:
    """The local endpoint of the worker called ``name`` on this host."""
    return f"ipc://{runtime_dir() / f'worker-{name}.sock'}"


@runtime_checkable
class ChunkWriter(Protocol):
    """A chunk that copies its own bytes into the slabs reserved for it (see ``put_keys``)."""

    @property
    def nbytes(self) -> int: ...

    def write_into(self, views: Sequence[memoryview]) -> None:
        """Start copying the chunk into ``views`` (in order, ``nbytes`` in all)."""

    def written(self) -> None:
        """Wait until :meth:`write_into` is done."""


class _BytesWriter:
    def __init__(self, data: bytes | memoryview) -> None:
        self._data = memoryview(data).cast("B")
        self.nbytes = self._data.nbytes

    def write_into(self, views: Sequence[memoryview]) -> None:
        fill_views(list(views), self._data)

    def written(self) -> None:
        pass


def _check_worker_proof(key: ClusterKey, info: dict, challenge: bytes, endpoint: str) -> None:
    """Raise unless the worker proved it holds ``key`` (or, for a cluster key, the credential
    of the tenant it names)."""
    tenant = info.get("tenant")
    if not isinstance(info.get("proof"), bytes) or not isinstance(tenant, str):
        raise ConfigError(f"the worker at {endpoint} runs without a cluster key (--insecure), "
                          "but this client was given one; give the worker the key, or the "
                          "client none")
    try:
        expected = key if tenant == key.tenant else key.for_tenant(tenant)
    except ConfigError:
        expected = None  # a tenant's client and a worker of another tenant (or the cluster)
    if expected is None or not any(hmac.compare_digest(info["proof"], hmac.new(
            local, b"worker" + challenge, hashlib.sha256).digest())
            for local in expected.local_keys()):  # (during a rotation, either key)
        raise ConfigError(f"the worker at {endpoint} does not hold this client's key "
                          f"({key.path or 'given'}): another cluster's or tenant's worker")


class _WorkerRpc(RpcClient):
    unavailable_error = WorkerUnavailable
    what = "local worker"


@dataclass(frozen=True)
class LookupResult:
    """How many prefix tokens the cluster can supply, split by where they are."""

    tokens: int
    local_tokens: int
    peer_tokens: int
    chunk_tokens: int
    #: why the chunks after the prefix are missed, in order: ((reason, chunks), ...)
    misses: tuple[tuple[str, int], ...] = ()

    @property
    def chunks(self) -> int:
        return self.tokens // self.chunk_tokens if self.chunk_tokens else 0


@dataclass(frozen=True)
class PrefixPlan:
    """Where each chunk of the longest available prefix of some keys is: ``holders[i]`` is
    ``()`` for a chunk the local worker holds, else the other workers holding it. Pass
    ``holders`` to :meth:`Client.acquire_keys` to fetch them without asking the controller
    again."""

    local: int  # chunks held by the local worker
    peer: int  # chunks only other workers hold
    holders: tuple[tuple[str, ...], ...] = ()
    # why no other worker shares this namespace, as the controller diagnosed it ('' if none)
    mismatch: str = ""
    #: why the chunks after the prefix are missed, in order: ((reason, chunks), ...), see
    #: lmshare/misses.py (a partial last chunk is the last run, "partial_chunk")
    misses: tuple[tuple[str, int], ...] = ()

    def __len__(self) -> int:
        return self.local + self.peer


def _plan_from_reply(reply: dict, keys: int) -> PrefixPlan:
    local, peer = int(reply["local"]), int(reply["peer"])
    mismatch = reply.get("mismatch")
    mismatch = printable(mismatch, MAX_DIAGNOSIS_CHARS) if isinstance(mismatch, str) else ""
    why = parse_runs(reply.get("misses"), keys + 1 - local - peer)
    holders = reply.get("holders")
    if not isinstance(holders, (list, tuple)) or len(holders) != local + peer or not all(
            isinstance(h, (list, tuple)) and all(isinstance(w, str) for w in h)
            for h in holders):
        return PrefixPlan(local, peer, mismatch=mismatch, misses=why)  # acquire asks again
    return PrefixPlan(local, peer, tuple(tuple(h) for h in holders), mismatch, why)


@dataclass(frozen=True)
class ChunkRef:
    """Where one chunk of a :class:`Hit` lies: its slabs and size, in the local pool or (when
    ``region`` is set) in the hit's ``region``-th same-host peer pool, whose slabs had
    ``generations`` when that peer pinned them."""

    slabs: list[int]
    nbytes: int
    region: int | None = None
    generations: list[int] | None = None

    @classmethod
    def from_wire(cls, chunk: list) -> ChunkRef:
        """From an acquire answer's ``[slabs, nbytes]`` or ``[slabs, nbytes, region, gens]``."""
        if len(chunk) > 2:
            return cls(list(chunk[0]), int(chunk[1]), int(chunk[2]), list(chunk[3]))
        return cls(list(chunk[0]), int(chunk[1]))


class Hit:
    """A pinned prefix of chunks. Read its views, then :meth:`release`.

    Chunks are in the local pool, or (from ``acquire_keys(..., direct=True)``) in a same-host
    peer's pool, mapped read-only here and pinned by that peer under the same lease: read those
    in place, then :meth:`verify` that the peer did not reuse their slabs meanwhile.
    """

    def __init__(self, client: Client, handle: int, chunks: list[ChunkRef], local: int,
                 peer: int, regions: list[PeerRegion] | None = None,
                 local_generations: list | None = None) -> None:
        self._client = client
        self.handle = handle
        self._chunks = chunks
        # slab generations of local chunks when they were pinned (None: a peer's chunk)
        self._local_generations = local_generations or []
        self._regions = regions or []  # the peers' pools this hit's chunks lie in
        self.local_chunks = local
        self.peer_chunks = peer
        self.released = False

    def __len__(self) -> int:
        return len(self._chunks)

    def nbytes(self, index: int) -> int:
        return self._chunks[index].nbytes

    def _peer(self, index: int) -> PeerRegion | None:
        region = self._chunks[index].region
        return self._regions[region] if region is not None else None

    def views(self, index: int) -> list[memoryview]:
        """Read-only views of chunk ``index``'s bytes, one per run of adjacent slabs (valid
        until release)."""
        if self.released:
            raise ValueError("hit was released; acquire again")
        chunk = self._chunks[index]
        peer = self._peer(index)
        if peer is not None:
            return peer.slab_views(chunk.slabs, chunk.nbytes)
        return [v.toreadonly() for v in self._client._slab_views(chunk.slabs, chunk.nbytes)]

    def region_buffer(self, index: int) -> memoryview | None:
        """The same-host peer's mapped pool holding chunk ``index`` (None: the local pool)."""
        peer = self._peer(index)
        return peer.region.buffer if peer is not None else None

    def verify(self, index: int) -> bool:
        """After reading chunk ``index``: True unless its slabs (in a peer's pool or the local
        one) were reused meanwhile, e.g. because the hit was held past its lease (then what was
        read must be discarded)."""
        peer = self._peer(index)
        if peer is None:
            recorded = self._local_generations[index] \
                if index < len(self._local_generations) else None
            table = self._client._generations if self._client is not None else None
            if recorded is None or table is None:
                return True
            return [table[s] for s in self._chunks[index].slabs] == list(recorded)
        chunk = self._chunks[index]
        return [peer.generations[s] for s in chunk.slabs] == list(chunk.generations or ())

    def read(self, index: int) -> bytes:
        return b"".join(self.views(index))

    def release(self) -> None:
        if not self.released:
            self.released = True
            if self.handle:
                self._client._release(self.handle)

    def __enter__(self) -> Hit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Client:
    """Connects to the local worker by name (``worker="node-a"``) or endpoint.

    Thread-safe. Every call has a deadline (``timeout_s``); a worker that does not answer raises
    :class:`~lmshare.errors.WorkerUnavailable`. With a cluster key (``key_file``, default
    ``$LMSHARE_KEY_FILE``) the worker must prove it holds that key (or, for a cluster key, its
    tenant's credential) before the client maps its pool; otherwise ConfigError.
    """

    def __init__(self, worker: str | None = None, endpoint: str | None = None,
                 timeout_s: float = 10.0, key_file: str | None = None) -> None:
        if endpoint is None:
            if not worker:
                raise ConfigError("Client needs the local worker's name (worker=...) or endpoint")
            endpoint = worker_endpoint(worker)
        if endpoint.startswith("ipc://"):  # refuse a directory another user could swap
            check_private_dir(os.path.dirname(endpoint[len("ipc://"):]),
                              "worker's runtime directory")
        self.endpoint = endpoint
        self._rpc = _WorkerRpc(endpoint, timeout_s)
        self._lock = threading.Lock()
        self._described: dict[bytes, float] = {}  # namespace → when its signature was sent
        key_file = key_file or os.environ.get(KEY_ENV) or None
        key = load_key_file(key_file) if key_file else None
        challenge = secrets.token_bytes(32)
        info = self._call("hello", **({"challenge": challenge} if key is not None else {}))
        if key is not None:
            _check_worker_proof(key, info, challenge, endpoint)
        self.incarnation: str = info.get("incarnation", "")
        self.worker_id: str = info["worker_id"]
        pool = PoolExport.from_wire(info["pool"])
        self.slab_bytes: int = pool.slab_bytes
        self._region = SharedRegion.attach(pool.path, pool.nbytes)
        # the worker's slab generations, read-only: a local hit's verify() checks them
        self._generation_region = SharedRegion.attach(pool.generation_path, pool.num_slabs * 8,
                                                      writable=False)
        self._generations: memoryview | None = self._generation_region.buffer.cast("Q")
        self._peer_regions = PeerRegions()  # same-host peers' pools, read-only

    @property
    def on_peer_unmap(self) -> Callable[[memoryview], None] | None:
        """Called with a peer pool's buffer before this client stops using it (the peer
        restarted with a new pool): undo registrations so the old mapping can go."""
        return self._peer_regions.on_unmap

    @on_peer_unmap.setter
    def on_peer_unmap(self, callback: Callable[[memoryview], None] | None) -> None:
        self._peer_regions.on_unmap = callback

    def _call(self, type_: str, **fields: object) -> dict:
        if type_ in _POOL_CALLS and getattr(self, "incarnation", ""):
            fields["incarnation"] = self.incarnation
        try:
            with self._lock:
                return self._rpc.call(type_, **fields)
        except RemoteError as exc:
            if exc.code == ErrorCode.WORKER_RESTARTED:
                raise WorkerRestarted(f"worker at {self.endpoint} restarted since this client "
                                      "mapped its pool; create a new Client") from None
            raise

    @property
    def pool_buffer(self) -> memoryview:
        """The worker's shared-memory pool as this process maps it (read-write). Chunk bytes of
        a :class:`Hit` are views into it; page-lock it once for fast device copies."""
        return self._region.buffer

    def _slab_views(self, slabs: list[int], nbytes: int) -> list[memoryview]:
        return slab_views(self._region.buffer, self.slab_bytes, slabs, nbytes)

    def _release(self, handle: int) -> None:
        try:
            self._call("release", handle=handle)
        except WorkerUnavailable as exc:  # the lease expires on its own
            log.warning("could not release lease %d: %s", handle, exc)

    # ------------------------------------------------------------------ key-level API
    def put_keys(self, namespace: bytes, keys: Sequence[bytes],
                 chunks: Sequence[bytes | memoryview | ChunkWriter], tenant: str = "") -> int:
        """Store ``chunks[i]`` under ``keys[i]``; returns how many were new to the pool.
        ``tenant``: whose chunks they are (its quota and TTL apply; default: the worker's).

        A chunk is bytes, or a :class:`ChunkWriter` that copies itself into the reserved slabs
        (e.g. straight from GPU memory): all writes are started, then waited for, then
        committed."""
        if len(chunks) > len(keys):
            raise ValueError(f"{len(chunks)} chunks but only {len(keys)} full-chunk keys")
        keys = list(keys[: len(chunks)])
        if not keys:
            return 0
        writers = [c if isinstance(c, ChunkWriter) else _BytesWriter(c) for c in chunks]
        reply = self._call("reserve", namespace=namespace, keys=keys,
                           sizes=[w.nbytes for w in writers],
                           **({"tenant": tenant} if tenant else {}))
        handles = []
        try:
            started = []
            for writer, slot in zip(writers, reply["reservations"]):
                if slot is None:
                    continue  # already stored
                handle, slabs = slot
                writer.write_into(self._slab_views(slabs, writer.nbytes))
                started.append(writer)
                handles.append(handle)
            for writer in started:
                writer.written()
        except BaseException:
            if handles:
                self._call("abort", handles=handles)
            raise
        if not handles:
            return 0
        return int(self._call("commit", handles=handles)["committed"])

    def lookup_plan(self, namespace: bytes, keys: Sequence[bytes], peers: bool = True,
                    count: bool = True, chunk_tokens: int = 0,
                    recompute_tokens_per_s: float | None = None, chunk_bytes: int = 0,
                    direct: bool = False, signature: ModelSignature | None = None,
                    tail_tokens: int = 0) -> PrefixPlan:
        """Where each chunk of the longest available prefix of ``keys`` is (one controller
        round trip at most, made by the worker). ``count=False``: a repeated lookup (e.g. a
        request vLLM could not schedule yet) that the worker's hit/miss statistics should not
        count again. ``chunk_tokens``: the namespace's chunk size, which the worker reports so
        that a router can compute the same keys. With ``recompute_tokens_per_s`` and
        ``chunk_bytes`` too, peer chunks are offered only where fetching them beats
        recomputing them (``direct``: the asker reads same-host peers in place).
        ``signature``: the one behind ``namespace``, sent to the worker now and then so that the
        controller can say what differs when no other worker shares the namespace (the plan's
        ``mismatch``). ``tail_tokens``: the prompt's tokens after its last full chunk (a partial
        chunk, which the worker counts as missed for that reason). The plan's ``misses`` say
        why each chunk after the prefix is not in it."""
        if not keys:
            return PrefixPlan(0, 0)
        extra: dict[str, object] = {"chunk_tokens": int(chunk_tokens)} if chunk_tokens else {}
        if signature is not None:
            extra.update(self._signature_field(namespace, signature))
        if tail_tokens > 0:
            extra["tail_tokens"] = int(tail_tokens)
        # the worker counts a reply it makes after this client gave up as a missed lookup
        extra["deadline_ms"] = max(1, min(86_400_000, int(self._rpc.timeout_s * 1000)))
        if recompute_tokens_per_s and chunk_bytes and chunk_tokens:
            # peer chunks that would be fetched are offered only if that beats recomputing
            extra.update(recompute_tokens_per_s=float(recompute_tokens_per_s),
                         chunk_bytes=int(chunk_bytes), direct=bool(direct))
        return _plan_from_reply(self._call("local_lookup", namespace=namespace,
                                           keys=list(keys), peers=peers, count=bool(count),
                                           **extra), len(keys))

    def _signature_field(self, namespace: bytes, signature: ModelSignature) -> dict:
        now = time.monotonic()
        with self._lock:
            if now - self._described.get(namespace, -SIGNATURE_EVERY_S) < SIGNATURE_EVERY_S:
                return {}
            if len(self._described) >= 4096:
                self._described.clear()
            self._described[namespace] = now
        wire = to_wire(signature)
        return {"signature": wire} if wire is not None else {}

    def lookup_keys(self, namespace: bytes, keys: Sequence[bytes], peers: bool = True,
                    count: bool = True, chunk_tokens: int = 0,
                    recompute_tokens_per_s: float | None = None, chunk_bytes: int = 0,
                    direct: bool = False) -> tuple[int, int]:
        """(local, peer) chunk counts of the longest available prefix of ``keys`` (see
        :meth:`lookup_plan`)."""
        plan = self.lookup_plan(namespace, keys, peers, count, chunk_tokens,
                                recompute_tokens_per_s, chunk_bytes, direct)
        return plan.local, plan.peer

    def acquire_keys(self, namespace: bytes, keys: Sequence[bytes], peers: bool = True,
                     lease_s: float = DEFAULT_LEASE_S, direct: bool = False,
                     chunk_bytes: int | None = None,
                     holders: Sequence[Sequence[str]] | None = None, tenant: str = "") -> Hit:
        """Pin the longest available prefix of ``keys`` in the local pool, fetching chunks held
        only by peers first. A failed or late peer chunk truncates the prefix before it.

        ``direct=True``: chunks that same-host peers hold are not copied into the local pool;
        the hit points into the peers' pools (mapped read-only here), pinned there for the
        lease (see :meth:`Hit.verify`). Peers on other hosts are fetched as usual.

        ``chunk_bytes``: the size of every chunk (when the caller knows it, e.g. from the
        model's KV layout); a peer announcing another size is refused before the worker
        reserves or evicts anything for it.

        ``holders``: a :class:`PrefixPlan`'s holders of (the first of) these keys: the worker
        fetches from them without asking the controller, unless a chunk is no longer where
        the plan says. The prefix then ends at the first key past them not held locally."""
        if not keys:
            return Hit(self, 0, [], 0, 0)
        fields: dict[str, object] = {"direct": True} if direct else {}
        if chunk_bytes is not None:
            fields["chunk_bytes"] = int(chunk_bytes)
        if holders is not None:
            fields["holders"] = [list(h) for h in holders]
        if tenant:
            fields["tenant"] = tenant
        reply = self._call("acquire", namespace=namespace, keys=list(keys), peers=peers,
                           lease_s=float(lease_s), **fields)
        chunks = [ChunkRef.from_wire(c) for c in reply["chunks"]]
        regions = [self._peer_regions.get(str(where.get("worker", "")),
                                          PoolExport.from_wire(where))
                   for where in reply.get("regions", [])]
        return Hit(self, int(reply["handle"]), chunks, int(reply["local"]), int(reply["peer"]),
                   regions, reply.get("local_gens"))

    # ------------------------------------------------------------------ token-level API
    def put(self, signature: ModelSignature, token_ids: Sequence[int],
            chunks: Sequence[bytes | memoryview]) -> int:
        """Store the KV bytes of the first ``len(chunks)`` full chunks of ``token_ids``."""
        return self.put_keys(signature.namespace(), signature_keys(signature, token_ids), chunks,
                             tenant=signature.tenant)

    def lookup(self, signature: ModelSignature, token_ids: Sequence[int],
               peers: bool = True) -> LookupResult:
        """How many prefix tokens of ``token_ids`` are available, locally and from peers
        (and why the rest is not: ``misses``)."""
        size = signature.chunk_tokens
        keys = signature_keys(signature, token_ids)
        if not keys:  # no full chunk: the whole prompt is a partial chunk
            return LookupResult(0, 0, 0, size, (("partial_chunk", 1),) if token_ids else ())
        plan = self.lookup_plan(signature.namespace(), keys, peers, chunk_tokens=size,
                                signature=signature,
                                tail_tokens=len(token_ids) - len(keys) * size)
        return LookupResult(len(plan) * size, plan.local * size, plan.peer * size, size,
                            plan.misses)

    def acquire(self, signature: ModelSignature, token_ids: Sequence[int], peers: bool = True,
                lease_s: float = DEFAULT_LEASE_S, direct: bool = False) -> Hit:
        """Pin the available prefix of ``token_ids`` (see :meth:`acquire_keys`)."""
        return self.acquire_keys(signature.namespace(), signature_keys(signature, token_ids),
                                 peers, lease_s, direct, tenant=signature.tenant)

    def get(self, signature: ModelSignature, token_ids: Sequence[int],
            peers: bool = True) -> list[bytes]:
        """The bytes of every chunk of the available prefix, fetched from peers when needed."""
        with self.acquire(signature, token_ids, peers) as hit:
            return [hit.read(i) for i in range(len(hit))]

    def stats(self) -> dict:
        """The worker's counters and pool state."""
        return self._call("worker_stats")

    def drain(self) -> dict:
        """Make the worker hand the chunks only it holds to peers and leave (as on SIGTERM);
        returns its drain report once the hand-off ended (``chunks``, ``unique``,
        ``assigned``, ``copied``, ``peers``, ``seconds``, ``note``)."""
        return self._call("drain")

    def close(self) -> None:
        self._rpc.close()
        self._region.close()
        if self._generations is not None:
            self._generations.release()
            self._generations = None
        self._generation_region.close()
        self._peer_regions.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
