"""The controller service: one thread, every message validated, on two ROUTER sockets.

The main socket takes everything (worker registrations, heartbeats, batches, syncs, stats,
lookups); the lookup socket (its own port, advertised in register, ping and stats replies) takes
``lookup`` and ``ping`` only, and the loop drains it before each step of other work: a lookup
there waits behind at most the one step in progress, never behind the main socket's queue.

Handlers never raise out of the loop: a bad message gets an error reply (and counts as refused),
and the controller keeps serving everyone else.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import zmq

from lmshare import misses, protocol, serving
from lmshare.controller import gc_policy
from lmshare.controller.digests import DigestRecords
from lmshare.controller.handoff import Handoffs, Target
from lmshare.controller.index import DEFAULT_MAX_KEYS_PER_WORKER, ChunkIndex
from lmshare.controller.pacing import HeartbeatPacing
from lmshare.controller.registry import WorkerRecord, WorkerRegistry
from lmshare.controller.signatures import SignatureBook
from lmshare.controller.tenants import ClusterTenants
from lmshare.credentials import ClusterKey
from lmshare.errors import ConfigError, ErrorCode, LMShareError
from lmshare.shards import Shard
from lmshare.signals import SignalLatch
from lmshare.signatures import from_wire
from lmshare.stats import MAX_MISMATCHES, ClusterEvent, ClusterStats, WorkerCounters, WorkerView
from lmshare.transports.base import PeerInfo
from lmshare.transports.choice import choose_transport

log = logging.getLogger(__name__)

DEPARTED_SHOWN_S = 120.0  # how long stats keep showing a worker that left or died
# what only the leader answers when controllers elect one (a standby refuses with not_leader)
LEADER_ONLY = {"register", "heartbeat", "batch", "sync", "deregister", "lookup", "explain",
               "handoff"}
TENANT_FIELD = "_tenant"
CONTROLLER_TYPES = {"register", "heartbeat", "batch", "sync", "deregister", "lookup", "explain",
                    "stats", "ping", "handoff"}
STATS_PAGE = 1000  # workers in one stats reply unless the request asks for another page size
LIVENESS_CHECK_S = 0.1  # how often the loop looks for workers whose heartbeats stopped
# what the lookup socket answers (nothing that changes state), and how many of its messages the
# loop serves before each step of other work: worker traffic is never starved by lookups
LOOKUP_LANE_TYPES = frozenset({"lookup", "ping"})
LOOKUP_BURST = 64
MAIN, LANE = "control", "lookup"  # the sockets' names (stats, refusal counts)
MAX_FRAMES = 3  # routing id (+ an empty delimiter from REQ sockets) + the message
# chunks whose last holder let them go (left, died or evicted them), remembered for miss
# reasons; and namespaces (per tenant) that ever had chunks, to tell "never seen" from "empty"
ORPHANS_KEPT = 131072
NAMESPACES_KEPT = 4096
MAX_EXPLAIN_KEYS = 4096
MISS_CODES = misses.LOOKUP_CODES


@dataclass
class ControllerConfig:
    host: str = "127.0.0.1"
    port: int = 7800
    lookup_port: int = 0  # the lookup socket's port; 0 = any free port (it is advertised)
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 5.0
    max_message_bytes: int = protocol.MAX_MESSAGE_BYTES
    max_lookup_keys: int = 65536
    key: ClusterKey | None = None  # the cluster key: CURVE on the socket; None = insecure
    tenants: tuple[str, ...] = ()  # tenants whose credentials (lmshare keygen --tenant) pass
    max_keys_per_worker: int = DEFAULT_MAX_KEYS_PER_WORKER
    # per tenant ("" = the cluster key's chunks): bytes it may hold across the cluster, and how
    # long its chunks stay in any pool (lmshare/tenancy.py)
    tenant_quotas: dict[str, int] = field(default_factory=dict)
    tenant_ttls: dict[str, float] = field(default_factory=dict)
    # the part of the key space this controller indexes (lmshare/shards.py); 0/1 = every key
    shard: Shard = field(default_factory=Shard)

    def __post_init__(self) -> None:
        for name in ("heartbeat_interval_s", "heartbeat_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name.replace('_s', '').replace('_', ' ')} must be a positive "
                                  f"number of seconds, not {value!r}")
        for name in ("max_message_bytes", "max_lookup_keys", "max_keys_per_worker"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value > 0):
                raise ConfigError(f"{name.replace('_', ' ')} must be a positive integer, "
                                  f"not {value!r}")
        for name in ("port", "lookup_port"):
            value = getattr(self, name)
            if not (type(value) is int and 0 <= value <= 65535):
                raise ConfigError(f"--{name.replace('_', '-')} must be a port number 0..65535 "
                                  f"(0 = any free port), not {value!r}")
        if self.lookup_port and self.lookup_port == self.port:
            raise ConfigError(f"--lookup-port {self.lookup_port} is the control port too; give "
                              "the lookup socket a port of its own (or 0 for any free port)")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ConfigError(f"heartbeat timeout ({self.heartbeat_timeout_s}s) must be longer "
                              f"than the heartbeat interval ({self.heartbeat_interval_s}s)")


def _namespace_report(report: Any) -> list[dict]:
    """A heartbeat's ``namespaces`` ({namespace: [chunk_tokens, lookups]}, checked by the
    protocol) as stats show them, most used first."""
    if not isinstance(report, dict):
        return []
    out = [{"namespace": ns.hex(), "chunk_tokens": uses[0], "lookups": uses[1]}
           for ns, uses in report.items() if len(uses) == 2]
    return sorted(out, key=lambda entry: -entry["lookups"])


# refusals that are a normal part of the protocol, not counted as refused requests (internal
# errors are logged instead)
_NOT_COUNTED = {ErrorCode.UNKNOWN_WORKER, ErrorCode.UNKNOWN_NAMESPACE, ErrorCode.NOT_LEADER,
                ErrorCode.INTERNAL}


def _unknown_namespace() -> LMShareError:
    return LMShareError("no worker ever held chunks of this namespace (model signature): "
                        "nothing was stored under it, or the signature differs from the writer's",
                        code=ErrorCode.UNKNOWN_NAMESPACE)


def _slab_bytes(record: WorkerRecord) -> int:
    """A worker's slab size as it registered it (1 when it did not say)."""
    slab = record.extra.get("slab_bytes")
    return slab if type(slab) is int and 0 < slab <= 1 << 40 else 1


