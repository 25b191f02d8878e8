"""Work off the forward loop: a store job is chunks copied out of vLLM's blocks, put to the
worker by one background thread (or inline); a failed or dropped store is only a future miss.
Hits are released by another thread, so that a step never waits for a worker's reply."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmshare.client import Hit
from lmshare.errors import RemoteError, WorkerUnavailable
from lmshare.integrations.kv_copy import PendingSave
from lmshare.integrations.vllm.link import WorkerLink

log = logging.getLogger(__name__)


@dataclass
class SaveJob:
    """Chunks of one request (one TP rank's keys) being copied out, to be stored."""

    namespace: bytes
    keys: Sequence[bytes]
    pending: list[PendingSave]
    req_id: str


def store(link: WorkerLink, job: SaveJob) -> int:
    """Put the job's chunks; failures are logged (a failed store is only a future miss)."""
    try:  # each chunk copies itself into its reserved slabs (on GPU: DMA from the device)
        return link.call(lambda c: c.put_keys(job.namespace, job.keys, job.pending))
    except RemoteError as exc:
        log.info("lmshare: worker refused to store %d chunks of %s: %s", len(job.keys),
                 job.req_id, exc)
    except WorkerUnavailable as exc:
        log.debug("lmshare: store of %s skipped: %s", job.req_id, exc)
    except Exception:
        log.exception("lmshare: storing chunks of %s failed", job.req_id)
    finally:
        for p in job.pending:
            p.release()
    return 0


class Saver:
    """One background thread that stores copied-out chunks in order."""

    _STOP = object()

    def __init__(self, link: WorkerLink, max_pending: int) -> None:
        self._link = link
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, max_pending))
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="lmshare-saver", daemon=True)
        self._thread.start()

    def submit(self, job: SaveJob) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.dropped += 1
            for p in job.pending:
                p.release()
            if self.dropped == 1 or self.dropped % 100 == 0:
                log.warning("lmshare: store queue full; dropped %d stores so far (the worker "
                            "is slow or down)", self.dropped)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is self._STOP:
                    return
                store(self._link, job)
            finally:
                self._queue.task_done()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued store is done; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def close(self, timeout_s: float = 10.0) -> None:
        try:
            self._queue.put(self._STOP, timeout=timeout_s)
        except queue.Full:
            log.warning("lmshare: store queue did not drain; dropping pending stores")
            return
        self._thread.join(timeout_s)


class Releaser:
    """One background thread that releases loaded hits (their leases end on the worker)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[list[Hit] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="lmshare-release", daemon=True)
        self._thread.start()

    def submit(self, hits: list[Hit]) -> None:
        self._queue.put(hits)

    def _run(self) -> None:
        while (hits := self._queue.get()) is not None:
            for hit in hits:
                try:
                    hit.release()
                except Exception:  # a lease not released expires on its own
                    log.debug("lmshare: releasing a hit failed", exc_info=True)

    def close(self, timeout_s: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout_s)
