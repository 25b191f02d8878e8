"""A request/reply client for the controller's ROUTER socket (also used for a worker's
local endpoint). Every call has a deadline; no call can hang."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from lmshare import protocol
from lmshare.credentials import ClusterKey, CurveKeys
from lmshare.errors import (
    ConfigError,
    ControllerUnavailable,
    ErrorCode,
    LMShareError,
    ProtocolError,
    RemoteError,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 2.0
SEND_NOWAIT_WAIT_S = 0.2


class RpcClient:
    """One DEALER socket; not thread-safe (make one per thread)."""

    unavailable_error: type[LMShareError] = ControllerUnavailable
    what = "controller"

    def __init__(self, endpoint: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                 context: zmq.Context | None = None, curve: CurveKeys | None = None) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.curve = curve  # CurveZMQ client keys (a controller of a keyed cluster)
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
            if self.curve is not None:
                from lmshare.curve import secure_client

                secure_client(sock, self.curve)
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
                            f"within {timeout:.1f}s); check that it runs, the address, and that "
                            f"both sides use the same cluster key") from None
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
        False if it could not even be queued: a socket still connecting (e.g. the first use
        from this thread) is given up to ``SEND_NOWAIT_WAIT_S`` to connect."""
        payload = protocol.encode(protocol.request(type_, next(self._ids), **fields))
        try:
            sock = self._connect()
            try:
                sock.send(payload, zmq.NOBLOCK)
            except zmq.Again:
                if not sock.poll(int(SEND_NOWAIT_WAIT_S * 1000), zmq.POLLOUT):
                    return False
                sock.send(payload, zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False

    def close(self) -> None:
        self.reset()


class ControllerClient(RpcClient):
    """Talks to the controller at ``tcp://host:port``."""

    def __init__(self, host: str, port: int, timeout_s: float = DEFAULT_TIMEOUT_S,
                 context: zmq.Context | None = None, key: ClusterKey | None = None) -> None:
        super().__init__(f"tcp://{host}:{port}", timeout_s, context,
                         key.curve_client() if key is not None else None)
        self.host, self.port = host, port


# refusals that say a port is not (or no longer) a controller's lookup port
NOT_A_LOOKUP_PORT = frozenset({ErrorCode.WRONG_PORT, ErrorCode.UNKNOWN_TYPE,
                               ErrorCode.BAD_VERSION})


def advertised_lookup_port(reply: dict[str, Any]) -> int | None:
    """The lookup port a controller's register, ping or stats reply advertises, checked (an
    int in 1..65535); None when it names none or something else."""
    port = reply.get("lookup_port") if isinstance(reply, dict) else None
    return port if type(port) is int and 1 <= port <= 65535 else None


@dataclass
class LookupPorts:
    """The lookup ports controllers advertised, by control address (``(host, port)``): learned
    from their replies, forgotten when a lookup there goes unanswered. Any thread may use it."""

    _ports: dict[tuple[str, int], int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def learn(self, address: tuple[str, int], reply: dict[str, Any]) -> None:
        """What ``reply`` (from the controller at ``address``) advertises; a reply naming no
        lookup port (an older controller) forgets the one known."""
        port = advertised_lookup_port(reply)
        with self._lock:
            if port is None:
                self._ports.pop(address, None)
            else:
                self._ports[address] = port

    def get(self, address: tuple[str, int]) -> int | None:
        with self._lock:
            return self._ports.get(address)

    def forget(self, address: tuple[str, int], port: int) -> None:
        """A lookup on ``port`` went unanswered: use the control port until a reply advertises
        one again (unless a newer port was learned meanwhile)."""
        with self._lock:
            if self._ports.get(address) == port:
                del self._ports[address]
                log.info("lookup port %d of the controller at %s:%d did not answer; asking its "
                         "control port until it advertises one again", port, *address)


def _set_key(client: RpcClient, key: ClusterKey | None) -> None:
    client.curve = key.curve_client() if key is not None else None
    client.reset()  # the next call connects with the new client key


class FailoverControllerClient:
    """Talks to whichever of several controllers leads (controllers elected through etcd).

    Tries the current controller; on no answer or a ``not_leader`` refusal moves to the next
    (or to the leader the refusal names). Each try has its own deadline, so a call takes at most
    ``len(addresses)`` deadlines. With one address it behaves like :class:`ControllerClient`.
    Not thread-safe (make one per thread).

    Given ``lookup_ports``, its calls go to each controller's advertised lookup port once known
    (else its control port): a client for lookups. A call unanswered there forgets that port.
    """

    def __init__(self, addresses: list[tuple[str, int]], timeout_s: float = DEFAULT_TIMEOUT_S,
                 context: zmq.Context | None = None, key: ClusterKey | None = None,
                 lookup_ports: LookupPorts | None = None) -> None:
        if not addresses:
            raise ValueError("at least one controller address is needed")
        self.addresses = list(addresses)
        self.timeout_s = timeout_s
        self._clients = [ControllerClient(h, p, timeout_s, context, key)
                         for h, p in self.addresses]
        self._current = 0
        self.key = key
        self._using = key
        self.lookup_ports = lookup_ports

    def set_key(self, key: ClusterKey | None) -> None:
        """Connect with ``key`` from the next call on (a reloaded key file). Any thread may
        call it; the thread that makes the calls applies it."""
        self.key = key

    @property
    def endpoint(self) -> str:
        return self._clients[self._current].endpoint

    @property
    def address(self) -> tuple[str, int]:
        """The control address of the controller the next call goes to first (the last one
        that answered)."""
        return self.addresses[self._current]

    def _index_of(self, hint: str) -> int | None:
        for index, (host, port) in enumerate(self.addresses):
            if hint == f"{host}:{port}":
                return index
        return None

    def current(self) -> ControllerClient:
        """The controller the next call goes to first (with the latest key applied)."""
        if self.key is not self._using:
            self._using = self.key
            for client in self._clients:
                _set_key(client, self._using)
        if self.lookup_ports is not None:
            for (host, port), client in zip(self.addresses, self._clients):
                wanted = self.lookup_ports.get((host, port)) or port
                if client.port != wanted:  # learned, moved or forgotten: reconnect there
                    client.reset()
                    client.port, client.endpoint = wanted, f"tcp://{host}:{wanted}"
        return self._clients[self._current]

    def unanswered(self, client: ControllerClient) -> None:
        """``client`` (one of this one's) did not answer in time: forget the lookup port it
        used, so the next call asks that controller's control port."""
        if self.lookup_ports is None:
            return
        for address, own in zip(self.addresses, self._clients):
            if own is client and client.port != address[1]:
                self.lookup_ports.forget(address, client.port)

    def skip(self) -> None:
        """The current controller did not answer: start the next call at the next one."""
        self._current = (self._current + 1) % len(self._clients)

    def call(self, type_: str, timeout_s: float | None = None, **fields: Any) -> dict[str, Any]:
        self.current()
        last: LMShareError | None = None
        fallback: dict[str, Any] | None = None
        for _ in range(len(self._clients)):
            client = self._clients[self._current]
            try:
                reply = client.call(type_, timeout_s=timeout_s, **fields)
            except ControllerUnavailable as exc:
                self.unanswered(client)
                last = exc
            except RemoteError as exc:
                if exc.code in NOT_A_LOOKUP_PORT:
                    self.unanswered(client)  # something else listens there now
                if exc.code != "not_leader":
                    raise
                last = exc
                hinted = self._index_of(exc.message.split("the leader is ")[-1].split(";")[0])
                if hinted is not None and hinted != self._current:
                    self._current = hinted
                    continue
            else:
                standby = reply.get("role") == "standby" or (
                    isinstance(reply.get("stats"), dict)
                    and reply["stats"].get("role") == "standby")
                if not standby or len(self._clients) == 1:
                    return reply
                fallback = fallback or reply  # a standby's answer, if no leader answers
            self._current = (self._current + 1) % len(self._clients)
        if fallback is not None:
            return fallback
        assert last is not None
        raise last

    def reset(self) -> None:
        for client in self._clients:
            client.reset()

    def close(self) -> None:
        for client in self._clients:
            client.close()




@dataclass
class _Waiting:
    """One request of :func:`call_all` not answered yet."""

    client: RpcClient
    request_id: int
    payload: bytes
    sent: bool


def _is_standby(reply: dict[str, Any]) -> bool:
    return reply.get("role") == "standby" or (
        isinstance(reply.get("stats"), dict) and reply["stats"].get("role") == "standby")


def call_all(calls: Sequence[tuple[FailoverControllerClient, str, dict[str, Any]]],
             timeout_s: float) -> list[dict[str, Any] | LMShareError]:
    """Make several calls at once, each to its own controller (``(client, type, fields)``, one
    client each, e.g. one per shard): every request is sent first, then the replies are awaited
    under one deadline, so the calls take one round trip in all. Each result is the reply, or
    the error that call raised (``RemoteError``, ``ControllerUnavailable``); never raises. A
    client of several controllers that was refused with ``not_leader`` tries the others in the
    time left, as :meth:`FailoverControllerClient.call` does."""
    deadline = time.monotonic() + timeout_s
    results: list[dict[str, Any] | LMShareError | None] = [None] * len(calls)
    waiting: dict[int, _Waiting] = {}
    for index, (failover, type_, fields) in enumerate(calls):
        client = failover.current()
        request_id = next(client._ids)
        payload = protocol.encode(protocol.request(type_, request_id, **fields))
        sock = client._connect()
        try:
            sock.send(payload, zmq.NOBLOCK)
            sent = True
        except zmq.Again:  # still connecting: sent once it can be
            sent = False
        waiting[index] = _Waiting(client, request_id, payload, sent)
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        poller = zmq.Poller()
        for wait in waiting.values():
            poller.register(wait.client._connect(), zmq.POLLIN if wait.sent else zmq.POLLOUT)
        events = dict(poller.poll(max(1, int(left * 1000))))
        for index, wait in list(waiting.items()):
            sock = wait.client._connect()
            ready = events.get(sock, 0)
            if not wait.sent and ready & zmq.POLLOUT:
                try:
                    sock.send(wait.payload, zmq.NOBLOCK)
                    wait.sent = True
                except zmq.Again:
                    pass
                continue
            while ready & zmq.POLLIN:
                try:
                    data = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    reply = protocol.decode_raw(data)
                except ProtocolError as exc:
                    log.warning("dropping undecodable reply from %s: %s", wait.client.endpoint,
                                exc)
                    continue
                if reply.get("id") != wait.request_id:
                    continue  # a late reply to an earlier, timed-out call
                results[index] = RemoteError(str(reply.get("code")), str(reply.get("message"))) \
                    if reply["type"] == "error" else reply
                if reply["type"] == "error" and reply.get("code") in NOT_A_LOOKUP_PORT:
                    calls[index][0].unanswered(wait.client)
                del waiting[index]
                break
    for index, wait in waiting.items():
        wait.client.reset()  # a late reply must not be read as the answer to the next call
        failover, type_, _ = calls[index]
        failover.unanswered(wait.client)
        if len(failover.addresses) > 1:
            failover.skip()
        results[index] = wait.client.unavailable_error(
            f"{wait.client.what} at {wait.client.endpoint} did not answer {type_!r} within "
            f"{timeout_s:.1f}s; check that it runs and the address")
    for index, (failover, type_, fields) in enumerate(calls):
        result = results[index]
        moved = (isinstance(result, RemoteError) and result.code == "not_leader") or (
            isinstance(result, dict) and _is_standby(result))
        left = deadline - time.monotonic()
        if moved and len(failover.addresses) > 1 and left > 0:
            try:  # the leader is elsewhere: the time left is its
                results[index] = failover.call(type_, timeout_s=left, **fields)
            except LMShareError as exc:
                results[index] = exc
    return results  # type: ignore[return-value]


def shard_clients(text: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                  key: ClusterKey | None = None) -> list[FailoverControllerClient]:
    """A client of each controller shard named in ``text`` (``A[,B...][;C[,D...]...]``, see
    :mod:`lmshare.shards`), in shard order; one without shards."""
    from lmshare.shards import parse_shard_addresses

    return [FailoverControllerClient(parse_controllers(group), timeout_s, key=key)
            for group in parse_shard_addresses(text)]


def parse_controllers(text: str) -> list[tuple[str, int]]:
    """``HOST:PORT[,HOST:PORT...]`` into addresses (several = controllers elected via etcd)."""
    from lmshare.units import parse_address

    addresses = [parse_address(part.strip()) for part in text.split(",") if part.strip()]
    if not addresses:
        raise ConfigError(f"cannot read controller address {text!r}; write HOST:PORT, or "
                          "several separated by commas")
    return addresses

