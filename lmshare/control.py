"""A request/reply client for the controller's ROUTER socket (also used for a worker's
local endpoint). Every call has a deadline; no call can hang."""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

import zmq

from lmshare import protocol
from lmshare.errors import ControllerUnavailable, LMShareError, ProtocolError, RemoteError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 2.0


class RpcClient:
    """One DEALER socket; not thread-safe (make one per thread)."""

    unavailable_error: type[LMShareError] = ControllerUnavailable
    what = "controller"

    def __init__(self, endpoint: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                 context: zmq.Context | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._context = context or zmq.Context.instance()
        self._ids = itertools.count(1)
        self._socket: zmq.Socket | None = None

    def _connect(self) -> zmq.Socket:
        if self._socket is None:
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            sock.connect(self.endpoint)
            self._socket = sock
        return self._socket

    def reset(self) -> None:
        """Drop the socket (and any late replies); the next call reconnects."""
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def call(self, type_: str, timeout_s: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send one request and wait for its reply. Raises on error replies and timeouts."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        sock = self._connect()
        request_id = next(self._ids)
        payload = protocol.encode(protocol.request(type_, request_id, **fields))
        while True:
            try:
                sock.send(payload, zmq.NOBLOCK)
                break
            except zmq.Again:
                left = deadline - time.monotonic()
                if left <= 0 or not sock.poll(int(min(left, 0.05) * 1000) + 1, zmq.POLLOUT):
                    if time.monotonic() >= deadline:
                        raise self.unavailable_error(
                            f"{self.what} at {self.endpoint} is not reachable (no connection "
                            f"within {timeout:.1f}s); check that it runs and the address") from None
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(max(1, int(left * 1000)), zmq.POLLIN):
                self.reset()  # a late reply must not be read as the answer to the next call
                raise self.unavailable_error(
                    f"{self.what} at {self.endpoint} did not answer {type_!r} within "
                    f"{timeout:.1f}s; check that it runs and the address")
            try:
                reply = protocol.decode_raw(sock.recv())
            except ProtocolError as exc:
                log.warning("dropping undecodable reply from %s: %s", self.endpoint, exc)
                continue
            if reply.get("id") != request_id:
                continue  # a late reply to an earlier, timed-out call
            if reply["type"] == "error":
                raise RemoteError(str(reply.get("code")), str(reply.get("message")))
            return reply

    def send_nowait(self, type_: str, **fields: Any) -> bool:
        """Send a request whose reply nobody waits for (it is dropped when it arrives).
        False if it could not even be queued."""
        try:
            self._connect().send(protocol.encode(protocol.request(type_, next(self._ids),
                                                                  **fields)), zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False

    def close(self) -> None:
        self.reset()


class ControllerClient(RpcClient):
    """Talks to the controller at ``tcp://host:port``."""

    def __init__(self, host: str, port: int, timeout_s: float = DEFAULT_TIMEOUT_S,
                 context: zmq.Context | None = None) -> None:
        super().__init__(f"tcp://{host}:{port}", timeout_s, context)
        self.host, self.port = host, port
