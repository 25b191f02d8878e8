"""The worker's endpoint for local clients (the vLLM connector, ``lmshare.Client``).

A ROUTER socket on an IPC path; requests are handled on a small thread pool (a peer fetch must
not block other clients) and replies return to the socket's thread through an inproc queue.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq

from lmshare import protocol
from lmshare.errors import ConfigError, LMShareError, ProtocolError
from lmshare.protocol import ErrorCode

log = logging.getLogger(__name__)

LOCAL_TYPES = {"hello", "local_lookup", "reserve", "commit", "abort", "acquire", "release",
               "locate", "worker_stats", "ping"}

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class LocalServer:
    def __init__(self, endpoint: str, handlers: dict[str, Handler], threads: int,
                 context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self._handlers = handlers
        self._context = context or zmq.Context.instance()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        try:
            self._socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self._socket.close()
            raise ConfigError(f"cannot open the local endpoint {endpoint} ({exc.strerror}); "
                              "is another worker with this name running?") from None
        self._inbox_name = f"inproc://lmshare-replies-{id(self)}"
        self._replies = self._context.socket(zmq.PULL)
        self._replies.bind(self._inbox_name)
        self._local = threading.local()
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="lmshare-local")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lmshare-local", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _reply_socket(self) -> zmq.Socket:
        sock = getattr(self._local, "socket", None)
        if sock is None:
            sock = self._context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
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
                    while True:
                        try:
                            frames = self._socket.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._executor.submit(self._handle, frames)
                if self._replies in ready:
                    while True:
                        try:
                            frames = self._replies.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._socket.send_multipart(frames, zmq.NOBLOCK)
        finally:
            self._socket.close(linger=0)
            self._replies.close(linger=0)

    def _handle(self, frames: list[bytes]) -> None:
        envelope, payload = frames[:-1], frames[-1]
        request_id = 0
        try:
            message = protocol.decode_request(payload, LOCAL_TYPES)
            request_id = message["id"]
            reply = self._handlers[message["type"]](message)
            reply.setdefault("v", protocol.PROTOCOL_VERSION)
            reply.setdefault("type", "ok")
            reply["id"] = request_id
        except ProtocolError as exc:
            reply = protocol.error(exc.request_id or request_id, protocol.error_code_of(exc),
                                   str(exc))
        except LMShareError as exc:
            code = getattr(exc, "code", ErrorCode.INTERNAL)
            reply = protocol.error(request_id, code, str(exc))
        except Exception as exc:
            log.exception("local request failed")
            reply = protocol.error(request_id, ErrorCode.INTERNAL, f"internal error: {exc}")
        self._reply_socket().send_multipart([*envelope, protocol.encode_reply(reply)])
