"""The locate/release channel of the one-sided transports (same-host shared memory and UCX).

A one-sided reader copies a holder's slabs without the holder's CPU, so it first asks the holder
where they are. Both one-sided transports, and the direct same-host hits of a worker's clients,
ask through this one channel, on the holder's data port (the connections, handshake and framing
of :mod:`lmshare.transports.tcp`, pooled with the fetches'):

  ``{"type": "locate", "keys", "lease_s"}`` → ``{"handle", "chunks": [[slabs, nbytes], ...],
  "gens": [[generation per slab], ...], "region": PoolExport}``: the holder pins the prefix of
  ``keys`` it holds under a lease (clamped to its ``--max-lease``);
  ``{"type": "release", "handle"}`` → no answer; it ends only leases a locate on that port made.

Every reply is checked before use (types, sizes, slab numbers inside the holder's pool). A reader
that maps the holder's pool (``maps=True``: shared memory, direct hits) takes the pool from the
holder's own answer, and only from a holder whose end of the connection is a socket of this
process's user on this host (``/proc/net/tcp``): a member elsewhere that claims this host cannot
make a worker map a file.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lmshare.errors import LMShareError, ProtocolError
from lmshare.pool import PoolExport
from lmshare.protocol import MAX_KEYS, PROTOCOL_VERSION
from lmshare.schema import I64_MAX, Int, List
from lmshare.transports.base import PeerInfo
from lmshare.transports.tcp import Connection, TcpTransport

log = logging.getLogger(__name__)

RELEASE_TIMEOUT_S = 1.0  # a release that cannot be sent by then: the lease expires on its own
MAX_SLABS = 1 << 20  # slabs of one located chunk
_HANDLE = Int(0, I64_MAX)
_NUMBERS = List(Int(0, I64_MAX), MAX_SLABS)
_NBYTES = Int(0, 1 << 40)


@dataclass(frozen=True)
class LocatedChunk:
    """Where one located chunk lies in the holder's pool, and its slabs' generations then."""

    slabs: list[int]
    nbytes: int
    generations: list[int]


@dataclass(frozen=True)
class Located:
    """A holder's answer to ``locate``: its lease (0: none) and the chunks of the prefix it
    holds, in the order asked; ``region`` is the holder's pool as it names it."""

    handle: int
    chunks: list[LocatedChunk]
    region: PoolExport | None = None

    @classmethod
    def from_wire(cls, reply: Any, asked: int, slab_bytes: int = 0,
                  num_slabs: int = 0) -> Located:
        """Check a decoded reply to a locate of ``asked`` keys; ProtocolError when it is not a
        well-formed answer. Slab numbers must lie below ``num_slabs`` (the region's own when the
        reply names one) and sizes fit their slabs."""
        if type(reply) is not dict:
            raise ProtocolError("locate reply is not a map")
        handle = _HANDLE.check(reply.get("handle", 0), "handle")
        pairs = reply.get("chunks", [])
        gens = List(_NUMBERS, asked).check(reply.get("gens", []), "gens")
        if type(pairs) not in (list, tuple) or len(pairs) != len(gens):
            raise ProtocolError("locate reply has not one [slabs, nbytes] per generation list")
        region = None
        if reply.get("region") is not None:
            try:
                region = PoolExport.from_wire(reply["region"])
            except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
                raise ProtocolError("locate reply names a malformed region") from None
            if region.slab_bytes < 1 or region.nbytes < 0:
                raise ProtocolError("locate reply names a region of no slabs")
            slab_bytes, num_slabs = region.slab_bytes, region.num_slabs
        if pairs and slab_bytes < 1:
            raise ProtocolError("locate reply names chunks of a pool of unknown slab size")
        chunks = [_chunk(index, pair, generations, slab_bytes, num_slabs)
                  for index, (pair, generations) in enumerate(zip(pairs, gens))]
        return cls(handle, chunks, region)


