"""Graceful drain: before a worker leaves, the chunks only it holds go to peers.

Leaving (:meth:`Handoff.drain`): the worker sends the controller its chunk keys, most recently
used first, with their sizes (``handoff``); the controller keeps the chunks nobody else holds
and hands them to live peers with free space. The worker keeps serving them until every one is
held elsewhere, its peers cannot take more, or ``--drain-timeout`` passes; then it deregisters.

Taking over (:meth:`Handoff.receive`): a heartbeat reply's ``replicate`` orders name chunks to
fetch from a leaving peer. They come through the controller but are checked like any peer
input: bounded, typed, only as many as fit in this pool's free slabs (nothing is evicted for
them), fetched through the ordinary path (the controller's lookup names the holders and the
writers' digests, the holder must pass the data-plane handshake, sizes are checked before
anything is reserved). A worker that is leaving itself takes nothing.

With the controller's keys in shards, each shard is handed the keys it owns and hands them to
peers itself (only it knows who else holds them): a drain asks and polls every shard, and the
orders of each shard's heartbeat replies name that shard's keys only.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from lmshare.errors import LMShareError
from lmshare.keys import KEY_BYTES
from lmshare.protocol import MAX_KEYS, MAX_NAME
from lmshare.shards import split_by_shard

if TYPE_CHECKING:
    from lmshare.worker.agent import WorkerAgent

log = logging.getLogger(__name__)

POLL_S = 0.1  # how often a leaving worker asks how far its hand-off got
STALL_S = 2.0  # at least this long without a new copy ends the wait (before the timeout)
FETCH_BATCH = 64  # chunks of one order fetched per controller lookup
MAX_GROUPS = 256  # order groups in one heartbeat reply
MAX_QUEUED = 64  # heartbeat replies' orders waiting to be fetched
MAX_CHUNK_BYTES = 1 << 40


@dataclass
class DrainReport:
    """What a drain did (the ``drain`` request's answer and the worker's last log lines)."""

    chunks: int = 0  # chunks in the pool when the drain began
    unique: int = 0  # of those, held by no other worker
    assigned: int = 0  # handed to peers with free space
    copied: int = 0  # held by another worker when the drain ended
    peers: int = 0
    seconds: float = 0.0
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_orders(orders: Any) -> list[tuple[str, bytes, list[bytes], int]]:
    """A heartbeat reply's ``replicate`` (``[[source, namespace, [keys], size], ...]``) as
    checked orders; anything malformed is left out, and at most ``MAX_KEYS`` keys in all."""
    out: list[tuple[str, bytes, list[bytes], int]] = []
    if not isinstance(orders, list):
        return out
    budget = MAX_KEYS
    for order in orders[:MAX_GROUPS]:
        if not (isinstance(order, list) and len(order) == 4):
            continue
        source, namespace, keys, size = order
        if not (isinstance(source, str) and 0 < len(source) <= MAX_NAME
                and isinstance(namespace, bytes) and len(namespace) == KEY_BYTES
                and isinstance(keys, list) and type(size) is int and 0 < size <= MAX_CHUNK_BYTES):
            continue
        keys = [k for k in keys[:budget] if isinstance(k, bytes) and len(k) == KEY_BYTES]
        budget -= len(keys)
        if keys:
            out.append((source, namespace, keys, size))
        if budget <= 0:
            break
    return out


class Handoff:
    """Both sides of a drain for one worker."""

    def __init__(self, agent: WorkerAgent) -> None:
        self._agent = agent
        self.leaving = threading.Event()  # set once this worker drains: it takes nothing more
        self.done = threading.Event()  # set when its drain ended (copies done or given up)
        self.report = DrainReport()
        self._orders: queue.Queue = queue.Queue(MAX_QUEUED)
        self._thread: threading.Thread | None = None
        self.taken_over = 0  # chunks fetched on peers' hand-off orders

    # ------------------------------------------------------------------ leaving
    def drain(self, timeout_s: float) -> DrainReport:
        """Hand the chunks only this worker holds to peers, waiting at most ``timeout_s``."""
        agent = self._agent
        started = time.monotonic()
        deadline = started + timeout_s
        self.leaving.set()
        report = self.report
        try:
            if timeout_s <= 0:
                report.note = "drain timeout 0: no hand-off"
                return report
            shards = [shard for shard, link in enumerate(agent.links)
                      if link.registered.is_set()]
            if not shards:
                report.note = "not registered with a controller: nothing can be handed off"
                return report
            entries = agent.pool.entries_by_recency()[:MAX_KEYS]
            report.chunks = len(entries)
            if not entries:
                return report
            positions = split_by_shard([key for key, _ in entries], len(agent.links))
            calls = {}  # shard → its hand-off call, for the shards holding some of the keys
            pending_of: dict[int, int] = {}
            for shard in shards:
                if not positions[shard]:
                    continue
                calls[shard] = call = self._call(deadline, shard)
                mine = [entries[i] for i in positions[shard]]
                reply = call(keys=[key for key, _ in mine], sizes=[size for _, size in mine])
                report.unique += int(reply["unique"])
                report.assigned += int(reply["assigned"])
                report.peers = max(report.peers, int(reply["peers"]))
                pending_of[shard] = int(reply["assigned"])
            pending = sum(pending_of.values())
            # peers get their orders with their next heartbeat; one that takes fewer (its
            # pool filled meanwhile) says nothing: progress that stops ends the wait early
            stall_s = max(STALL_S, 3 * agent.link.heartbeat_interval_s)
            progress = time.monotonic()
            copied_of: dict[int, int] = {}
            while pending and time.monotonic() < deadline:
                time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
                for shard, call in calls.items():
                    if pending_of[shard]:
                        status = call()
                        copied_of[shard] = int(status["copied"])
                        pending_of[shard] = int(status["pending"])
                copied, pending = sum(copied_of.values()), sum(pending_of.values())
                if copied > report.copied:
                    report.copied, progress = copied, time.monotonic()
                elif time.monotonic() - progress > stall_s:
                    break
            if pending:
                report.note = f"{pending} chunks not taken by the peers (" + (
                    "drain timeout" if time.monotonic() >= deadline else
                    f"no progress for {stall_s:.1f} s") + ")"
        except (LMShareError, KeyError, TypeError, ValueError) as exc:
            report.note = f"hand-off stopped: {exc}"
            log.warning("drain of %s: %s", agent.worker_id, report.note)
        finally:
            report.seconds = round(time.monotonic() - started, 3)
            agent._count(handed_off_chunks=report.copied)
            log.info("drained %s: %d chunks, %d held only here, %d handed to %d peers, %d copied "
                     "in %.2f s%s", agent.worker_id, report.chunks, report.unique,
                     report.assigned, report.peers, report.copied, report.seconds,
                     f" ({report.note})" if report.note else "")
            self.done.set()
        return report

    def _call(self, deadline: float, shard: int = 0) -> Callable[..., dict[str, Any]]:
        """``handoff`` requests to controller shard ``shard`` (the only one, without shards)."""
        agent = self._agent
        client = agent.controllers(lookups=False)[shard]
        link = agent.links[shard]

        def call(**fields: Any) -> dict[str, Any]:
            left = max(0.05, min(agent.config.rpc_timeout_s, deadline - time.monotonic()))
            return client.call("handoff", timeout_s=left, worker_id=agent.worker_id,
                               epoch=link.epoch, **fields)
        return call

    # ------------------------------------------------------------------ taking over
    def receive(self, orders: Any) -> None:
        """Queue a heartbeat reply's ``replicate`` orders (called on the control thread)."""
        parsed = parse_orders(orders)
        if not parsed or self.leaving.is_set():
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._take_over, name="lmshare-handoff",
                                            daemon=True)
            self._thread.start()
        try:
            self._orders.put_nowait(parsed)
        except queue.Full:
            log.warning("hand-off orders arrive faster than they are fetched; %d dropped",
                        sum(len(keys) for _, _, keys, _ in parsed))

    def _take_over(self) -> None:
        while not self._agent._stopped.is_set():
            try:
                orders = self._orders.get(timeout=0.5)
            except queue.Empty:
                continue
            for source, namespace, keys, size in orders:
                if self.leaving.is_set():
                    return
                try:
                    self.taken_over += self._fetch(source, namespace, keys, size)
                except LMShareError as exc:
                    log.warning("hand-off from %s failed: %s", source, exc)

    def _fetch(self, source: str, namespace: bytes, keys: list[bytes], size: int) -> int:
        """Fetch what fits of ``keys`` (chunks of ``size`` bytes a leaving ``source`` holds);
        returns how many are now held here."""
        agent = self._agent
        pool = agent.pool
        wanted = [k for k in keys if not pool.contains(k)]
        fit = pool.stats().slabs_free // pool.slabs_for(size)
        if len(wanted) > fit:
            log.info("taking %d of %d chunks from leaving %s: the pool has room for no more "
                     "without evicting", fit, len(wanted), source)
            wanted = wanted[:fit]
        taken = 0
        for start in range(0, len(wanted), FETCH_BATCH):
            batch = wanted[start:start + FETCH_BATCH]
            plan = agent.plan(namespace, batch, peers=True)
            if plan.remote:
                agent.fetcher.fetch(namespace, [batch[i] for i, _ in plan.remote],
                                    [holders for _, holders in plan.remote], plan.infos,
                                    chunk_bytes=size,
                                    digests=plan.digests if agent.config.digests else None)
            got = sum(1 for k in batch if pool.contains(k))
            taken += got
            if got < len(batch) and pool.stats().slabs_free < pool.slabs_for(size):
                break  # full (stores of its own arrived meanwhile)
        agent._count(taken_over_chunks=taken)
        return taken
