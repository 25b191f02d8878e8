"""The worker agent: pool + peer server + controller link + local endpoint, in one process.

One fetch, end to end: a client's ``acquire`` arrives on the local endpoint →
:meth:`WorkerAgent.plan` finds the local prefix and asks the controller who holds the rest (or,
when the acquire carries the plan of an earlier ``local_lookup``, takes the holders from it,
checked against the peers the controller told this worker about: see
:class:`~lmshare.worker.peer_cache.PeerCache`) →
:class:`~lmshare.worker.peer_fetch.PeerFetcher` pulls those chunks from the holders'
:class:`~lmshare.transports.tcp.TcpPeerServer` straight into local pool slabs → the prefix is
pinned under a lease and its slab numbers go back to the client, which reads them from the
shared-memory pool it has mapped.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from lmshare import misses, protocol
from lmshare.client import worker_endpoint
from lmshare.control import FailoverControllerClient, LookupPorts, call_all
from lmshare.credentials import reload_on_sighup
from lmshare.errors import (
    ConfigError,
    ControllerUnavailable,
    EntryTooLarge,
    ErrorCode,
    LMShareError,
    PoolFullError,
    ProtocolError,
    RemoteError,
)
from lmshare.local_files import ensure_private_dir
from lmshare.pool import Entry, KVPool
from lmshare.shard_lookup import merge_lookups
from lmshare.shards import Shard, split_by_shard
from lmshare.shm import NameLock, remove_stale_regions
from lmshare.signals import SignalLatch
from lmshare.stats import WorkerCounters
from lmshare.transports.base import PeerInfo, Transport
from lmshare.transports.choice import choose_transport
from lmshare.transports.locate import LocateChannel
from lmshare.transports.shm import ShmTransport
from lmshare.transports.tcp import TcpPeerServer, TcpTransport
from lmshare.worker.config import WorkerConfig, host_identity
from lmshare.worker.control_link import ControlLink
from lmshare.worker.digests import DIGEST_BYTES, DigestStore, chunk_digest
from lmshare.worker.fetch_policy import FetchPolicy
from lmshare.worker.handoff import Handoff
from lmshare.worker.leases import LeaseTable
from lmshare.worker.local_server import CLIENT_FIELD, RECEIVED_FIELD, LocalServer
from lmshare.worker.namespaces import NamespaceLog
from lmshare.worker.peer_cache import PeerCache
from lmshare.worker.peer_fetch import PeerFetcher
from lmshare.worker.tenants import PoolTenants

log = logging.getLogger(__name__)

Remote = list[tuple[int, list[str]]]  # (index of a chunk not held here, the workers holding it)
EXPECTED_DIGESTS = 16384  # peer chunks' digests kept from lookups for acquires that carry a plan
EVICTED_KEPT = 65536  # keys this worker evicted recently (a lookup's "evicted" miss reason)


@dataclass
class AcquirePlan:
    """Where the available prefix of an acquire's keys is: its ``length``, the chunks of it not
    held here with the workers holding each (``remote``), those workers' data-plane ``infos``,
    and the digests their writers recorded for those chunks."""

    length: int
    remote: Remote = field(default_factory=list)
    infos: dict[str, PeerInfo] = field(default_factory=dict)
    digests: dict[bytes, bytes] = field(default_factory=dict)


def _hint(m: dict[str, Any], count: int) -> list[list[str]] | None:
    """The ``holders`` an acquire of ``count`` keys carries (None: none); their types and
    sizes are checked by the protocol's schema."""
    holders = m.get("holders")
    if holders is None:
        return None
    if len(holders) > count:
        raise ProtocolError(f"holders name {len(holders)} chunks but the acquire has {count} "
                            "keys; pass at most one list per key (as local_lookup returns them)")
    return [list(h) for h in holders]