def _chunk(index: int, pair: Any, generations: list[int], slab_bytes: int,
           num_slabs: int) -> LocatedChunk:
    """One checked ``[slabs, nbytes]`` of a locate reply: as many slabs as the pool gives an
    entry of ``nbytes`` (at least one), each inside the pool, one generation per slab."""
    if type(pair) not in (list, tuple) or len(pair) != 2:
        raise ProtocolError(f"locate reply chunk {index} is not [slabs, nbytes]")
    slabs = _NUMBERS.check(pair[0], f"chunks[{index}][0]")
    nbytes = _NBYTES.check(pair[1], f"chunks[{index}][1]")
    if len(slabs) != max(1, -(-nbytes // slab_bytes)) or len(generations) != len(slabs):
        raise ProtocolError(f"locate reply chunk {index} does not fit its {len(slabs)} slabs")
    if any(s >= num_slabs for s in slabs):
        raise ProtocolError(f"locate reply chunk {index} names slabs outside the pool")
    return LocatedChunk(slabs, nbytes, generations)


def _hex_address(host: str, port: int) -> str:
    """An address as ``/proc/net/tcp{,6}`` prints it (the address's words in host order)."""
    if ":" in host:
        words = struct.unpack("=4I", socket.inet_pton(socket.AF_INET6, host))
        return "".join(f"{w:08X}" for w in words) + f":{port:04X}"
    return f"{struct.unpack('=I', socket.inet_aton(host))[0]:08X}:{port:04X}"


def far_end_uid(sock: socket.socket) -> int | None:
    """The uid owning the other end of a TCP connection when that end is a socket on this host
    (in this network namespace), else None."""
    mine, theirs = sock.getsockname()[:2], sock.getpeername()[:2]
    local, remote = _hex_address(*theirs), _hex_address(*mine)
    for table in ("/proc/net/tcp6", "/proc/net/tcp") if sock.family == socket.AF_INET6 \
            else ("/proc/net/tcp",):
        try:
            with open(table) as lines:
                next(lines, None)
                for line in lines:
                    fields = line.split()
                    if len(fields) > 7 and fields[1] == local and fields[2] == remote:
                        return int(fields[7])
        except OSError:
            continue
    return None


def _same_user(conn: Connection) -> None:
    """Refuse a connection whose holder end is not a socket of this user on this host."""
    if conn.same_user is None:
        conn.same_user = far_end_uid(conn.sock) == os.geteuid()
    if not conn.same_user:
        raise LMShareError("the holder's end of the data-port connection is not a process of "
                           "this user on this host; not mapping its pool")


class LocateChannel:
    """Sends ``locate`` and ``release`` to holders' data ports and reads the answers; shared by
    the worker's shared-memory and UCX transports and its direct hits."""

    def __init__(self, tcp: TcpTransport) -> None:
        self._tcp = tcp  # its pooled, authenticated connections

    def locate(self, peer: PeerInfo, keys: list[bytes], lease_s: float, deadline: float,
               maps: bool = False) -> tuple[Located, Callable[[], None]]:
        """Pin the prefix of ``keys`` that ``peer`` holds under a lease: where it lies, and a
        function that ends the lease (if that fails, the lease expires on its own). ``maps``:
        the reader maps the holder's pool (the reply must name it; the holder must be this
        user's, on this host). Raises TimeoutError past ``deadline``, OSError when the peer is
        unreachable, LMShareError for a refused holder or a malformed answer."""
        if deadline - time.monotonic() <= 0:
            raise TimeoutError("deadline passed before locating chunks")
        reply = self._tcp.exchange(peer, {"v": PROTOCOL_VERSION, "type": "locate",
                                          "keys": list(keys), "lease_s": lease_s},
                                   deadline, vet=_same_user if maps else None)
        extra = peer.extra
        try:
            slab_bytes = int(extra.get("slab_bytes", 0))
            num_slabs = int(extra.get("region_bytes", 0)) // max(1, slab_bytes)
        except (TypeError, ValueError):
            slab_bytes = num_slabs = 0
        try:
            located = Located.from_wire(reply, min(len(keys), MAX_KEYS), slab_bytes, num_slabs)
            if maps and located.region is None:
                raise ProtocolError("locate reply names no region to map")
        except ProtocolError:
            handle = reply.get("handle") if isinstance(reply, dict) else None
            if isinstance(handle, int) and handle:
                self._release(peer, handle)
            raise
        return located, lambda: self._release(peer, located.handle)

    def _release(self, peer: PeerInfo, handle: int) -> None:
        if not handle:
            return
        try:
            self._tcp.send(peer, {"v": PROTOCOL_VERSION, "type": "release", "handle": handle},
                           time.monotonic() + RELEASE_TIMEOUT_S)
        except (OSError, LMShareError) as exc:  # (never raised: a reader's finally calls it)
            log.debug("lease %d on %s ends on its own: %s", handle, peer.worker_id, exc)
