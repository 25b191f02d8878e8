"""The router's asynchronous link to the lmshare controller (the controller's public protocol:
``lookup`` and ``stats``), on one zmq.asyncio DEALER socket. Every call has a deadline; a late
reply is dropped, never read as the answer to a later call.

With the controller's keys in shards (:mod:`lmshare.shards`), :class:`AsyncShardLinks` keeps one
link per shard: a lookup asks every shard for its own keys at once and merges the answers
(:mod:`lmshare.shard_lookup`); everything else goes to shard 0."""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import zmq
import zmq.asyncio

from lmshare import protocol
from lmshare.control import parse_controllers
from lmshare.errors import ControllerUnavailable, LMShareError, ProtocolError, RemoteError
from lmshare.shard_lookup import merge_lookups
from lmshare.shards import parse_shard_addresses, split_by_shard

log = logging.getLogger(__name__)


class AsyncControllerLink:
    """Requests to the controller(s) at ``HOST:PORT[,HOST:PORT...]``.

    With several controllers (elected through etcd), a call that times out or is refused with
    ``not_leader`` moves the next call to the next controller: a call never waits longer than
    its own deadline."""

    def __init__(self, controllers: str, key: Any = None) -> None:
        self.addresses = parse_controllers(controllers)
        self._curve = key.curve_client() if key is not None else None
        self._context = zmq.asyncio.Context()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._current = 0
        self._socket: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task | None = None

    @property
    def endpoint(self) -> str:
        host, port = self.addresses[self._current]
        return f"tcp://{host}:{port}"

    def _connect(self) -> zmq.asyncio.Socket:
        if self._socket is None:
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

    def _move_on(self) -> None:
        """Drop the socket (late replies with it) and use the next controller next time."""
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        self._current = (self._current + 1) % len(self.addresses)

    async def call(self, type_: str, timeout_s: float, **fields: Any) -> dict[str, Any]:
        """One request; raises ControllerUnavailable after ``timeout_s``, RemoteError on an
        error reply."""
        sock = self._connect()
        request_id = next(self._ids)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            try:
                await sock.send(protocol.encode(protocol.request(type_, request_id, **fields)),
                                zmq.NOBLOCK)
            except zmq.Again:
                raise ControllerUnavailable(
                    f"controller at {self.endpoint} is not connected; check that it runs, "
                    "the address, and the cluster key") from None
            reply = await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            if len(self.addresses) > 1:
                self._move_on()
            raise ControllerUnavailable(f"controller at {self.endpoint} did not answer "
                                        f"{type_!r} within {timeout_s * 1000:.0f} ms") from None
        finally:
            self._pending.pop(request_id, None)
        if reply["type"] == "error":
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
        self.shards = [AsyncControllerLink(group, key)
                       for group in parse_shard_addresses(controllers)]

    async def call(self, type_: str, timeout_s: float, **fields: Any) -> dict[str, Any]:
        """A request to shard 0 (which knows every worker, as every shard does)."""
        return await self.shards[0].call(type_, timeout_s, **fields)

    async def lookup(self, timeout_s: float, namespace: bytes,
                     keys: list[bytes]) -> dict[str, Any]:
        """A ``lookup`` reply for ``keys``: with shards, every shard is asked for its own keys
        at once and the answers merged (a shard that fails ends the prefix at its first key).
        Raises as :meth:`AsyncControllerLink.call` does when no shard could answer."""
        if len(self.shards) == 1:
            return await self.shards[0].call("lookup", timeout_s, namespace=namespace, keys=keys)
        positions = split_by_shard(keys, len(self.shards))
        asked = [shard for shard, where in enumerate(positions) if where]
        results = await asyncio.gather(
            *(self.shards[shard].call("lookup", timeout_s, namespace=namespace,
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
        for link in self.shards:
            link.close()