class WorkerAgent:
    """Everything one worker runs. ``start()`` registers (or raises), ``run()`` serves until
    SIGTERM/SIGINT, ``shutdown()`` deregisters, drains in-flight reads and frees the pool."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.worker_id = config.name
        self.incarnation = uuid.uuid4().hex  # new pool, new incarnation
        # one worker of this name in this cluster on this host
        self._name_lock = NameLock(config.name,
                                   f"{config.controller_host}_{config.controller_port}")
        try:
            remove_stale_regions()
            self.pool = KVPool(config.cache_bytes, config.slab_bytes, name=config.name)
        except BaseException:
            self._name_lock.release()
            raise
        self.counters = WorkerCounters(capacity_bytes=self.pool.capacity_bytes)
        self._counter_lock = threading.Lock()
        self._one_sided_bytes_served = 0
        self.leases = LeaseTable(self.pool, config.max_lease_s)
        self._stopped = threading.Event()
        self._closed = False
        host = config.advertised_host()
        try:
            self.peer_server = TcpPeerServer(self._serve_chunk, host, config.port,
                                             locator=self._locate, releaser=self.leases.release,
                                             key=config.key, encrypt=config.encrypt)
        except OSError as exc:
            self.pool.close()
            self._name_lock.release()
            raise ConfigError(f"cannot listen for peers on {host}:{config.port} ({exc.strerror}); "
                              "choose another --port or stop the process using it") from None
        self.host_id = host_identity()
        self.transports = tuple(config.transports)
        tcp = self.tcp = TcpTransport(key=config.key, encrypt=config.encrypt)
        transports: list[Transport] = [tcp]
        # locate/release of the one-sided transports and direct hits, on the holders' data ports
        self.one_sided = LocateChannel(tcp)
        self.shm: ShmTransport | None = None
        if "shm" in self.transports:
            self.shm = ShmTransport(self.one_sided)
            transports.append(self.shm)
        self.ucx_export = None
        if "ucx" in self.transports:
            from lmshare.transports.ucx import UcxExport, UcxTransport

            self.ucx_export = UcxExport(self.pool.region.buffer, self.pool.generation_region.buffer)
            transports.append(UcxTransport(self.one_sided, self.host_id))
        self.fetch_policy = FetchPolicy()  # peers' measured throughput: fetch or recompute
        self.digests = DigestStore()  # the writers' digests of the pool's chunks
        self._hashers = ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1)),
                                           thread_name_prefix="lmshare-digest")
        self.pool.add_listener(self.digests.on_pool_event)
        self.evicted = misses.RecentKeys(EVICTED_KEPT)  # what tells "evicted" from "new"
        self.pool.add_listener(self._on_pool_event)
        self.fetcher = PeerFetcher(
            self.pool, transports, config.fetch_timeout_s, config.checksum,
            choose=lambda peer: choose_transport(self.host_id, self.transports, peer),
            policy=self.fetch_policy, store=self.digests)
        self.peer_cache: PeerCache[str, PeerInfo] = PeerCache()  # peers lookups named
        # the writers' digests of peer chunks, as the controller's lookups gave them
        self.expected_digests: PeerCache[bytes, bytes] = PeerCache(EXPECTED_DIGESTS)
        self.fetcher.on_peer_failure = self.peer_cache.forget
        self.endpoint = config.endpoint or worker_endpoint(config.name)
        registration = {
            "worker_id": self.worker_id, "host": host, "data_port": self.peer_server.port,
            "transports": list(self.transports), "capacity_bytes": self.pool.capacity_bytes,
            "host_id": self.host_id,
            "extra": {"region_bytes": self.pool.capacity_bytes,
                      "slab_bytes": self.pool.slab_bytes, "pid": os.getpid(),
                      **(self.ucx_export.registration() if self.ucx_export else {})},
        }
        self.namespaces = NamespaceLog()  # what the clients look up (reported to routers)
        self.tenants = PoolTenants(self.pool, config.key.tenant if config.key else "",
                                   config.tenant_quotas, config.tenant_ttls)
        # one link per controller shard; shard 0's heartbeats carry what the clients use and
        # its replies drive the duties the controller hands out (signature mismatches, tenant
        # caps): the other shards' replies only carry hand-off orders for their own keys
        shards = config.shard_addresses
        # each controller's lookup port, as its register replies advertise it: lookups go there
        self.lookup_ports = LookupPorts()
        self.links = [ControlLink(
            FailoverControllerClient(addresses, config.rpc_timeout_s, key=config.key),
            self.pool, registration, self.counter_snapshot,
            (lambda: {**self.namespaces.heartbeat_fields(), **self.tenants.heartbeat_fields()})
            if index == 0 else None,
            digest_of=self.digests.get if config.digests else None,
            on_heartbeat_reply=self._on_heartbeat_reply if index == 0 else self._on_replicate,
            shard=Shard(index, len(shards)), lookup_ports=self.lookup_ports)
            for index, addresses in enumerate(shards)]
        self.link = self.links[0]
        self.handoff = Handoff(self)  # graceful drain: chunks only it holds go to peers
        self._controller_clients = threading.local()  # per thread, by kind
        if self.endpoint.startswith("ipc://"):
            try:
                ensure_private_dir(os.path.dirname(self.endpoint[len("ipc://"):]))
            except ConfigError:
                self.peer_server.stop(0)
                self.pool.close()
                self._name_lock.release()
                raise
        # the local endpoint's requests (LOCAL_TYPES) and who answers each
        self.local_handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "hello": self._on_hello, "local_lookup": self._on_lookup, "reserve": self._on_reserve,
            "commit": self._on_commit, "abort": self._on_abort, "acquire": self._on_acquire,
            "release": self._on_release, "worker_stats": self._on_stats, "drain": self._on_drain,
            "ping": lambda m: protocol.ok(m["id"]),
        }
        try:
            self.local_server = LocalServer(self.endpoint, self.local_handlers,
                                            config.client_threads,
                                            may_wait=self._may_wait_on_peers)
        except ConfigError:
            self.peer_server.stop(0)
            self.pool.close()
            self._name_lock.release()
            raise

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> WorkerAgent:
        """Register with the controller (raises ControllerUnavailable) and start serving."""
        try:
            for link in self.links:
                link.register(timeout_s=self.config.connect_timeout_s)
        except (ControllerUnavailable, RemoteError, ConfigError):
            self.close()
            raise
        self.peer_server.start()
        self.local_server.start()
        for link in self.links:
            link.start()
        threading.Thread(target=self._sweep_leases, name="lmshare-leases", daemon=True).start()
        log.info("worker %s serving: peers on %s:%d, clients on %s, cache %d bytes",
                 self.worker_id, self.peer_server.host, self.peer_server.port, self.endpoint,
                 self.pool.capacity_bytes)
        return self

    def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then shut down gracefully."""
        signals = SignalLatch().install()  # SIGHUP: read the key file again (a key rotation)
        while not signals.stop_requested and not self._stopped.is_set():
            time.sleep(0.1)
            if signals.take_reload():
                self.reload_key()
        self._stopped.set()
        log.info("worker %s stopping", self.worker_id)
        self.shutdown()

    def stop(self) -> None:
        self._stopped.set()

    def reload_key(self) -> bool:
        """Read the key file again (SIGHUP) and use it from now on: a key rotation without a
        restart. False (and an error logged) when the file is not a rotation of the key."""
        key = reload_on_sighup(self.config.key, "worker")
        if key is None:
            return False
        self.config.key = key
        self.peer_server.set_key(key)
        self.tcp.set_key(key)
        for link in self.links:
            link.set_key(key)
        return True

    def shutdown(self) -> None:
        """Leave gracefully: deregister (no new peer reads), drain in-flight reads, free memory."""
        if self._closed:
            return
        self._stopped.set()
        self.handoff.drain(self.config.drain_timeout_s)  # the peers keep its unique chunks
        for link in self.links:
            link.request_stop()
        for link in self.links:
            link.stop(deregister=True)
        self.peer_server.stop(self.config.peer_drain_s)  # in-flight reads
        self.local_server.stop()
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.leases.release_all()
        self.fetcher.close()
        self._hashers.shutdown(wait=False)
        if self.ucx_export is not None:
            self.ucx_export.close()
        self.pool.close()
        self._name_lock.release()
        if self.endpoint.startswith("ipc://"):
            try:
                os.unlink(self.endpoint[len("ipc://"):])
            except OSError:
                pass

    def _sweep_leases(self) -> None:
        while not self._stopped.wait(0.5):
            self.leases.sweep()
            self.pool.reclaim_expired()  # chunks past their tenant's TTL

    # ------------------------------------------------------------------ stats
    def _count(self, **deltas: int) -> None:
        with self._counter_lock:
            for name, delta in deltas.items():
                setattr(self.counters, name, getattr(self.counters, name) + delta)

    def _count_misses(self, reasons: list[str]) -> None:
        """Count missed chunks by reason (a partial chunk is not a chunk asked for: it
        counts under its reason only, not in ``miss_chunks``)."""
        deltas: dict[str, int] = {}
        for reason in reasons:
            name = misses.counter_name(reason)
            deltas[name] = deltas.get(name, 0) + 1
        full = len(reasons) - deltas.get(misses.counter_name(misses.PARTIAL_CHUNK), 0)
        self._count(miss_chunks=full, **deltas)

    def _on_pool_event(self, event: str, namespace: bytes, key: bytes) -> None:
        if event == "evict":
            self.evicted.add(key)
        elif event == "admit":
            self.evicted.discard(key)

    def counter_snapshot(self) -> dict[str, int]:
        pool = self.pool.stats()
        with self._counter_lock:
            c = self.counters
            c.used_bytes, c.entries, c.pinned_entries = pool.used_bytes, pool.entries, pool.pinned_entries
            c.free_bytes = pool.slabs_free * pool.slab_bytes
            c.admits, c.evictions = pool.admits, pool.evictions
            c.bytes_served = self.peer_server.bytes_served + self._one_sided_bytes_served
            c.bytes_fetched = self.fetcher.bytes_fetched
            c.fetch_failures = self.fetcher.failures
            c.in_flight_fetches = self.fetcher.in_flight + self.peer_server.in_flight()
            c.refused_connections = self.peer_server.refused_total()
            c.refused_chunks = self.fetcher.refused_chunks
            c.digest_mismatches = self.fetcher.digest_mismatches
            return c.to_dict()

    # ------------------------------------------------------------------ data plane
    def _serve_chunk(self, key: bytes):
        entry = self.pool.pin(key)
        if entry is None:
            return None
        return self.pool.views(entry), lambda: self.pool.unpin(entry)

    def _on_heartbeat_reply(self, reply: dict[str, Any]) -> None:
        """Shard 0's heartbeat replies (the only controller's, without shards)."""
        self.namespaces.on_heartbeat_reply(reply)  # signature mismatches
        self.tenants.on_heartbeat_reply(reply)  # the controller's tenant caps and TTLs
        self._on_replicate(reply)

    def _on_replicate(self, reply: dict[str, Any]) -> None:
        if reply.get("replicate"):  # chunks to take over from a draining peer
            self.handoff.receive(reply["replicate"])

    def registered(self) -> bool:
        """Registered with every controller shard."""
        return all(link.registered.is_set() for link in self.links)

    def controllers(self, lookups: bool = True) -> list[FailoverControllerClient]:
        """This thread's clients of the controllers, one per shard: for lookups (to each
        controller's advertised lookup port once known), or for other requests (``lookups``
        False: the control ports)."""
        name = "lookup" if lookups else "control"
        clients = getattr(self._controller_clients, name, None)
        if clients is None:
            clients = [FailoverControllerClient(addresses, self.config.rpc_timeout_s,
                                                key=self.config.key,
                                                lookup_ports=self.lookup_ports if lookups
                                                else None)
                       for addresses in self.config.shard_addresses]
            setattr(self._controller_clients, name, clients)
        for client in clients:
            if client.key is not self.config.key:
                client.set_key(self.config.key)  # reloaded (applied by this thread's next call)
        return clients

    def _controller(self) -> FailoverControllerClient:
        return self.controllers()[0]

    def plan(self, namespace: bytes, keys: list[bytes], peers: bool,
             why: list[str | None] | None = None) -> AcquirePlan:
        """Where the available prefix of ``keys`` is. Local chunks come first; the controller
        is asked only when needed. With digests on, a peer chunk without a recorded digest ends
        the prefix (its bytes could not be checked). ``why`` gets, for each chunk from the end
        of the prefix on, its own miss reason, or None for one held somewhere (behind the
        stop)."""
        local_prefix = self.pool.prefix_length(keys)
        found = AcquirePlan(local_prefix)
        if local_prefix == len(keys):
            return found
        if not peers:
            return self._why_local(keys, local_prefix, misses.PEERS_OFF, why, found)
        if len(self.links) > 1:
            return self._plan_sharded(namespace, keys, local_prefix, why, found)
        if not self.link.may_answer():
            return self._why_local(keys, local_prefix, misses.CONTROLLER_UNREACHABLE, why, found)
        self._count(controller_lookups=1)
        try:
            reply = self._controller().call("lookup", namespace=namespace, keys=keys)
            self.link.heard()
        except RemoteError as exc:
            if exc.code == ErrorCode.UNKNOWN_NAMESPACE:
                return self._why_local(keys, local_prefix, misses.UNKNOWN_NAMESPACE, why, found)
            log.warning("controller lookup refused: %s", exc)
            return self._why_local(keys, local_prefix, misses.CONTROLLER_UNREACHABLE, why, found)
        except ControllerUnavailable as exc:
            log.warning("controller lookup failed (%s); using local hits only", exc)
            return self._why_local(keys, local_prefix, misses.CONTROLLER_UNREACHABLE, why, found)
        try:
            return self._plan_remote(keys, local_prefix, reply, why)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            log.warning("malformed lookup reply from the controller (%s); using local hits "
                        "only", exc)
            if why is not None:
                why.clear()
            return self._why_local(keys, local_prefix, misses.CONTROLLER_UNREACHABLE, why, found)

    def _plan_sharded(self, namespace: bytes, keys: list[bytes], local_prefix: int,
                      why: list[str | None] | None, found: AcquirePlan) -> AcquirePlan:
        """:meth:`plan`'s lookup over controller shards: each shard is sent its own keys, all
        at once, and the replies are awaited under one deadline; a shard that does not answer
        ends the prefix at its first key (``controller_unreachable`` from there)."""
        positions = split_by_shard(keys, len(self.links))
        answers: list[Any] = [None] * len(self.links)
        calls, asked = [], []
        clients = self.controllers()
        for shard, where in enumerate(positions):
            if not where:
                continue
            if not self.links[shard].may_answer():
                answers[shard] = ControllerUnavailable(f"controller shard {shard} is away")
                continue
            calls.append((clients[shard], "lookup",
                          {"namespace": namespace, "keys": [keys[i] for i in where]}))
            asked.append(shard)
        if calls:
            self._count(controller_lookups=1)
        for shard, answer in zip(asked, call_all(calls, self.config.rpc_timeout_s)):
            answers[shard] = answer
            if isinstance(answer, dict):
                self.links[shard].heard()
            elif not (isinstance(answer, RemoteError)
                      and answer.code == ErrorCode.UNKNOWN_NAMESPACE):
                log.warning("lookup on controller shard %d failed (%s); its keys count as "
                            "missed", shard, answer)
        merged = merge_lookups(keys, positions, answers)
        if merged.unknown_namespace:
            return self._why_local(keys, local_prefix, misses.UNKNOWN_NAMESPACE, why, found)
        start = len(why) if why is not None else 0
        plan = self._plan_remote(keys, local_prefix, merged.reply(), why)
        if why is not None and merged.unreachable:
            for offset in range(len(why) - start):
                position = plan.length + offset
                if position in merged.unreachable and why[start + offset] is not None \
                        and why[start + offset] != misses.EVICTED:
                    why[start + offset] = misses.CONTROLLER_UNREACHABLE
        return plan

    def _why_local(self, keys: list[bytes], start: int, otherwise: str,
                   why: list[str | None] | None, found: AcquirePlan) -> AcquirePlan:
        """Fill ``why`` from this worker's own knowledge only: held here (None), evicted
        here, else ``otherwise``; returns ``found``."""
        if why is not None:
            why.extend(None if self.pool.contains(k) else
                       misses.EVICTED if k in self.evicted else otherwise for k in keys[start:])
        return found

    def _plan_remote(self, keys: list[bytes], local_prefix: int, reply: dict[str, Any],
                     why: list[str | None] | None = None) -> AcquirePlan:
        recorded = reply.get("digests") or []
        digests: dict[bytes, bytes] = {}
        infos = {w: PeerInfo(info["worker_id"], info["host"], info["data_port"],
                             info.get("host_id", ""), tuple(info.get("transports", ("tcp",))),
                             info.get("extra", {}))
                 for w, info in reply["workers"].items()}
        holders: list[list[str]] = reply["holders"]
        self.peer_cache.learn(infos, gone={w for chunk in holders for w in chunk
                                           if w not in infos})
        remote: list[tuple[int, list[str]]] = []
        length = local_prefix
        for index in range(local_prefix, len(keys)):
            if self.pool.contains(keys[index]):
                length += 1
                continue
            others = [w for w in holders[index] if w != self.worker_id and w in infos] \
                if index < len(holders) else []
            if not others:
                break
            digest = recorded[index] if index < len(recorded) else None
            if self.config.digests:
                if not isinstance(digest, bytes) or len(digest) != DIGEST_BYTES:
                    break
                digests[keys[index]] = digest
            remote.append((index, others))
            length += 1
        self.expected_digests.learn(digests)
        if why is not None:
            why.extend(self._why_remote(keys, length, holders, infos, reply.get("misses")))
        return AcquirePlan(length, remote, infos, digests)

    def _why_remote(self, keys: list[bytes], start: int, holders: list[list[str]],
                    infos: dict[str, PeerInfo], codes: Any) -> list[str | None]:
        """Each chunk's own miss reason from ``start`` on (None: held somewhere), from this
        worker's pool and evictions and the controller's lookup reply (``holders`` of its
        held prefix, then one code per chunk past it)."""
        matched = len(holders)
        # the controller codes the first chunks past its prefix; one that codes none (an older
        # one) leaves them new, and a chunk past its codes takes the stop's reason
        past_codes = misses.HELD if isinstance(codes, bytes) else misses.NEW
        if not isinstance(codes, bytes) or len(codes) > len(keys) - matched:
            codes = b""
        out: list[str | None] = []
        for index in range(start, len(keys)):
            key = keys[index]
            if index < matched:
                named = holders[index]
                held = any(w != self.worker_id and w in infos for w in named)
                # not held: the controller still lists it here, or only holders gone
                gone = misses.EVICTED if named == [self.worker_id] else misses.HOLDER_GONE
            else:
                code = codes[index - matched] if index - matched < len(codes) else past_codes
                held = code == misses.HELD
                gone = misses.HOLDER_GONE if code == misses.GONE else \
                    misses.EVICTED if code == misses.EVICTED_CODE else misses.NEW_PREFIX
            if held or self.pool.contains(key):
                out.append(None)  # held somewhere, behind the stop
            else:
                out.append(misses.EVICTED if key in self.evicted else gone)
        return out

    def _may_wait_on_peers(self, m: dict[str, Any]) -> bool:
        """Whether a local request may wait on the controller or a peer (then it runs on the
        lane of such requests; local lookups and acquires of local chunks never queue behind
        them)."""
        if m["type"] == "drain":
            return True  # it waits on the hand-off
        if m["type"] not in ("acquire", "local_lookup") or not m["peers"]:
            return False
        return self.pool.prefix_length(m["keys"]) < len(m["keys"])

    def plan_from_hint(self, keys: list[bytes], hint: list[list[str]]) -> AcquirePlan | None:
        """:meth:`plan` from a client's ``hint`` (the holders of each of the first keys, as a
        ``local_lookup`` answered them; ``[]``: held here) instead of a controller lookup.
        Holders (and, with digests on, the chunks' digests) are only taken from what the
        controller's lookups told this worker. None (ask the controller) when a chunk is not
        where the hint says: not here although the hint says so, none of its holders known,
        or its digest not known. The prefix ends at the first key past the hint that is not
        held here, as the lookup's did."""
        remote: Remote = []
        infos: dict[str, PeerInfo] = {}
        digests: dict[bytes, bytes] = {}
        length = 0
        for index, key in enumerate(keys):
            if self.pool.contains(key):
                length += 1
                continue
            if index >= len(hint):
                break
            known = []
            for worker in hint[index]:
                info = infos.get(worker) or (self.peer_cache.get(worker)
                                             if worker != self.worker_id else None)
                if info is not None:
                    infos[worker] = info
                    known.append(worker)
            if not known:
                return None
            if self.config.digests:
                digest = self.expected_digests.get(key)
                if digest is None:
                    return None
                digests[key] = digest
            remote.append((index, known))
            length += 1
        return AcquirePlan(length, remote, infos, digests)

    # ------------------------------------------------------------------ handlers
    def _check_incarnation(self, m: dict[str, Any]) -> None:
        incarnation = m.get("incarnation")
        if incarnation is not None and incarnation != self.incarnation:
            raise LMShareError("this worker restarted since the client mapped its pool; connect "
                               "a new client", code=ErrorCode.WORKER_RESTARTED)

    def _on_hello(self, m: dict[str, Any]) -> dict[str, Any]:
        proof: dict[str, Any] = {}
        key = self.config.key
        if key is not None and isinstance(m.get("challenge"), bytes):
            # the worker proves to a client holding the key that it holds it too
            proof = {"proof": hmac.new(key.local_key(), b"worker" + m["challenge"],
                                       hashlib.sha256).digest(), "tenant": key.tenant}
        return protocol.ok(m["id"], **proof, worker_id=self.worker_id,
                           incarnation=self.incarnation,
                           pool=self.pool.export().to_wire(),
                           registered=self.registered(),
                           register_ms=round(self.link.last_register_s * 1000, 3))

    def _on_lookup(self, m: dict[str, Any]) -> dict[str, Any]:
        namespace, keys = m["namespace"], m["keys"]  # checked by the schema
        why: list[str | None] = []
        plan = self.plan(namespace, keys, m["peers"], why)
        planned, remote, infos = plan.length, plan.remote, plan.infos
        length, remote = self._fetches_that_win(m, planned, remote, infos)
        stop = misses.RECOMPUTE_FASTER if length < planned else \
            (why[0] if why and why[0] is not None else misses.FETCH_FAILED)
        reasons = [misses.RECOMPUTE_FASTER] * (planned - length) + \
            [own or stop for own in why]
        tail = [misses.PARTIAL_CHUNK] if m.get("tail_tokens") else []
        received, deadline_ms = m.get(RECEIVED_FIELD), m.get("deadline_ms")
        late = received is not None and deadline_ms is not None and \
            (time.monotonic() - received) * 1000 > deadline_ms
        if m.get("count", True):  # repeated lookups of one request count once
            self._count(lookups=1)
            # a reply past the asker's deadline is a miss of every chunk: it computes them
            self._count_misses(([misses.DEADLINE] * len(keys) if late else reasons) + tail)
            self.namespaces.record(namespace, m.get("chunk_tokens"))
        reasons += tail
        if m.get("signature") is not None:
            self.namespaces.describe(namespace, m["signature"])
        mismatch = self.namespaces.mismatch(namespace)  # why nobody shares it, if known
        holders: list[list[str]] = [[] for _ in range(length)]  # [] for a chunk held here
        for index, others in remote:
            holders[index] = others
        return protocol.ok(m["id"], local=length - len(remote), peer=len(remote),
                           holders=holders, misses=misses.runs(reasons),
                           **({"mismatch": mismatch} if mismatch else {}))

    def _fetches_that_win(self, m: dict[str, Any], length: int, remote: list, infos: dict
                          ) -> tuple[int, list]:
        """Cut the prefix before the peer chunks that would have to be fetched when fetching
        them is expected to take longer than the asker recomputing them (its
        ``recompute_tokens_per_s``; chunks a direct reader takes from a same-host pool in place
        are not fetched). Unchanged when the asker gives no rate or size."""
        rate, chunk_bytes, chunk_tokens = (m.get("recompute_tokens_per_s"), m.get("chunk_bytes"),
                                           m.get("chunk_tokens"))
        if not remote or rate is None or chunk_bytes is None or chunk_tokens is None:
            return length, remote
        fetched = [(index, holders) for index, holders in remote
                   if not (m.get("direct") and self.shm is not None and any(
                       choose_transport(self.host_id, self.transports, infos[h]) == "shm"
                       for h in holders if h in infos))]
        if not fetched:
            return length, remote
        by_peer: dict[str, int] = {}
        for position, (_, holders) in enumerate(fetched):  # as FetchPlan.stripe spreads them
            peer = holders[position % len(holders)]
            by_peer[peer] = by_peer.get(peer, 0) + 1
        if self.fetch_policy.worth_fetching(by_peer, chunk_bytes, chunk_tokens, rate):
            return length, remote
        cut = fetched[0][0]
        self._count(skipped_peer_chunks=length - cut)
        return cut, [r for r in remote if r[0] < cut]

    def _on_acquire(self, m: dict[str, Any]) -> dict[str, Any]:
        self._check_incarnation(m)
        namespace, keys = m["namespace"], m["keys"]  # checked by the schema
        self.tenants.bind(namespace, m.get("tenant"))  # peer chunks it fetches are the tenant's
        lease_s = min(float(m["lease_s"]), self.config.max_lease_s)
        hint = _hint(m, len(keys))
        planned = self.plan_from_hint(keys, hint) if hint is not None and m["peers"] else None
        plan = planned or self.plan(namespace, keys, m["peers"])
        length, remote, infos, digests = plan.length, plan.remote, plan.infos, plan.digests
        owner = m.get(CLIENT_FIELD, b"")
        # the client expects the chunks its plan named: those not delivered are missed
        expected = max(length, len(hint) if hint is not None else 0)
        if remote and m.get("direct"):
            granted = self._grant_direct(m["id"], keys, length, remote, infos, lease_s, owner,
                                         expected)
            if granted is not None:
                hits = len(granted["chunks"])
                self.tenants.count_acquire(namespace, hits, len(keys) - hits)
                return granted
        if remote:
            self.fetcher.fetch(namespace, [keys[i] for i, _ in remote],
                               [holders for _, holders in remote], infos,
                               chunk_bytes=m.get("chunk_bytes"),
                               digests=digests if self.config.digests else None)
        entries: list[Entry] = []
        for key in keys[:length]:
            entry = self.pool.pin(key)
            if entry is None:  # a peer chunk that did not arrive, or an eviction: truncate
                break
            entries.append(entry)
        fetched_keys = {keys[i] for i, _ in remote}
        peer_hits = sum(1 for e in entries if e.key in fetched_keys)
        self._count(local_hit_chunks=len(entries) - peer_hits, peer_hit_chunks=peer_hits)
        self.tenants.count_acquire(namespace, len(entries), len(keys) - len(entries))
        self._count_undelivered(len(entries), length, expected,
                                len(entries) < length and keys[len(entries)] in fetched_keys)
        handle = self.leases.add(lease_s, entries=entries, owner=owner) if entries else 0
        return protocol.ok(m["id"], handle=handle, local=len(entries) - peer_hits,
                           peer=peer_hits, chunks=[[e.slabs, e.nbytes] for e in entries],
                           local_gens=[self.pool.generations(e.slabs) for e in entries])

    def _count_undelivered(self, delivered: int, length: int, expected: int,
                           fetch_failed: bool) -> None:
        """Count the chunks an acquire was expected to deliver but did not: a peer chunk
        that did not arrive (and a chunk planned but no longer where the plan said) is a
        failed fetch; a local chunk evicted between plan and pin, an eviction."""
        if expected > delivered:
            reason = misses.EVICTED if delivered < length and not fetch_failed \
                else misses.FETCH_FAILED
            self._count_misses([reason] * (expected - delivered))

    def _grant_direct(self, request_id: Any, keys: list[bytes], length: int,
                      remote: Remote, infos: dict[str, PeerInfo],
                      lease_s: float, owner: bytes = b"", expected: int = 0
                      ) -> dict[str, Any] | None:
        """Acquire for a client that reads same-host peers' regions itself: the chunks other
        workers hold stay where they are, pinned by their holders under a lease that ends with
        the client's. None (fetch instead) unless every such chunk has a same-host holder."""
        if self.shm is None:
            return None
        holder_of: dict[int, str] = {}
        for index, holders in remote:
            same_host = [h for h in holders if choose_transport(
                self.host_id, self.transports, infos[h]) == "shm"]
            if not same_host:
                return None
            holder_of[index] = same_host[0]
        wanted: dict[str, list[int]] = {}
        for index, holder in holder_of.items():
            wanted.setdefault(holder, []).append(index)
        located: dict[int, tuple[int, list[int], int, list[int]]] = {}  # index -> region, ...
        regions: list[dict[str, Any]] = []
        releases = []
        deadline = time.monotonic() + self.config.fetch_timeout_s
        for holder, indexes in wanted.items():
            peer = infos[holder]
            try:
                found, release = self.one_sided.locate(
                    peer, [keys[i] for i in indexes], lease_s, deadline, maps=True)
            except (LMShareError, OSError) as exc:
                log.warning("cannot locate chunks on same-host peer %s: %s", holder, exc)
                continue  # its chunks are missing: the hit stops before the first of them
            releases.append(release)
            region = len(regions)
            # the holder's pool as the holder itself names it, never as its registration says
            regions.append({"worker": holder, **found.region.to_wire()})
            for index, chunk in zip(indexes, found.chunks):
                located[index] = (region, chunk.slabs, chunk.nbytes, chunk.generations)
        entries: list[Entry] = []
        chunks: list[list[Any]] = []
        local_gens: list[list[int] | None] = []
        for index in range(length):
            if index in holder_of:
                if index not in located:
                    break
                region, slabs, nbytes, gens = located[index]
                chunks.append([slabs, nbytes, region, gens])
                local_gens.append(None)
                continue
            entry = self.pool.pin(keys[index])
            if entry is None:
                break
            entries.append(entry)
            chunks.append([entry.slabs, entry.nbytes])
            local_gens.append(self.pool.generations(entry.slabs))
        direct = len(chunks) - len(entries)
        self._count(local_hit_chunks=len(entries), peer_hit_chunks=direct,
                    direct_peer_chunks=direct)
        self._count_undelivered(len(chunks), length, max(expected, length),
                                len(chunks) < length and len(chunks) in holder_of)
        if chunks:
            handle = self.leases.add(lease_s, entries=entries, on_end=releases, owner=owner)
        else:  # nothing to read: end the holders' leases now
            handle = 0
            for release in releases:
                release()
        return protocol.ok(request_id, handle=handle, local=len(entries), peer=direct,
                           chunks=chunks, regions=regions, local_gens=local_gens)

    def _locate(self, keys: list, lease_s: float) -> dict[str, Any]:
        """A peer's ``locate`` on the data port (:mod:`lmshare.transports.locate`): pin the
        local prefix of ``keys`` under a lease for a one-sided reader (same-host shared memory,
        a direct hit or UCX) and say where it is: its slabs, their generations and the pool
        they are in (what a same-host reader maps comes from here, the holder)."""
        lease_s = min(lease_s, self.config.max_lease_s)
        entries: list[Entry] = []
        for key in keys:
            entry = self.pool.pin(key) if isinstance(key, bytes) else None
            if entry is None:
                break
            entries.append(entry)
        handle = self.leases.add(lease_s, entries=entries) if entries else 0
        with self._counter_lock:
            self._one_sided_bytes_served += sum(e.nbytes for e in entries)
        return {"handle": handle, "chunks": [[e.slabs, e.nbytes] for e in entries],
                "gens": [self.pool.generations(e.slabs) for e in entries],
                "region": self.pool.export().to_wire()}

    def _on_release(self, m: dict[str, Any]) -> dict[str, Any]:
        self._check_incarnation(m)
        return protocol.ok(m["id"], released=self.leases.release(
            m["handle"], owner=m.get(CLIENT_FIELD, b"")))

    def _on_reserve(self, m: dict[str, Any]) -> dict[str, Any]:
        self._check_incarnation(m)
        namespace, keys = m["namespace"], m["keys"]  # checked by the schema
        self.tenants.bind(namespace, m.get("tenant"))
        sizes = m["sizes"]
        if len(sizes) != len(keys):  # each size is checked by the protocol's schema
            raise ProtocolError("sizes must be one byte count per key")
        reservations: list[Any] = []
        if sizes:
            self.fetcher.note_size(namespace, max(sizes))
        try:
            for key, size in zip(keys, sizes):
                if self.pool.contains(key):
                    reservations.append(None)
                    continue
                reservation = self.pool.reserve(namespace, key, size)
                handle = self.leases.add(self.config.max_lease_s, reservation=reservation,
                                         owner=m.get(CLIENT_FIELD, b""))
                reservations.append([handle, reservation.slabs])
        except (PoolFullError, EntryTooLarge):  # the reply carries the error's code
            for slot in reservations:
                if slot is not None:
                    self.leases.release(slot[0])
            raise
        return protocol.ok(m["id"], reservations=reservations)

    def _finish(self, m: dict[str, Any], commit: bool) -> int:
        leases = []
        for handle in m["handles"]:
            lease = self.leases.take(handle, owner=m.get(CLIENT_FIELD, b"")) \
                if isinstance(handle, int) else None
            if lease is not None and lease.reservation is not None:
                leases.append(lease)
        if not commit:
            for lease in leases:
                lease.reservation.abort()
            return 0
        if self.config.digests:  # recorded as the writer stored it
            # hashlib drops the GIL: a commit of many chunks hashes them on every core
            digests = self._hashers.map(lambda lease: chunk_digest(lease.reservation.buffers()),
                                        leases)
            for lease, digest in zip(leases, digests):
                self.digests.record(lease.reservation.key, digest)
        return sum(lease.reservation.commit() for lease in leases)

    def _on_commit(self, m: dict[str, Any]) -> dict[str, Any]:
        self._check_incarnation(m)
        return protocol.ok(m["id"], committed=self._finish(m, commit=True))

    def _on_abort(self, m: dict[str, Any]) -> dict[str, Any]:
        self._check_incarnation(m)
        self._finish(m, commit=False)
        return protocol.ok(m["id"])

    def _on_drain(self, m: dict[str, Any]) -> dict[str, Any]:
        """``lmshare drain``: leave as on SIGTERM (hand off, deregister, exit); answers once
        the hand-off ended."""
        self.stop()
        self.handoff.done.wait(self.config.drain_timeout_s + 2 * self.config.rpc_timeout_s + 1)
        return protocol.ok(m["id"], worker_id=self.worker_id, **self.handoff.report.to_dict())

    def _on_stats(self, m: dict[str, Any]) -> dict[str, Any]:
        return protocol.ok(m["id"], worker_id=self.worker_id, counters=self.counter_snapshot(),
                           registered=self.registered(),
                           controller_id=self.link.controller_id,
                           register_ms=round(self.link.last_register_s * 1000, 3),
                           leases=len(self.leases), data_port=self.peer_server.port,
                           transports=list(self.transports),
                           fetched_by_transport=dict(self.fetcher.chunks_by_transport),
                           namespaces=self.namespaces.snapshot(),
                           tenants=self.tenants.stats())
