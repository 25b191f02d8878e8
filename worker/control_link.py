"""The worker's link to the controller: register, heartbeat, admit/evict batches, full sync.

Runs in its own thread with its own socket. Pool events are queued by a pool listener and sent
as sequenced batches; a gap the controller notices (or a controller restart) triggers a full
sync. While the controller is away the worker keeps serving local hits and keeps retrying,
after waits of jittered exponential backoff (``lmshare.backoff``): a fleet that lost its
controller together must not come back to it in step.

With the controller's key space in shards (:mod:`lmshare.shards`), a worker runs one link per
shard: each registers and heartbeats, and sends its shard only the admits, evictions and
full-sync keys that shard owns.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

from lmshare.backoff import Backoff
from lmshare.control import FailoverControllerClient, LookupPorts
from lmshare.errors import ConfigError, ControllerUnavailable, LMShareError, RemoteError
from lmshare.pool import KVPool
from lmshare.protocol import ErrorCode
from lmshare.shards import Shard

log = logging.getLogger(__name__)

SYNC_PART_KEYS = 512  # a part the controller decodes, records the digests of and indexes in
# ~3 ms of one step of its loop (1,024 took 5-9 ms at 10M chunks on a loaded machine, 4,096
# 15-21 ms)
BATCH_INTERVAL_S = 0.02
STOP_JOIN_S = 5.0  # stopping: how long the loop thread may take to finish its message
DEREGISTER_TIMEOUT_S = 1.0  # stopping: the deregister call, per controller tried
REGISTER_TIMEOUT_S = 5.0  # a registration attempt's deadline, per controller tried: a busy
# controller answers it late, and a retry (idempotent: the instance token) only queues behind it
RETRY_BASE_S = 0.5  # the first wait before registering again is uniform in [0, 0.5 s] ...
RETRY_CAP_S = 8.0  # ... each later one's window doubles, up to 8 s (full jitter)
MIN_INTERVAL_S, MAX_INTERVAL_S = 0.05, 120.0  # heartbeat intervals a controller may ask for
UNHEARD_GRACE_INTERVALS = 5  # lookups still ask a controller unheard for up to this many
# heartbeat intervals (its default liveness timeout: by then it has dropped this worker anyway)


def retry_backoff() -> Backoff:
    """The waits of a worker that lost its controller, before it registers and re-syncs again
    (no deadline: a worker serves local hits and keeps trying for as long as it runs)."""
    return Backoff(base_s=RETRY_BASE_S, cap_s=RETRY_CAP_S)


class ControlLink:
    def __init__(self, client: FailoverControllerClient, pool: KVPool, registration: dict[str, Any],
                 counters: Callable[[], dict[str, int]],
                 heartbeat_fields: Callable[[], dict[str, Any]] | None = None,
                 digest_of: Callable[[bytes], bytes | None] | None = None,
                 on_heartbeat_reply: Callable[[dict[str, Any]], None] | None = None,
                 shard: Shard | None = None, lookup_ports: LookupPorts | None = None) -> None:
        self._client = client
        # where the controllers' lookup ports are learned (from each register reply)
        self.lookup_ports = lookup_ports
        self.shard = shard or Shard()  # the keys this link's controller indexes
        self._on_heartbeat_reply = on_heartbeat_reply  # sees each heartbeat's reply
        self._digest_of = digest_of  # the writer's digest of a chunk, sent with its admit
        self._heartbeat_fields = heartbeat_fields  # more fields of each heartbeat
        self._pool = pool
        # the instance token makes a retried registration (its first answer lost) idempotent
        self._registration = {**registration, "instance": secrets.token_bytes(16)}
        self._counters = counters
        self.worker_id: str = registration["worker_id"]
        self.epoch = 0
        self.heartbeat_interval_s = 1.0
        self.registered = threading.Event()  # set while the controller answers
        self._known = False  # registered, and not told since that the controller forgot it
        self._heard_at = -math.inf  # monotonic time of the controller's last answer
        self.last_register_s = 0.0
        self.controller_id = ""
        self._seq = 0
        self._pending: list[tuple[str, bytes, bytes]] = []
        self._pending_lock = threading.Lock()
        self._need_sync = True
        self._stop = threading.Event()
        self.backoff = retry_backoff()
        self._thread = threading.Thread(target=self._run, name="lmshare-control", daemon=True)
        pool.add_listener(self._on_pool_event if self.shard.count == 1 else self._on_owned_event)

    def _on_pool_event(self, event: str, namespace: bytes, key: bytes) -> None:
        with self._pending_lock:
            self._pending.append((event, namespace, key))

    def _on_owned_event(self, event: str, namespace: bytes, key: bytes) -> None:
        if self.shard.owns(key):  # another shard's link sends the rest
            self._on_pool_event(event, namespace, key)

    # ------------------------------------------------------------------ lifecycle
    def register(self, timeout_s: float) -> float:
        """Register now; returns how long it took. Raises ControllerUnavailable, or ConfigError
        when the controller is not of the shard this link was configured for."""
        started = time.perf_counter()
        reply = self._client.call("register", timeout_s=timeout_s, **self._registration)
        elapsed = time.perf_counter() - started
        self._check_shard(reply)
        if self.lookup_ports is not None:
            self.lookup_ports.learn(self._client.address, reply)
        self.epoch = reply["epoch"]
        self.controller_id = reply["controller_id"]
        self.heartbeat_interval_s = float(reply["heartbeat_interval_s"])
        self.last_register_s = elapsed
        self._need_sync = True
        self._known = True
        self.heard()
        self.registered.set()
        log.info("registered with controller %s as %s (epoch %d) in %.2f ms", self.controller_id,
                 self.worker_id, self.epoch, elapsed * 1000)
        return elapsed

    def _check_shard(self, reply: dict[str, Any]) -> None:
        """A register reply must come from the shard this link was configured as (a controller
        that does not say is an unsharded one, 0/1)."""
        shard = reply.get("shard", "0/1")
        if shard != str(self.shard):
            answered = shard if isinstance(shard, str) else "unreadable"
            raise ConfigError(
                f"the controller at {self._client.endpoint} is shard {answered[:20]}, but this "
                f"worker's --controller lists it as shard {self.shard}: list every shard, in "
                "order from shard 0, separated by ';' (the controllers of one shard by ',')")

    def heard(self) -> None:
        """The controller answered a call (this link's, or a lookup of the agent's)."""
        self._heard_at = time.monotonic()

    def may_answer(self) -> bool:
        """Whether a lookup should still ask the controller: registered, or known to it and
        heard within the last few heartbeat intervals. A heartbeat that timed out on a busy
        controller clears ``registered`` until the retry; the controller still knows this
        worker meanwhile, and a lookup has its own deadline. One unheard for longer is treated
        as gone (lookups then answer from local chunks at once)."""
        if self.registered.is_set():
            return True
        return self._known and time.monotonic() - self._heard_at \
            < UNHEARD_GRACE_INTERVALS * self.heartbeat_interval_s

    def set_key(self, key) -> None:
        """Talk to the controller with ``key`` from the next message on (a reloaded file)."""
        self._client.set_key(key)

    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        """Stop the loop without waiting (:meth:`stop` waits): several links stop together."""
        self._stop.set()

    def stop(self, deregister: bool = True) -> None:
        self._stop.set()
        self._thread.join(timeout=STOP_JOIN_S)
        if deregister and self.registered.is_set():
            try:
                self._client.call("deregister", timeout_s=DEREGISTER_TIMEOUT_S,
                                  worker_id=self.worker_id,
                                  epoch=self.epoch)
                log.info("deregistered from the controller")
            except LMShareError as exc:
                log.warning("could not deregister (%s); the controller will time this worker out",
                            exc)
        self._client.close()

    # ------------------------------------------------------------------ loop
    def _run(self) -> None:
        next_heartbeat = 0.0
        while not self._stop.is_set():
            try:
                if not self.registered.is_set():
                    if self._known:
                        # the controller did not answer; it may still know this worker (it was
                        # only busy): a heartbeat tells, and costs it far less than a
                        # registration and a full sync (a restarted one says unknown_worker)
                        self._heartbeat()
                        next_heartbeat = time.monotonic() + self.heartbeat_interval_s
                        self.registered.set()
                        log.info("controller %s answers again; still registered",
                                 self.controller_id)
                    else:
                        self.register(timeout_s=REGISTER_TIMEOUT_S)
                        next_heartbeat = 0.0
                if self._need_sync:
                    self._full_sync()
                self._flush()
                if time.monotonic() >= next_heartbeat:
                    self._heartbeat()
                    next_heartbeat = time.monotonic() + self.heartbeat_interval_s
                    self.backoff.reset()  # registered, synced and heard: the link is up
            except ControllerUnavailable as exc:
                if self.registered.is_set():
                    log.warning("controller unreachable (%s); serving local hits, retrying", exc)
                self.registered.clear()
                self._stop.wait(self._retry_wait())
                continue
            except ConfigError as exc:  # a controller of another shard answered
                log.error("%s", exc)
                self.registered.clear()
                self._known = False
                self._stop.wait(self.backoff.next_wait())
                continue
            except RemoteError as exc:
                if exc.code == ErrorCode.UNKNOWN_WORKER:
                    log.warning("controller does not know this worker (%s); registering again",
                                exc.message)
                    self.registered.clear()
                    self._known = False
                    # every worker hears this from a restarted controller within a heartbeat
                    self._stop.wait(self.backoff.next_wait())
                    continue
                log.error("controller refused a message: %s", exc)
            except Exception:
                log.exception("control link error")
            self._stop.wait(BATCH_INTERVAL_S)

    def _retry_wait(self) -> float:
        """The backoff's wait; at most a heartbeat interval while the controller may still know
        this worker: a longer silence would outlast its liveness timeout (and a heartbeat an
        interval costs it no more than an answered worker's)."""
        wait = self.backoff.next_wait() or 0.0
        return min(wait, self.heartbeat_interval_s) if self._known else wait

    def _call(self, type_: str, **fields: Any) -> dict[str, Any]:
        reply = self._client.call(type_, worker_id=self.worker_id, epoch=self.epoch, **fields)
        self.heard()
        return reply

    def _heartbeat(self) -> None:
        extra = self._heartbeat_fields() if self._heartbeat_fields is not None else {}
        reply = self._call("heartbeat", seq=self._seq, stats=self._counters(), **extra)
        paced = reply.get("heartbeat_interval_s")  # a busy controller asks for fewer
        if isinstance(paced, (int, float)) and not isinstance(paced, bool) \
                and MIN_INTERVAL_S <= paced <= MAX_INTERVAL_S:
            self.heartbeat_interval_s = float(paced)
        if self._on_heartbeat_reply is not None:
            self._on_heartbeat_reply(reply)
        if reply.get("resync"):
            self._need_sync = True

    def _flush(self) -> None:
        with self._pending_lock:
            events, self._pending = self._pending, []
        if not events:
            return
        admit: dict[bytes, list[bytes]] = {}
        evict: list[bytes] = []
        for event, namespace, key in events:
            if event == "admit":
                admit.setdefault(namespace, []).append(key)
            else:
                evict.append(key)
        self._seq += 1
        try:
            reply = self._call("batch", seq=self._seq, admit=admit, evict=evict,
                               **self._digests(admit))
        except ControllerUnavailable:
            # lost, or only late (a busy controller): the next heartbeat carries this seq,
            # and the controller asks for a full sync only if it did not apply this batch
            raise
        except LMShareError:
            self._need_sync = True  # refused: the next sync covers it
            raise
        if reply.get("resync"):
            self._need_sync = True

    def _digests(self, entries: dict[bytes, list[bytes]]) -> dict[str, Any]:
        """The ``digests`` field for admitted ``entries`` (none when digests are off)."""
        if self._digest_of is None:
            return {}
        digests = {}
        for keys in entries.values():
            for key in keys:
                digest = self._digest_of(key)
                if digest is not None:
                    digests[key] = digest
        return {"digests": digests} if digests else {}

    def _full_sync(self) -> None:
        # Clear queued events and snapshot under the same lock: events after the snapshot are
        # sent as later batches (applying an admit or evict twice is harmless).
        with self._pending_lock:
            self._pending = []
            snapshot = self._pool.entries_by_namespace()
            self._seq += 1
            seq = self._seq
        if self.shard.count > 1:  # (a copy: filtered without holding up the pool's events)
            snapshot = {ns: [k for k in keys if self.shard.owns(k)]
                        for ns, keys in snapshot.items()}
        parts: list[dict[bytes, list[bytes]]] = [{}]
        count = 0
        for namespace, keys in snapshot.items():
            for key in keys:
                if count and count % SYNC_PART_KEYS == 0:
                    parts.append({})
                parts[-1].setdefault(namespace, []).append(key)
                count += 1
        for index, entries in enumerate(parts):
            self._call("sync", seq=seq, part=index, final=index == len(parts) - 1,
                       entries=entries, timeout_s=5.0, **self._digests(entries))
        self._need_sync = False
        log.info("full sync of %d chunks sent (seq %d)", count, seq)
