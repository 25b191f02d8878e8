"""The router's asynchronous link to the lmshare controller (the controller's public protocol:
``lookup`` and ``stats``), on one zmq.asyncio DEALER socket. Every call has a deadline; a late
reply is dropped, never read as the answer to a later call.

With the controller's keys in shards (:mod:`lmshare.shards`), :class:`AsyncShardLinks` keeps one
link per shard: a lookup asks every shard for its own keys at once and merges the answers
(:mod:`lmshare.shard_lookup`); everything else goes to shard 0. Lookups go to each controller's
lookup port (served before its worker traffic) once a ping has told it, else to its control
port; a lookup port that stops answering is forgotten until a ping advertises one again."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

import zmq
import zmq.asyncio

from lmshare import protocol
from lmshare.control import NOT_A_LOOKUP_PORT, LookupPorts, parse_controllers
from lmshare.errors import ControllerUnavailable, LMShareError, ProtocolError, RemoteError
from lmshare.shard_lookup import merge_lookups
from lmshare.shards import parse_shard_addresses, split_by_shard

log = logging.getLogger(__name__)

LEARN_INTERVAL_S = 5.0  # how often a router without a shard's lookup port pings for it


class AsyncControllerLink:
    """Requests to the controller(s) at ``HOST:PORT[,HOST:PORT...]``.

    With several controllers (elected through etcd), a call that times out or is refused with
    ``not_leader`` moves the next call to the next controller: a call never waits longer than
    its own deadline. Given ``lookup_ports``, calls go to each controller's lookup port once
    known (a link for lookups)."""

    def __init__(self, controllers: str, key: Any = None,
                 lookup_ports: LookupPorts | None = None) -> None:
        self.addresses = parse_controllers(controllers)
        self.lookup_ports = lookup_ports
        self._connected_port = 0
        self._curve = key.curve_client() if key is not None else None
        self._context = zmq.asyncio.Context()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._current = 0
        self._socket: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The control address of the controller the next call goes to."""
        return self.addresses[self._current]

    def _port(self) -> int:
        host, port = self.address
        learned = self.lookup_ports.get((host, port)) if self.lookup_ports is not None else None
        return learned or port

    @property
    def endpoint(self) -> str:
        return f"tcp://{self.address[0]}:{self._port()}"

    def _connect(self) -> zmq.asyncio.Socket:
        if self._socket is not None and self._connected_port != self._port():
            self._drop()  # a lookup port learned or forgotten: reconnect there
        if self._socket is None:
            self._connected_port = self._port()
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            sock.setsockopt(zmq.SNDHWM, 1000)
            if self._curve is not None:
                from lmshare.curve import secure_client

                secure_client(sock, self._curve)
            sock.connect(self.endpoint)
            self._socket = sock
            self._reader = asyncio.get_running_loop().create_task(self._read(sock))
        return self._socket

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            try:
                data = await sock.recv()
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            try:
                reply = protocol.decode_raw(data)
            except ProtocolError as exc:
                log.warning("dropping undecodable reply from the controller: %s", exc)
                continue
            future = self._pending.pop(reply.get("id"), None)
            if future is not None and not future.done():
                future.set_result(reply)

    def _drop(self) -> None:
        """Drop the socket (late replies with it)."""
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def _move_on(self) -> None:
        """Drop the socket and use the next controller next time."""
        self._drop()
        self._current = (self._current + 1) % len(self.addresses)

    def _lane_failed(self) -> None:
        """The lookup port used did not answer: ask the control port until one is learned."""
        if self.lookup_ports is not None and self._connected_port != self.address[1]:
            self.lookup_ports.forget(self.address, self._connected_port)

    async def call(self, type_: str, timeout_s: float, **fields: Any) -> dict[str, Any]:
        """One request; raises ControllerUnavailable after ``timeout_s``, RemoteError on an
        error reply."""
        sock = self._connect()
        request_id = next(self._ids)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        future: asyncio.Future = loop.create_future()
        self._pending[request_id] = future
        try:
            payload = protocol.encode(protocol.request(type_, request_id, **fields))
            try:
                await sock.send(payload, zmq.NOBLOCK)
            except zmq.Again:  # still connecting (a new socket): wait for it within the deadline
                if await sock.poll(max(1, int(timeout_s * 1000)), zmq.POLLOUT):
                    await sock.send(payload, zmq.NOBLOCK)
                    reply = await asyncio.wait_for(future, max(0.0, deadline - loop.time()))
                    return self._checked(reply)
                self._lane_failed()
                raise ControllerUnavailable(
                    f"controller at {self.endpoint} is not connected; check that it runs, "
                    "the address, and the cluster key") from None
            reply = await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            self._lane_failed()
            if len(self.addresses) > 1:
                self._move_on()
            raise ControllerUnavailable(f"controller at {self.endpoint} did not answer "
                                        f"{type_!r} within {timeout_s * 1000:.0f} ms") from None
        finally:
            self._pending.pop(request_id, None)
        return self._checked(reply)

    def _checked(self, reply: dict[str, Any]) -> dict[str, Any]:
        """An ok reply as it is; an error reply raised as RemoteError."""
        if reply["type"] == "error":
            if reply.get("code") in NOT_A_LOOKUP_PORT:
                self._lane_failed()
            if reply.get("code") == protocol.ErrorCode.NOT_LEADER and len(self.addresses) > 1:
                self._move_on()
            raise RemoteError(str(reply.get("code")), str(reply.get("message")))
        return reply

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        for future in self._pending.values():
            future.cancel()
        self._context.term()