class ControllerService:
    """Owns the registry and the index; serves requests until :meth:`stop`."""

    def __init__(self, config: ControllerConfig, context: zmq.Context | None = None) -> None:
        self.config = config
        self.controller_id = uuid.uuid4().hex[:12]
        self.started_at = time.time()
        self._started_mono = time.monotonic()
        self.epoch = int(self.started_at * 1000)
        self._next_epoch = self.epoch
        self.registry = WorkerRegistry(config.heartbeat_timeout_s)
        # the heartbeat interval asked of workers: longer while this loop cannot keep up
        self.pacing = HeartbeatPacing(config.heartbeat_interval_s, config.heartbeat_timeout_s)
        self.index = ChunkIndex(config.max_keys_per_worker)
        self.digests = DigestRecords()  # chunk digests as their writers recorded them
        self.signatures = SignatureBook()  # what the workers' clients use, and mismatches
        self.handoffs = Handoffs()  # leaving workers' chunks on their way to peers
        self.draining: set[str] = set()  # workers handing their chunks off before they leave
        self.tenant_digests: dict[str, DigestRecords] = {}  # the same, per tenant
        self.tenants = ClusterTenants(self.registry, config.tenant_quotas, config.tenant_ttls)
        self._any_tenant = False  # a tenant's worker registered (lookups are then filtered)
        self.index.on_capped = self._on_capped
        self.index.on_orphaned = self._on_orphaned
        self.orphans = misses.RecentKeys(ORPHANS_KEPT)  # key → (worker, gone, tenant)
        self.seen_namespaces: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self.events: deque[ClusterEvent] = deque(maxlen=200)
        self.lookup_us: deque[float] = deque(maxlen=20000)
        self.lookups = 0
        self.refused = 0
        # called with each answered lookup's duration in seconds (e.g. a Prometheus histogram)
        self.lookup_observers: list[Callable[[float], None]] = []
        # events by kind since start (the ``events`` deque keeps only the latest)
        self.event_counts: dict[str, int] = dict.fromkeys(
            ("join", "leave", "dead", "restart", "refused", "resync"), 0)
        # workers that left or died recently: id → (record, "left" | "dead", unix time)
        self.departed: dict[str, tuple[WorkerRecord, str, float]] = {}
        self._hit_history: deque[tuple[int, int, int]] = deque(maxlen=60)
        self._last_hit_totals: tuple[int, int, int] | None = None
        # chunks missed per second, by reason, over the same window
        self._miss_history: deque[dict[str, int]] = deque(maxlen=60)
        self._last_misses: dict[str, dict[str, int]] = {}  # worker → its counts last second
        self._last_sample = 0.0
        self._last_liveness_check = 0.0
        self._heartbeats_arrived = self._heartbeats_late = 0  # since the pacing last asked
        self.slowest_step_cpu_s = 0.0  # CPU time of the longest message or index slice
        # per kind of step (a message type, or "absorb"): [steps, steps over 10 ms of CPU]
        self.step_counts: dict[str, list[int]] = {}
        self._step_kind = "absorb"
        self._stop = threading.Event()
        # optional etcd election (controller/election.py); None = the only controller
        self.election: Any = None
        self._leadership_changed = threading.Event()
        # a keyed controller has its own context: a context has one ZAP handler
        self._context = context or (zmq.Context() if config.key else zmq.Context.instance())
        self.guard = None
        if config.key is not None:
            from lmshare.curve import CurveGuard

            self.guard = CurveGuard(self._context, config.key, "controller", config.tenants)
        # per socket: messages taken, lookups answered, messages refused there
        self.served = {name: {"messages": 0, "lookups": 0, "refused": 0} for name in (MAIN, LANE)}
        self._socket = self._context.socket(zmq.ROUTER)
        self._lookup_socket = self._context.socket(zmq.ROUTER)
        try:
            self.port = self._bind(self._socket, MAIN, config.port, "--port")
            self.lookup_port = self._bind(self._lookup_socket, LANE, config.lookup_port,
                                          "--lookup-port")
        except ConfigError:
            self._socket.close(linger=0)
            self._lookup_socket.close(linger=0)
            if self.guard is not None:
                self.guard.close()
            raise
        self._handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "register": self._on_register, "heartbeat": self._on_heartbeat,
            "batch": self._on_batch, "sync": self._on_sync, "deregister": self._on_deregister,
            "lookup": self._on_lookup, "explain": self._on_explain, "stats": self._on_stats,
            "ping": self._on_ping, "handoff": self._on_handoff,
        }
        self.event("restart", f"controller {self.controller_id} started (pid {os.getpid()})")

    def _bind(self, sock: zmq.Socket, name: str, port: int, option: str) -> int:
        """Secure (with a key), limit and bind one of the ROUTER sockets; its port."""
        if self.guard is not None:
            self.guard.secure_server(sock, self.config.key, name)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # A frame up to twice the limit is read and refused with a too_large reply; a larger
        # one disconnects its sender before it is buffered whole.
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.config.max_message_bytes)
        try:
            sock.bind(f"tcp://{self.config.host}:{port}")
        except zmq.ZMQError as exc:
            raise ConfigError(f"cannot listen on {self.config.host}:{port} ({exc.strerror}); "
                              f"choose another {option} or stop the process using it") from None
        return int(sock.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1])

    # ------------------------------------------------------------------ loop
    def serve_forever(self, signals: SignalLatch | None = None) -> None:
        """Serve until :meth:`stop` or a stop signal recorded by ``signals`` (whose reload
        signal reads the key file again)."""
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._lookup_socket, zmq.POLLIN)
        log.info("controller %s listening on %s:%d, lookups also on %d (shard %s)",
                 self.controller_id, self.config.host, self.port, self.lookup_port,
                 self.config.shard)
        gc_policy.rare_full_collections()  # (a full collection: 50-130 ms of one step)
        try:
            while not self._stop.is_set() and not (signals and signals.stop_requested):
                # queued index work is absorbed a slice at a time between messages
                drained = True
                waited = time.monotonic()
                ready = poller.poll(0 if self.index.pending else 50)
                self.pacing.idle(time.monotonic() - waited)
                if ready:
                    drained = False
                    for _ in range(1000):  # drain what is queued, then check timers
                        lookups = self.serve_lookups()  # the lookup lane first, every step
                        if not self._serve_one(self._socket, MAIN):
                            if lookups < LOOKUP_BURST:
                                drained = True
                                break
                            continue
                        if self.index.pending:
                            self.serve_lookups()
                            self._timed(self.index.absorb)
                elif self.index.pending:
                    self._timed(self.index.absorb)
                if self._leadership_changed.is_set():
                    self._start_term()
                if signals is not None and signals.take_reload():
                    self.reload_key()
                if drained:  # behind, a worker's heartbeat may wait in our own queue: we are
                    self._check_liveness()  # late, not it (a restart's storm, a busy host)
                self.pacing.tick(self._late_fraction)
                self.registry.heartbeat_timeout_s = self.pacing.timeout_s
                self._sample_hits()
        finally:
            gc_policy.restore()
            self._socket.close(linger=0)
            self._lookup_socket.close(linger=0)
            if self.guard is not None:
                self.guard.close()

    def serve_lookups(self, limit: int = LOOKUP_BURST) -> int:
        """Answer what waits on the lookup socket, up to ``limit`` messages (never blocks):
        the loop calls it before each step of other work. Returns how many it took."""
        for served in range(limit):
            if not self._serve_one(self._lookup_socket, LANE):
                return served
        return limit

    def _serve_one(self, sock: zmq.Socket, name: str) -> bool:
        """Take one message from ``sock`` (without waiting) and answer it; False when none
        was queued."""
        try:
            parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        self.served[name]["messages"] += 1
        # the tenant the ZAP check found for the sender's key ("" = cluster)
        tenant = self.guard.member(parts[-1].get("User-Id")) if self.guard is not None else ""
        if tenant is None:  # opened with a key retired since: no answer
            self.guard.refuse_retired()
            return True
        self._step_kind = "message"  # answer() names the type
        self._timed(self._handle, [p.bytes for p in parts], tenant, sock, name)
        self._step_kind = "absorb"
        return True

    def _timed(self, step: Callable[..., Any], *args: Any) -> None:
        started = time.thread_time()
        step(*args)
        spent = time.thread_time() - started
        self.slowest_step_cpu_s = max(self.slowest_step_cpu_s, spent)
        counts = self.step_counts.setdefault(self._step_kind, [0, 0])
        counts[0] += 1
        counts[1] += spent > 0.010

    def reload_key(self) -> bool:
        """Read the key file again (SIGHUP): admit the clients of its keys from now on. False
        (and an error logged) when the file is not a rotation of the key in use."""
        from lmshare.credentials import reload_on_sighup

        key = reload_on_sighup(self.config.key if self.guard is not None else None,
                               "controller")
        if key is None:
            return False
        self.config.key = key
        self.guard.set_key(key)
        return True

    def stop(self) -> None:
        self._stop.set()

    @property
    def role(self) -> str:
        return "standby" if self.election is not None and not self.election.is_leader else "leader"

    def on_leadership_change(self, leading: bool) -> None:
        """Called by the election thread; the service thread starts a new term."""
        self._leadership_changed.set()

    def _start_term(self) -> None:
        """A new leader (or a new standby) starts empty: workers re-register and full-sync, as
        after a controller restart, so no stale index survives a change of leader."""
        self._leadership_changed.clear()
        self.registry.workers.clear()
        self.index = ChunkIndex(self.config.max_keys_per_worker)
        self.index.on_capped = self._on_capped
        self.index.on_orphaned = self._on_orphaned
        self.orphans = misses.RecentKeys(ORPHANS_KEPT)
        self.seen_namespaces.clear()
        self.signatures = SignatureBook()
        self.handoffs.clear()
        self.draining.clear()
        self.departed.clear()
        self.epoch = max(self._next_epoch + 1, int(time.time() * 1000))
        self._next_epoch = self.epoch
        self.event("restart", f"controller {self.controller_id} is now {self.role}")

    def event(self, kind: str, detail: str) -> None:
        self.events.append(ClusterEvent(time.time(), kind, detail))
        self.event_counts[kind] = self.event_counts.get(kind, 0) + 1
        log.info("%s: %s", kind, detail)

    def _handle(self, frames: list[bytes], tenant: str = "", sock: zmq.Socket | None = None,
                name: str = MAIN) -> None:
        if len(frames) < 2:
            return
        envelope, reply = self.answer(frames, tenant, name)
        try:
            (sock or self._socket).send_multipart([*envelope, reply], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("reply dropped: %s", exc)

    def answer(self, frames: list[bytes], tenant: str = "",
               socket_name: str = MAIN) -> tuple[list[bytes], bytes]:
        """The reply to one received message (routing frames, then the message) from a sender
        of ``tenant`` ("" = the cluster key) on socket ``socket_name`` (the lookup socket
        refuses what it does not serve): the frames to send it back on and its encoded bytes.
        Never raises."""
        envelope, payload = frames[:-1], frames[-1]
        size = sum(len(f) for f in frames)
        if len(frames) > MAX_FRAMES or size > self.config.max_message_bytes:
            envelope = frames[:1]  # the routing id: echo nothing else of it
            reply = protocol.error(0, ErrorCode.TOO_LARGE,
                                   f"a message of {len(frames)} frames and {size} bytes exceeds "
                                   f"the limit of {self.config.max_message_bytes} bytes in one "
                                   "frame")
        else:
            reply = serving.answer(payload, CONTROLLER_TYPES,
                                   lambda message: self._dispatch(message, tenant, socket_name),
                                   self.config.max_message_bytes)
        if reply["type"] == "error" and reply["code"] not in _NOT_COUNTED:
            self.refused += 1
            self.served[socket_name]["refused"] += 1
            self.event("refused", reply["message"][:200])
        return envelope, protocol.encode_reply(reply)

    def _dispatch(self, message: dict[str, Any], tenant: str,
                  socket_name: str = MAIN) -> dict[str, Any]:
        message[TENANT_FIELD] = tenant  # after decoding: nobody names their own tenant
        if self._step_kind == "message":
            self._step_kind = message["type"]
        if socket_name == LANE and message["type"] not in LOOKUP_LANE_TYPES:
            raise LMShareError(f"port {self.lookup_port} is this controller's lookup port; it "
                               f"answers {' and '.join(sorted(LOOKUP_LANE_TYPES))} only: send "
                               f"{message['type']!r:.30} to its control port {self.port}",
                               code=ErrorCode.WRONG_PORT)
        if message["type"] == "lookup":
            self.served[socket_name]["lookups"] += 1
        if message["type"] in LEADER_ONLY and self.role == "standby":
            leader = self.election.leader or "being elected"
            raise LMShareError(f"this controller is a standby; the leader is {leader}; send "
                               "this to the leader", code=ErrorCode.NOT_LEADER)
        return self._handlers[message["type"]](message)

    # ------------------------------------------------------------------ helpers
    def _check_owned(self, keys: list[bytes], what: str) -> None:
        """Refuse (``wrong_shard``) a message carrying keys another shard owns, before any of
        it is applied."""
        if self.config.shard.count > 1:
            self.config.shard.check_owned(keys, what)

    def _worker(self, message: dict[str, Any]) -> WorkerRecord:
        record = self.registry.get(message["worker_id"], message["epoch"])
        if record is not None and record.tenant != message.get(TENANT_FIELD, ""):
            record = None  # another tenant's worker: as good as unknown
        if record is None:
            raise LMShareError(f"worker {message['worker_id']!r} (epoch {message['epoch']}) is "
                               "not registered here (controller restarted or worker declared "
                               "dead); register again", code=ErrorCode.UNKNOWN_WORKER)
        return record

    def _apply_entries(self, record: WorkerRecord, entries: dict[bytes, list[bytes]],
                       digests: dict[bytes, bytes] | None = None, queue: bool = False) -> None:
        """Index a worker's keys (checked by the protocol); past its cap they are dropped, and
        keys whose digest differs from the one their writer recorded are refused. ``queue``:
        the index applies them in the loop's next step (:meth:`ChunkIndex.add`)."""
        records = self._digests_of(record.tenant)  # each tenant's writers record their own
        conflicts = records.conflicts
        for namespace, keys in entries.items():
            self.index.add(record.worker_id, namespace, records.admit(keys, digests or {}),
                           queue)
            if keys:
                self._saw_namespace(record.tenant, namespace)
        if records.conflicts > conflicts:
            self.refused += records.conflicts - conflicts
            self.event("refused", f"{record.worker_id} announced "
                                  f"{records.conflicts - conflicts} chunks whose digest "
                                  "differs from their writer's record; not indexed")

    def _digests_of(self, tenant: str) -> DigestRecords:
        if not tenant:
            return self.digests
        records = self.tenant_digests.get(tenant)
        if records is None:
            records = self.tenant_digests[tenant] = DigestRecords()
        return records

    def _saw_namespace(self, tenant: str, namespace: bytes) -> None:
        seen = self.seen_namespaces
        seen[(tenant, namespace)] = None
        seen.move_to_end((tenant, namespace))
        if len(seen) > NAMESPACES_KEPT:
            seen.popitem(last=False)

    def _on_orphaned(self, keys: list[bytes], workers: list[str], gone: bool) -> None:
        """Keys whose last holder evicted them or went: what tells a later miss why."""
        values: dict[str, tuple[str, bool, str]] = {}
        for worker_id in set(workers):
            record = self.registry.workers.get(worker_id)
            if record is None and worker_id in self.departed:
                record = self.departed[worker_id][0]
            values[worker_id] = (worker_id, gone, record.tenant if record is not None else "")
        self.orphans.add_many(zip(keys, (values[w] for w in workers)))

    def _miss_code(self, key: bytes, tenant: str) -> int:
        """What the controller knows of a chunk past a lookup's held prefix (misses.HELD,
        NEW, GONE, EVICTED_CODE), counting only ``tenant``'s own workers when tenants run."""
        holders = self.index.holders_of(key)  # departed ones included until swept out
        if holders:
            live = [w for w in holders if w in self.registry.workers]
            if live and self._same_tenant([live], tenant):
                return misses.HELD
            # every holder left or died, and its keys are still being swept out of the index
            # (only then are they orphaned): the holder is gone
            for worker_id in holders:
                departed = self.departed.get(worker_id)
                if departed is not None and departed[0].tenant == tenant:
                    return misses.GONE
        orphan = self.orphans.get(key)
        if orphan is None or orphan[2] != tenant:
            return misses.NEW
        return misses.GONE if orphan[1] else misses.EVICTED_CODE

    def _on_capped(self, worker_id: str) -> None:
        self.event("refused", f"{worker_id} holds more than {self.config.max_keys_per_worker} "
                              "keys; the index keeps that many (raise --max-keys-per-worker)")

    def _drop_worker(self, worker_id: str, kind: str, detail: str) -> None:
        record = self.registry.remove(worker_id)
        if record is not None:  # first: its chunks' orphan records name its tenant
            self.departed[worker_id] = (record, "left" if kind == "leave" else "dead", time.time())
        chunks = self.index.drop_worker(worker_id)
        self.signatures.remove(worker_id)
        self.handoffs.forget(worker_id)
        self.draining.discard(worker_id)
        self.event(kind, f"{worker_id} {detail}; {chunks} chunks left the index")

    # ------------------------------------------------------------------ handlers
    def _on_register(self, m: dict[str, Any]) -> dict[str, Any]:
        worker_id = m["worker_id"]
        tenant = m.get(TENANT_FIELD, "")
        self._any_tenant = self._any_tenant or bool(tenant)
        existing = self.registry.workers.get(worker_id)
        if existing is not None and existing.tenant != tenant:
            raise LMShareError(f"worker name {worker_id!r} is taken by another tenant's worker; "
                               "choose another", code=ErrorCode.BAD_MESSAGE)
        instance = m.get("instance") or b""
        if existing is not None and instance and secrets.compare_digest(existing.instance,
                                                                        instance):
            # the same process again: the answer to its earlier attempt was late or lost (a
            # busy controller). The same epoch, so that a late copy of either attempt cannot
            # void the one the worker goes on with; it full-syncs next, as after any register
            existing.last_heartbeat = time.monotonic()
            return protocol.ok(m["id"], epoch=existing.epoch, controller_id=self.controller_id,
                               heartbeat_interval_s=self.pacing.interval_s,
                               heartbeat_timeout_s=self.pacing.timeout_s,
                               shard=str(self.config.shard), lookup_port=self.lookup_port)
        self._next_epoch += 1
        # a worker's epoch is its proof of registration in deregister, heartbeat, batch and
        # sync: random, so that nobody can guess it (sequential epochs were two guesses away)
        record = WorkerRecord(worker_id, secrets.randbits(62) or 1, m["host"], m["data_port"],
                              m["host_id"], [str(t) for t in m["transports"]],
                              m["capacity_bytes"], dict(m.get("extra") or {}), tenant=tenant,
                              instance=instance)
        previous = self.registry.add(record)
        if previous is not None:
            self.index.drop_worker(worker_id)
            self.signatures.remove(worker_id)
            self.handoffs.forget(worker_id)
            self.draining.discard(worker_id)
            self.event("join", f"{worker_id} re-registered at {record.address} (replaces epoch "
                               f"{previous.epoch})")
        else:
            self.event("join", f"{worker_id} joined at {record.address}")
        self.departed.pop(worker_id, None)
        return protocol.ok(m["id"], epoch=record.epoch, controller_id=self.controller_id,
                           heartbeat_interval_s=self.pacing.interval_s,
                           heartbeat_timeout_s=self.pacing.timeout_s,
                           shard=str(self.config.shard), lookup_port=self.lookup_port)

    def _on_heartbeat(self, m: dict[str, Any]) -> dict[str, Any]:
        record = self._worker(m)
        self._heartbeats_arrived += 1
        self._heartbeats_late += record.heartbeat_age() > self.pacing.timeout_s / 2
        record.record_heartbeat(WorkerCounters.from_dict(m["stats"]))
        record.namespaces = _namespace_report(m.get("namespaces"))
        if m.get("signatures") is not None:  # checked again: each must hash to its namespace
            parsed = {ns: from_wire(data, ns) for ns, data in m["signatures"].items()}
            self.signatures.update(record.worker_id, record.tenant,
                                   {ns: sig for ns, sig in parsed.items() if sig is not None})
        mismatches = {bytes.fromhex(x.namespace): x.text
                      for x in self.signatures.mismatches(record.worker_id)}
        record.tenant_figures = self.tenants.attribute(record, m.get("tenants"))
        resync = record.syncing or record.last_seq != m["seq"]
        orders = [] if record.worker_id in self.draining else \
            self.handoffs.orders_for(record.worker_id)
        return protocol.ok(m["id"], resync=resync, mismatches=mismatches,
                           heartbeat_interval_s=self.pacing.interval_s,
                           **self.tenants.reply_fields(record),
                           **({"replicate": orders} if orders else {}))

    def _on_batch(self, m: dict[str, Any]) -> dict[str, Any]:
        record = self._worker(m)
        self._check_owned([key for keys in m["admit"].values() for key in keys], "batch")
        self._check_owned(m["evict"], "batch")
        if record.syncing or m["seq"] != record.last_seq + 1:
            return protocol.ok(m["id"], resync=True)
        self._apply_entries(record, m["admit"], m.get("digests"))
        self.index.remove(record.worker_id, m["evict"])
        record.last_seq = m["seq"]
        record.last_heartbeat = time.monotonic()
        return protocol.ok(m["id"], resync=False)

    def _on_sync(self, m: dict[str, Any]) -> dict[str, Any]:
        record = self._worker(m)
        self._check_owned([key for keys in m["entries"].values() for key in keys], "sync part")
        if m["part"] == 0:
            self.index.drop_worker(record.worker_id)
            record.syncing = True
        elif not record.syncing:
            return protocol.ok(m["id"], resync=True)
        # a part's keys are indexed in the loop's next step (its decoding and digests fill
        # this one), the last part's at once: the earlier ones are indexed by then
        self._apply_entries(record, m["entries"], m.get("digests"), queue=not m["final"])
        if m["final"]:
            record.syncing = False
            record.last_seq = m["seq"]
            self.event("resync", f"{record.worker_id} synced "
                                 f"{self.index.worker_chunks(record.worker_id)} chunks")
        record.last_heartbeat = time.monotonic()
        return protocol.ok(m["id"], resync=False)

    def _on_deregister(self, m: dict[str, Any]) -> dict[str, Any]:
        record = self._worker(m)
        self._drop_worker(record.worker_id, "leave", "left gracefully")
        return protocol.ok(m["id"])

    def _on_handoff(self, m: dict[str, Any]) -> dict[str, Any]:
        """A leaving worker's chunks that only it holds go to peers with free space (``keys``,
        most recently used first, with their ``sizes``); without keys: how far that got."""
        record = self._worker(m)
        source = record.worker_id
        self.draining.add(source)
        keys = m.get("keys")
        if keys is not None:
            self._check_owned(keys, "handoff")
        if keys is None:
            unique, copied, failed, pending = self.handoffs.status(
                source, self._live_holders, self._can_take)
            return protocol.ok(m["id"], unique=unique, copied=copied, failed=failed,
                               pending=pending)
        sizes = m.get("sizes") or []
        if len(sizes) != len(keys):
            raise LMShareError(f"handoff names {len(keys)} keys but {len(sizes)} sizes; give "
                               "one size per key", code=ErrorCode.BAD_MESSAGE)
        targets = [Target(w.worker_id, w.counters.free_bytes, _slab_bytes(w))
                   for w in self.registry.workers.values() if self._can_take(w.worker_id)
                   and w.worker_id != source and w.tenant == record.tenant]
        job = self.handoffs.start(source, keys, sizes, targets, self._live_holders,
                                  lambda key: self.index.namespace_of(source, key))
        peers = len({target for target, _, _ in job.assigned.values()})
        self.event("handoff", f"{source} is leaving: {job.unique} chunks only it holds, "
                              f"{len(job.assigned)} handed to {peers} peer{'s' * (peers != 1)} "
                              "with free space")
        return protocol.ok(m["id"], unique=job.unique, assigned=len(job.assigned), peers=peers)

    def _live_holders(self, key: bytes) -> list[str]:
        """The registered workers holding ``key`` (the index may still list departed ones)."""
        return [w for w in self.index.holders_of(key) if w in self.registry.workers]

    def _can_take(self, worker_id: str) -> bool:
        """Whether ``worker_id`` is alive and staying (may be handed chunks)."""
        record = self.registry.workers.get(worker_id)
        return record is not None and worker_id not in self.draining and \
            self.registry.state(record) == "alive"

    def _on_lookup(self, m: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        keys = m["keys"]
        if len(keys) > self.config.max_lookup_keys:
            raise LMShareError(f"lookup of {len(keys)} keys exceeds "
                               f"{self.config.max_lookup_keys}; split it", code=ErrorCode.TOO_LARGE)
        self._check_owned(keys, "lookup")
        namespace = m["namespace"]
        tenant = m.get(TENANT_FIELD, "")
        seen = (tenant, namespace) in self.seen_namespaces  # it had chunks once
        if not self.index.knows_namespace(namespace) and not seen:
            raise _unknown_namespace()
        holders = self._same_tenant(self.index.longest_prefix(keys), tenant)
        if tenant and not holders and not seen:  # what other tenants hold is not even hinted at
            raise _unknown_namespace()
        # past the held prefix, one byte per chunk (the first MISS_CODES of them): held behind
        # the stop, new, gone, evicted
        codes = bytes(self._miss_code(key, tenant)
                      for key in keys[len(holders):len(holders) + MISS_CODES])
        involved = {w for chunk in holders for w in chunk}
        workers = {w: self.registry.workers[w].peer_info() for w in involved
                   if w in self.registry.workers}
        self.lookups += 1
        elapsed = time.perf_counter() - started
        self.lookup_us.append(elapsed * 1e6)
        for observe in self.lookup_observers:
            observe(elapsed)
        records = self._digests_of(m.get(TENANT_FIELD, ""))
        digests = [records.get(key) for key in keys[:len(holders)]]
        return protocol.ok(m["id"], matched=len(holders), holders=holders, workers=workers,
                           digests=digests, misses=codes)

    def _on_explain(self, m: dict[str, Any]) -> dict[str, Any]:
        """Everything the controller knows of each chunk of ``keys`` (``lmshare explain``):
        its holders (any chunk, not only the held prefix), or who let it go and how."""
        keys = m["keys"]
        if len(keys) > MAX_EXPLAIN_KEYS:
            raise LMShareError(f"explain of {len(keys)} keys exceeds {MAX_EXPLAIN_KEYS}; "
                               "explain a shorter prompt", code=ErrorCode.TOO_LARGE)
        self._check_owned(keys, "explain")
        tenant = m.get(TENANT_FIELD, "")
        filtering = self._any_tenant or bool(tenant)
        chunks: list[list[Any]] = []
        involved: set[str] = set()
        for key in keys:
            holders = self.index.holders(key)
            if filtering:
                holders = (self._same_tenant([holders], tenant) or [[]])[0]
            alive = [w for w in holders if w in self.registry.workers][:protocol.MAX_HOLDERS]
            orphan = self.orphans.get(key)
            if orphan is not None and orphan[2] != tenant:
                orphan = None
            how = "" if orphan is None else ("gone" if orphan[1] else "evicted")
            who = "" if orphan is None else orphan[0]
            if holders and not alive:  # its holders' keys are still leaving the index
                how, who = "gone", holders[0]
            holders = alive
            chunks.append([holders, how, who])
            involved.update(holders)
            if who:
                involved.add(who)
        workers = {w: self.registry.workers[w].peer_info() for w in involved
                   if w in self.registry.workers}
        departed = {w: self.departed[w][1] for w in involved if w in self.departed}
        namespace = m["namespace"]
        known = (tenant, namespace) in self.seen_namespaces or (
            not tenant and self.index.knows_namespace(namespace))
        return protocol.ok(m["id"], known=known, chunks=chunks, workers=workers,
                           departed=departed)

    def _same_tenant(self, holders: list[list[str]], tenant: str) -> list[list[str]]:
        """The holders of ``tenant``'s own workers, up to the first chunk none of them holds:
        a tenant's workers only ever learn of, and fetch from, each other."""
        if not self._any_tenant and not tenant:
            return holders  # no tenant ever registered: nothing to filter
        out = []
        for chunk in holders:
            own = [w for w in chunk if (r := self.registry.workers.get(w)) is not None
                   and r.tenant == tenant]
            if not own:
                break
            out.append(own)
        return out

    def _on_ping(self, m: dict[str, Any]) -> dict[str, Any]:
        return protocol.ok(m["id"], controller_id=self.controller_id, role=self.role,
                           leader=self.election.leader if self.election is not None else "",
                           shard=str(self.config.shard), lookup_port=self.lookup_port)

    def _on_stats(self, m: dict[str, Any]) -> dict[str, Any]:
        tenant = m.get(TENANT_FIELD, "")
        if tenant:  # a tenant sees its own workers, and nothing of the others'
            return protocol.ok(m["id"], stats=self.tenant_stats(tenant).to_dict())
        stats = self.cluster_stats(m.get("offset", 0), m.get("limit", STATS_PAGE))
        # the loop's steps by kind, [count, over 10 ms of CPU]: what a lookup can wait behind
        return protocol.ok(m["id"], stats=stats.to_dict(), steps=self.step_counts,
                           heartbeat_interval_s=self.pacing.interval_s,
                           shard=str(self.config.shard), lookup_port=self.lookup_port,
                           sockets=self.socket_counts())

    def socket_counts(self) -> dict[str, dict[str, Any]]:
        """Per socket: its port, messages taken, lookups answered, messages refused, and
        connections refused by the key check (by reason)."""
        refused = self.guard.by_socket() if self.guard is not None else {}
        ports = {MAIN: self.port, LANE: self.lookup_port}
        return {name: {"port": ports[name], **counts, "refused_connections": refused.get(name, {})}
                for name, counts in self.served.items()}

    def tenant_stats(self, tenant: str) -> ClusterStats:
        """What ``tenant`` may see: its live workers and its lookups' figures, no events."""
        now = time.monotonic()
        workers = [WorkerView(w.worker_id, w.address, w.host_id, list(w.transports),
                              self.registry.state(w, now), round(w.heartbeat_age(now), 3),
                              self.index.worker_chunks(w.worker_id), w.counters,
                              w.rate("bytes_served"), w.rate("bytes_fetched"), tenant=tenant,
                              draining=w.worker_id in self.draining)
                   for w in self.registry.workers.values() if w.tenant == tenant]
        return ClusterStats(controller_id=self.controller_id, controller_epoch=self.epoch,
                            uptime_s=round(now - self._started_mono, 3), workers=workers,
                            chunks_indexed=sum(w.chunks_indexed for w in workers),
                            multi_holder_chunks=0, namespaces=0, lookups=0, lookup_p50_us=0.0,
                            lookup_p99_us=0.0, role=self.role, secure=True,
                            workers_total=len(workers),
                            mismatches=[asdict(x) for x in self.signatures.all_mismatches(tenant)],
                            tenants=self.tenants.views(tenant))

    # ------------------------------------------------------------------ timers
    def _check_liveness(self) -> None:
        """Drop the workers whose heartbeats stopped: a scan of every worker, so at most every
        LIVENESS_CHECK_S (a step at 10,000 workers would otherwise pay it each time)."""
        now = time.monotonic()
        if now - self._last_liveness_check < LIVENESS_CHECK_S:
            return
        self._last_liveness_check = now
        for record in self.registry.expired(now):
            self._drop_worker(record.worker_id, "dead",
                              f"missed heartbeats for {record.heartbeat_age():.1f}s")

    def _late_fraction(self) -> float:
        """The fraction of the heartbeats answered since the last call that arrived late (more
        than half the timeout after the worker's previous one): a controller behind its queue
        sees many; a worker that died sends none, so it never counts (in a small cluster one
        dead worker must not slow everyone's heartbeats and its own detection)."""
        arrived, late = self._heartbeats_arrived, self._heartbeats_late
        self._heartbeats_arrived = self._heartbeats_late = 0
        return late / arrived if arrived else 0.0

    def _sample_hits(self) -> None:
        now = time.monotonic()
        if now - self._last_sample < 1.0:
            return
        self._last_sample = now
        totals = (0, 0, 0)
        for w in self.registry.workers.values():
            c = w.counters
            totals = (totals[0] + c.local_hit_chunks, totals[1] + c.peer_hit_chunks,
                      totals[2] + c.miss_chunks)
        if self._last_hit_totals is not None:
            delta = tuple(min(protocol.MAX_COUNTER, max(0, a - b))
                          for a, b in zip(totals, self._last_hit_totals))
            self._hit_history.append(delta)  # type: ignore[arg-type]
        self._last_hit_totals = totals
        # per worker, so that a worker leaving (or re-registering) hides nobody's misses; a
        # worker first seen counts from zero, as in the hit history
        second = dict.fromkeys(misses.MISS_REASONS, 0)
        for w in self.registry.workers.values():
            now_counts = w.counters.misses_by_reason()
            last = self._last_misses.get(w.worker_id, {})
            for reason, count in now_counts.items():
                second[reason] += min(protocol.MAX_COUNTER, max(0, count - last.get(reason, 0)))
            self._last_misses[w.worker_id] = now_counts
        for worker_id in [w for w in self._last_misses
                          if w not in self.registry.workers and w not in self.departed]:
            del self._last_misses[worker_id]
        self._miss_history.append(second)

    def _recent_misses(self) -> dict[str, int]:
        """Chunks missed over the hit-history window, by reason (only reasons seen)."""
        out: dict[str, int] = {}
        for second in self._miss_history:
            for reason, count in second.items():
                if count:
                    out[reason] = out.get(reason, 0) + count
        return out

    def _fill_peer_transports(self, views: list[WorkerView]) -> None:
        """Which transport each worker uses towards the others: counted per (host, transports)
        group against each distinct transports list, so the cost is linear in workers."""
        groups: dict[tuple[str, tuple[str, ...]], int] = {}
        for w in self.registry.workers.values():
            group = (w.host_id, tuple(w.transports))
            groups[group] = groups.get(group, 0) + 1
        everywhere: dict[tuple[str, ...], int] = {}
        by_host: dict[str, dict[tuple[str, ...], int]] = {}
        for (host_id, transports), n in groups.items():
            everywhere[transports] = everywhere.get(transports, 0) + n
            by_host.setdefault(host_id, {})[transports] = n
        summary: dict[tuple[str, tuple[str, ...]], dict[str, int]] = {}
        for host_id, transports in groups:
            counts: dict[str, int] = {}
            here = by_host[host_id]
            for peer_transports, n in everywhere.items():
                elsewhere = n - here.get(peer_transports, 0)
                if elsewhere:
                    other = PeerInfo("", "", 0, "\0elsewhere", peer_transports)
                    name = choose_transport(host_id, transports, other)
                    counts[name] = counts.get(name, 0) + elsewhere
            for peer_transports, n in here.items():
                n -= peer_transports == transports  # not itself
                if n:
                    name = choose_transport(host_id, transports,
                                            PeerInfo("", "", 0, host_id, peer_transports))
                    counts[name] = counts.get(name, 0) + n
            summary[(host_id, transports)] = counts
        for view in views:
            view.peer_transports = summary.get((view.host_id, tuple(view.transports)), {})

    def cluster_stats(self, offset: int = 0, limit: int | None = None) -> ClusterStats:
        """The cluster's numbers, with the workers ``[offset, offset + limit)`` (live ones
        first, then those that left or died recently); ``workers_total`` counts them all."""
        now = time.monotonic()
        horizon = time.time() - DEPARTED_SHOWN_S
        for worker_id, (_, _, when) in list(self.departed.items()):
            if when < horizon:
                del self.departed[worker_id]
        live = list(self.registry.workers.values())
        total = len(live) + len(self.departed)
        end = total if limit is None else min(total, offset + limit)
        workers = [
            WorkerView(w.worker_id, w.address, w.host_id, list(w.transports),
                       self.registry.state(w, now), round(w.heartbeat_age(now), 3),
                       self.index.worker_chunks(w.worker_id), w.counters,
                       w.rate("bytes_served"), w.rate("bytes_fetched"),
                       namespaces=list(w.namespaces), tenant=w.tenant,
                       draining=w.worker_id in self.draining)
            for w in live[offset:end]
        ]
        self._fill_peer_transports(workers)
        gone = list(self.departed.values())[max(0, offset - len(live)):max(0, end - len(live))]
        for w, state, when in gone:
            workers.append(WorkerView(w.worker_id, w.address, w.host_id, list(w.transports),
                                      state, round(time.time() - when, 3), 0, w.counters))
        samples = sorted(self.lookup_us)
        p50 = samples[len(samples) // 2] if samples else 0.0
        p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))] if samples else 0.0
        return ClusterStats(
            controller_id=self.controller_id, controller_epoch=self.epoch,
            uptime_s=round(now - self._started_mono, 3), workers=workers,
            chunks_indexed=len(self.index), multi_holder_chunks=self.index.multi_holder_chunks(),
            namespaces=self.index.namespaces, lookups=self.lookups,
            lookup_p50_us=round(p50, 1), lookup_p99_us=round(p99, 1),
            hit_history=list(self._hit_history), events=list(self.events),
            miss_reasons=self._recent_misses(),
            refused_messages=self.refused, role=self.role,
            refused_connections=self.guard.counts() if self.guard is not None else {},
            secure=self.guard is not None,
            leader=self.election.leader if self.election is not None else "",
            workers_total=total, workers_offset=offset, shard=str(self.config.shard),
            mismatches=[asdict(x) for x in self.signatures.all_mismatches()][:MAX_MISMATCHES],
            tenants=self.tenants.views())
