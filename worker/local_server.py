"""The worker's endpoint for local clients (the vLLM connector, ``lmshare.Client``).

A ROUTER socket on an IPC path; requests are handled on a small thread pool (a peer fetch must
not block other clients) and replies return to the socket's thread through an inproc queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq

from lmshare import protocol, serving
from lmshare.errors import ConfigError, ErrorCode

log = logging.getLogger(__name__)

LOCAL_TYPES = {"hello", "local_lookup", "reserve", "commit", "abort", "acquire", "release",
               "worker_stats", "ping", "drain"}

Handler = serving.Handler
CLIENT_FIELD = "_client"
STOP_JOIN_S = 2.0  # stopping: how long the socket thread may take to notice
RECEIVED_FIELD = "_received"  # time.monotonic() when the request arrived


class LocalServer:
    """Requests are decoded on the socket's thread and run on one of two lanes: requests that
    may wait on peers or the controller (``may_wait`` says which) on ``threads`` threads,
    everything else (local lookups and acquires of local chunks, releases, puts) on their own
    threads, so they never queue behind a peer fetch. Each lane holds at most ``max_queue``
    requests (more are answered ``busy`` at once) and a request that waited longer than
    ``queue_deadline_s`` is answered ``busy`` instead of being run for a client that gave up."""

    def __init__(self, endpoint: str, handlers: dict[str, Handler], threads: int,
                 context: zmq.Context | None = None,
                 may_wait: Callable[[dict[str, Any]], bool] | None = None,
                 max_queue: int = 1024, queue_deadline_s: float = 5.0,
                 fast_threads: int = 2) -> None:
        self.endpoint = endpoint
        self._handlers = handlers
        self._may_wait = may_wait or (lambda m: False)
        self.max_queue = max_queue
        self.queue_deadline_s = queue_deadline_s
        self._context = context or zmq.Context.instance()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        try:
            self._socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self._socket.close()
            raise ConfigError(f"cannot open the local endpoint {endpoint} ({exc.strerror}); "
                              "is another worker with this name running?") from None
        self._inbox_name = f"inproc://lmshare-replies-{id(self)}"
        self._replies = self._context.socket(zmq.PULL)
        self._replies.setsockopt(zmq.RCVHWM, 0)
        self._replies.bind(self._inbox_name)
        self._local = threading.local()
        self._lanes = {"slow": ThreadPoolExecutor(threads, thread_name_prefix="lmshare-local"),
                       "fast": ThreadPoolExecutor(fast_threads,
                                                  thread_name_prefix="lmshare-local-fast")}
        self._queued = {"slow": 0, "fast": 0}
        self._queued_lock = threading.Lock()
        self.busy_replies = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lmshare-local", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=STOP_JOIN_S)
        for lane in self._lanes.values():
            lane.shutdown(wait=True, cancel_futures=True)

    def _reply_socket(self) -> zmq.Socket:
        sock = getattr(self._local, "socket", None)
        if sock is None:
            sock = self._context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)  # replies are bounded by the lanes' queues
            sock.connect(self._inbox_name)
            self._local.socket = sock
        return sock

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._replies, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(100))
                if self._socket in ready:
                    for _ in range(1000):  # then forward replies, so neither side starves
                        try:
                            frames = self._socket.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._dispatch(frames)
                if self._replies in ready:
                    while True:
                        try:
                            frames = self._replies.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._send(frames)
        finally:
            self._socket.close(linger=0)
            self._replies.close(linger=0)

    def _send(self, frames: list[bytes]) -> None:
        try:
            self._socket.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # a client that went away or stopped reading
            log.debug("local reply dropped: %s", exc)

    def _dispatch(self, frames: list[bytes]) -> None:
        """Decode on the socket's thread; answer refusals at once, queue the rest."""
        if len(frames) < 2:
            return
        envelope, payload = frames[:-1], frames[-1]
        message, refusal = serving.decode(payload, LOCAL_TYPES)
        if message is None:
            self._send([*envelope, protocol.encode_reply(refusal)])
            return
        # who sent it (the connection's routing id), for leases bound to their client; set
        # here, after decoding, so no client can name another
        message[CLIENT_FIELD] = bytes(envelope[0]) if envelope else b"?"
        message[RECEIVED_FIELD] = time.monotonic()
        try:
            lane = "slow" if self._may_wait(message) else "fast"
        except Exception as exc:  # a classifier bug must not stop the loop
            self._send([*envelope, protocol.encode_reply(serving.error_reply(exc, message["id"]))])
            return
        with self._queued_lock:
            full = self._queued[lane] >= self.max_queue
            if not full:
                self._queued[lane] += 1
        if full:
            self.busy_replies += 1
            self._send([*envelope, protocol.encode_reply(protocol.error(
                message["id"], ErrorCode.BUSY, f"the worker has {self.max_queue} requests "
                "queued; retry shortly"))])
            return
        self._lanes[lane].submit(self._handle, lane, envelope, message, time.monotonic())

    def _handle(self, lane: str, envelope: list[bytes], message: dict[str, Any],
                queued_at: float) -> None:
        with self._queued_lock:
            self._queued[lane] -= 1
        waited = time.monotonic() - queued_at
        if waited > self.queue_deadline_s:
            self.busy_replies += 1
            reply = protocol.error(message["id"], ErrorCode.BUSY,
                                   f"the request waited {waited:.1f}s in the worker's queue (more "
                                   f"than {self.queue_deadline_s:.1f}s); retry")
        else:
            reply = serving.run(self._handlers[message["type"]], message)
        try:
            # never blocks: once the socket's thread has stopped (shutdown), nobody reads the
            # inbox, and a blocking send would keep this thread, and the shutdown, forever
            self._reply_socket().send_multipart([*envelope, protocol.encode_reply(reply)],
                                                zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.debug("local reply dropped: %s", exc)