class AsyncShardLinks:
    """Requests to the controller shards at ``HOST:PORT[,HOST:PORT...][;...]`` (one shard, the
    controllers of a cluster without shards, when there is no ``;``)."""

    def __init__(self, controllers: str, key: Any = None) -> None:
        groups = parse_shard_addresses(controllers)
        self.shards = [AsyncControllerLink(group, key) for group in groups]
        # the controllers' lookup ports (from their ping replies), and a link per shard there
        self.lookup_ports = LookupPorts()
        self.lanes = [AsyncControllerLink(group, key, self.lookup_ports) for group in groups]
        self._next_learn = 0.0
        self._learning: asyncio.Task | None = None

    async def learn_lookup_ports(self, timeout_s: float) -> None:
        """Ping each shard's controller whose lookup port is not known: what its reply
        advertises is used by the lookups from then on (a lookup link on another controller
        of the shard, after a failover, asks that one's control port meanwhile)."""
        for main in self.shards:
            if self.lookup_ports.get(main.address) is not None:
                continue
            address = main.address
            try:
                reply = await main.call("ping", timeout_s)
            except LMShareError as exc:
                log.debug("no lookup port learned from %s:%d: %s", *address, exc)
                continue
            self.lookup_ports.learn(address, reply)

    def _maybe_learn(self, timeout_s: float) -> None:
        """Start learning the lookup ports in the background, at most every few seconds
        while some are unknown (a lookup never waits for it)."""
        now = time.monotonic()
        if now < self._next_learn or (self._learning is not None and not self._learning.done()):
            return
        self._next_learn = now + LEARN_INTERVAL_S
        if all(self.lookup_ports.get(lane.address) is not None for lane in self.lanes):
            return
        self._learning = asyncio.get_running_loop().create_task(
            self.learn_lookup_ports(timeout_s))

    async def call(self, type_: str, timeout_s: float, **fields: Any) -> dict[str, Any]:
        """A request to shard 0 (which knows every worker, as every shard does)."""
        return await self.shards[0].call(type_, timeout_s, **fields)

    async def lookup(self, timeout_s: float, namespace: bytes,
                     keys: list[bytes]) -> dict[str, Any]:
        """A ``lookup`` reply for ``keys``: with shards, every shard is asked for its own keys
        at once and the answers merged (a shard that fails ends the prefix at its first key).
        Raises as :meth:`AsyncControllerLink.call` does when no shard could answer."""
        self._maybe_learn(timeout_s)
        if len(self.lanes) == 1:
            return await self.lanes[0].call("lookup", timeout_s, namespace=namespace, keys=keys)
        positions = split_by_shard(keys, len(self.shards))
        asked = [shard for shard, where in enumerate(positions) if where]
        results = await asyncio.gather(
            *(self.lanes[shard].call("lookup", timeout_s, namespace=namespace,
                                      keys=[keys[i] for i in positions[shard]])
              for shard in asked), return_exceptions=True)
        answers: list[Any] = [None] * len(self.shards)
        for shard, result in zip(asked, results):
            if isinstance(result, BaseException) and not isinstance(result, LMShareError):
                raise result  # cancelled, or a bug: not a shard's answer
            answers[shard] = result
        merged = merge_lookups(keys, positions, answers)
        if merged.unknown_namespace:
            raise RemoteError(protocol.ErrorCode.UNKNOWN_NAMESPACE,
                              "no controller shard ever saw this namespace")
        failed = [r for r in results if isinstance(r, LMShareError)
                  and r.code != protocol.ErrorCode.UNKNOWN_NAMESPACE]
        if len(failed) == len(asked):
            raise failed[0]
        for shard, result in zip(asked, results):
            if result in failed:
                log.debug("prefix lookup on shard %d: %s", shard, result)
        return merged.reply()

    def close(self) -> None:
        if self._learning is not None:
            self._learning.cancel()
        for link in [*self.shards, *self.lanes]:
            link.close()
