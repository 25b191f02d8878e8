"""TCP data path.

Every connection opens with the data-plane handshake (``lmshare/handshake.py``): both sides
prove they hold the cluster key before the first request. Then, per request:
  client → server: ``u32 length`` + msgpack ``{"v", "type": "fetch", "keys", "checksum"}``
  server → client: per key, a 16-byte header ``(u8 status, 3 pad, u32 crc32, u64 nbytes)``
                   followed by ``nbytes`` bytes when status is OK.
The same connection also carries the small requests of the one-sided transports (shared memory
and UCX; the client side is :mod:`lmshare.transports.locate`):
  ``{"type": "locate", "keys", "lease_s"}`` → ``u32 length`` + msgpack
  ``{handle, chunks, gens, region}``
  ``{"type": "release", "handle"}`` → no answer; it ends only leases that a ``locate`` on this
  port made (never a local client's).
The server sends straight from its pool slabs with ``socket.sendmsg`` (no intermediate copy);
the client ``recv_into``s the destination slabs. Every socket wait has the request's deadline.
On a connection whose handshake chose encryption (``encrypt=True`` on either side), the same
messages travel as AES-GCM records (``lmshare/transports/records.py``): one pass of AES over
the bytes on each side, and a chunk whose record fails its tag is dropped (a transfer error).
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable

import msgpack

from lmshare import protocol
from lmshare.credentials import ClusterKey
from lmshare.errors import ProtocolError, TransferError
from lmshare.handshake import (
    HandshakeRefused,
    Session,
    client_handshake,
    data_key,
    server_handshake_any,
)
from lmshare.protocol import PROTOCOL_VERSION
from lmshare.transports import records
from lmshare.transports.base import ChunkSink, PeerInfo, Transport

log = logging.getLogger(__name__)

CHUNK_HEADER = struct.Struct("<B3xIQ")
REQUEST_LENGTH = struct.Struct("<I")
STATUS_OK = 0
STATUS_MISSING = 1
MAX_REQUEST_BYTES = 16 * 1024 * 1024
PEER_TYPES = {"fetch", "locate", "release"}
BODY_PIECE_BYTES = 64 * 1024
MAX_CONNECTIONS = 512  # peer connections served at once; more are closed at accept
ACCEPT_BACKOFF_S = (0.05, 1.0)  # pause after accept fails (EMFILE, ENOBUFS), doubling
SOCKET_BUFFER_BYTES = 4 * 1024 * 1024


def crc32_of(views: list[memoryview]) -> int:
    crc = 0
    for view in views:
        crc = zlib.crc32(view, crc)
    return crc


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        except OSError:
            pass


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("transfer deadline passed")
    return left


def _recv_exact_into(sock: socket.socket, view: memoryview, deadline: float) -> None:
    received = 0
    total = view.nbytes
    while received < total:
        sock.settimeout(_remaining(deadline))
        count = sock.recv_into(view[received:], total - received)
        if count == 0:
            raise ConnectionError("peer closed the connection")
        received += count


def _recv_exact_into_many(sock: socket.socket, views: list[memoryview], deadline: float) -> None:
    """Fill every view in order, several per system call (``recvmsg_into`` scatters)."""
    pending = [v for v in views if v.nbytes]
    while pending:
        sock.settimeout(_remaining(deadline))
        count = sock.recvmsg_into(pending[:512])[0]
        if count == 0:
            raise ConnectionError("peer closed the connection")
        _advance(pending, count)


def _send_all(sock: socket.socket, views: list[memoryview], deadline: float) -> None:
    pending = [v for v in views if v.nbytes]
    while pending:
        sock.settimeout(_remaining(deadline))
        _advance(pending, sock.sendmsg(pending[:512]))


def _advance(pending: list[memoryview], count: int) -> None:
    """Drop the first ``count`` bytes from the buffers ``pending`` (in place)."""
    while count:
        head = pending[0]
        if count >= head.nbytes:
            count -= head.nbytes
            pending.pop(0)
        else:
            pending[0] = head[count:]
            count = 0


# (key) -> (views, release) of a pinned entry, or None if absent
ChunkSource = Callable[[bytes], "tuple[list[memoryview], Callable[[], None]] | None"]
# (keys, lease_s) -> {"handle", "chunks": [[slabs, nbytes]...], "gens": [[...]...], "region"}
Locator = Callable[[list, float], dict]
Releaser = Callable[[int], object]


def _recv_body(sock: socket.socket, length: int, deadline: float) -> bytes:
    """``length`` bytes, read in pieces: memory follows the bytes that arrived, not what the
    other side announced."""
    body = bytearray()
    piece = bytearray(min(length, BODY_PIECE_BYTES))
    while len(body) < length:
        view = memoryview(piece)[:min(len(piece), length - len(body))]
        _recv_exact_into(sock, view, deadline)
        body += view
    return bytes(body)


def _decode_message(body: bytes) -> dict:
    try:
        message = msgpack.unpackb(body, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ConnectionError(f"undecodable message ({exc})") from None
    if not isinstance(message, dict):
        raise ConnectionError("malformed message")
    return message


class Connection:
    """A peer connection after its handshake: the bytes as they are, or sealed records."""

    def __init__(self, sock: socket.socket, session: Session | None = None) -> None:
        self.sock = sock
        self.session = session
        self.same_user: bool | None = None  # the far end is this user's (checked when asked)
        self._plain = bytearray()  # scratch buffers of the encrypted path
        self._sealed = bytearray()

    @property
    def encrypted(self) -> bool:
        return self.session is not None

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def _scratch(self) -> tuple[memoryview, memoryview]:
        if not self._sealed:
            self._plain = bytearray(records.RECORD_BYTES)
            self._sealed = bytearray(records.RECORD_BYTES + records.TAG_BYTES)
        return memoryview(self._plain), memoryview(self._sealed)

    def send_message(self, message: dict, deadline: float) -> None:
        body = msgpack.packb(message)
        length = REQUEST_LENGTH.pack(len(body))
        if self.session is None:
            _send_all(self.sock, [memoryview(length), memoryview(body)], deadline)
            return
        sealed = bytearray(len(body) + records.TAG_BYTES)
        self.session.send.seal_into(body, memoryview(sealed), length)
        _send_all(self.sock, [memoryview(length), memoryview(sealed)], deadline)

    def read_body(self, length: int, deadline: float) -> bytes:
        """The body of a message whose ``length`` was read (checked by the caller)."""
        if self.session is None:
            return _recv_body(self.sock, length, deadline)
        sealed = _recv_body(self.sock, length + records.TAG_BYTES, deadline)
        plain = bytearray(length)
        self.session.receive.open_into(sealed, memoryview(plain), REQUEST_LENGTH.pack(length))
        return bytes(plain)

    def _read_framed(self, head: bytearray, deadline: float) -> bytes:
        """The body of the message whose length prefix is ``head`` (bounded, then read)."""
        (length,) = REQUEST_LENGTH.unpack(head)
        if length > MAX_REQUEST_BYTES:
            raise ConnectionError(f"message of {length} bytes is too large")
        return self.read_body(length, deadline)

    def recv_message(self, deadline: float) -> dict:
        """The next message (a map), all of it before ``deadline``."""
        head = bytearray(REQUEST_LENGTH.size)
        _recv_exact_into(self.sock, memoryview(head), deadline)
        return _decode_message(self._read_framed(head, deadline))

    def wait_message(self, idle_timeout_s: float, body_timeout_s: float) -> bytes | None:
        """The body of the next message once one starts within ``idle_timeout_s`` (read within
        ``body_timeout_s`` of its start); None when the peer closed or stayed idle."""
        head = bytearray(REQUEST_LENGTH.size)
        self.sock.settimeout(idle_timeout_s)
        try:
            count = self.sock.recv_into(head, len(head), socket.MSG_WAITALL)
        except TimeoutError:
            return None
        if count == 0:
            return None
        if count != len(head):
            raise ConnectionError("short message header")
        return self._read_framed(head, time.monotonic() + body_timeout_s)

    def send_chunk(self, header: bytes, views: list[memoryview], deadline: float) -> None:
        """A chunk header and its body (``views``, none for a missing chunk)."""
        if self.session is None:
            _send_all(self.sock, [memoryview(header), *views], deadline)
            return
        sealed_header = bytearray(CHUNK_HEADER.size + records.TAG_BYTES)
        self.session.send.seal_into(header, memoryview(sealed_header))
        _send_all(self.sock, [memoryview(sealed_header)], deadline)
        plain, sealed = self._scratch()
        offset = 0
        for size in records.record_sizes(sum(v.nbytes for v in views)):
            piece = records.gather(views, offset, size, plain)
            self.session.send.seal_into(piece, sealed[:size + records.TAG_BYTES])
            _send_all(self.sock, [sealed[:size + records.TAG_BYTES]], deadline)
            offset += size

    def recv_header(self, header: bytearray, deadline: float) -> None:
        if self.session is None:
            _recv_exact_into(self.sock, memoryview(header), deadline)
            return
        sealed = bytearray(CHUNK_HEADER.size + records.TAG_BYTES)
        _recv_exact_into(self.sock, memoryview(sealed), deadline)
        self.session.receive.open_into(sealed, memoryview(header))

    def recv_body(self, views: list[memoryview], deadline: float) -> None:
        """Fill ``views`` with the body of the chunk whose header was read; TransferError when
        a record fails its tag (the views then hold garbage: the caller drops the chunk)."""
        if self.session is None:
            _recv_exact_into_many(self.sock, views, deadline)
            return
        plain, sealed = self._scratch()
        offset = 0
        for size in records.record_sizes(sum(v.nbytes for v in views)):
            _recv_exact_into(self.sock, sealed[:size + records.TAG_BYTES], deadline)
            into = records.target(views, offset, size)
            self.session.receive.open_into(sealed[:size + records.TAG_BYTES],
                                           into if into is not None else plain[:size])
            if into is None:
                records.scatter(plain[:size], views, offset)
            offset += size


def _as_connection(conn: Connection | socket.socket) -> Connection:
    """A plain connection around a bare socket (as tests hand the server's readers)."""
    return conn if isinstance(conn, Connection) else Connection(conn)


class TcpTransport(Transport):
    """Client side: one persistent connection per peer, reused across fetches."""

    name = "tcp"

    def __init__(self, connect_timeout_s: float = 2.0, key: ClusterKey | None = None,
                 encrypt: bool = False) -> None:
        self.connect_timeout_s = connect_timeout_s
        self._key = data_key(key)
        self.encrypt = encrypt  # ask for encrypted connections (a peer may encrypt anyway)
        self._idle: dict[tuple[str, int], list[Connection]] = {}
        self._lock = threading.Lock()

    def _connect(self, peer: PeerInfo, deadline: float, fresh: bool = False) -> Connection:
        address = (peer.host, peer.data_port)
        if not fresh:
            with self._lock:
                idle = self._idle.get(address)
                if idle:
                    return idle.pop()
        timeout = min(self.connect_timeout_s, _remaining(deadline))
        sock = socket.create_connection(address, timeout=timeout)
        try:
            _tune(sock)
            session = client_handshake(sock, self._key, min(deadline, time.monotonic() + timeout),
                                       self.encrypt)
        except BaseException:
            sock.close()
            raise
        return Connection(sock, session)

    def set_key(self, key: ClusterKey | None) -> None:
        """Open new connections with ``key`` (a reloaded key file); idle ones are closed."""
        self._key = data_key(key)
        with self._lock:
            idle, self._idle = self._idle, {}
        for sockets in idle.values():
            for sock in sockets:
                sock.close()

    def _reusable(self, peer: PeerInfo) -> bool:
        with self._lock:
            return bool(self._idle.get((peer.host, peer.data_port)))

    def _give_back(self, peer: PeerInfo, sock: Connection) -> None:
        with self._lock:
            self._idle.setdefault((peer.host, peer.data_port), []).append(sock)
            self._prune_locked()

    def _prune_locked(self) -> None:
        """Close idle connections the peer has closed (a holder that stopped or died: its
        port is not asked again, so they would stay open for good). A peer never sends on an
        idle connection, so an idle socket that is readable is at its end."""
        poller = select.poll()
        by_fd = {}
        for sockets in self._idle.values():
            for sock in sockets:
                by_fd[sock.fileno()] = sock
                poller.register(sock, select.POLLIN)
        ended = {by_fd[fd] for fd, _ in poller.poll(0)}
        if not ended:
            return
        for address in list(self._idle):
            kept = [sock for sock in self._idle[address] if sock not in ended]
            if kept:
                self._idle[address] = kept
            else:
                del self._idle[address]
        for sock in ended:
            sock.close()

    def exchange(self, peer: PeerInfo, message: dict, deadline: float,
                 vet: Callable[[Connection], None] | None = None) -> dict:
        """Send one small request to ``peer`` and return its answer (a map), on a pooled
        connection (one the peer closed while idle is replaced once). ``vet`` may refuse a
        connection (it raises) before anything is sent on it."""
        for fresh in ((False, True) if self._reusable(peer) else (True,)):
            sock = self._connect(peer, deadline, fresh=fresh)
            try:
                if vet is not None:
                    vet(sock)
                sock.send_message(message, deadline)
                reply = sock.recv_message(deadline)
            except (OSError, ConnectionError) as exc:
                sock.close()
                if fresh or isinstance(exc, TimeoutError):
                    raise
                continue  # a pooled connection the peer closed while idle
            except BaseException:
                sock.close()
                raise
            self._give_back(peer, sock)
            return reply
        raise ConnectionError("unreachable")

    def send(self, peer: PeerInfo, message: dict, deadline: float) -> None:
        """Send one request that has no answer (a ``release``) on a pooled connection."""
        sock = self._connect(peer, deadline)
        try:
            sock.send_message(message, deadline)
        except BaseException:
            sock.close()
            raise
        self._give_back(peer, sock)

    def fetch(self, peer: PeerInfo, keys: list[bytes], sink: ChunkSink, deadline: float,
              checksum: bool = False) -> int:
        if not keys:
            return 0
        # A pooled connection may have been closed by the peer while idle: if it fails before
        # a single byte of the answer arrived, try once more on a new connection.
        for fresh in ((False, True) if self._reusable(peer) else (True,)):
            try:
                sock = self._connect(peer, deadline, fresh=fresh)
            except (OSError, TimeoutError) as exc:
                log.warning("cannot connect to peer %s at %s:%d: %s", peer.worker_id,
                            peer.host, peer.data_port, exc)
                return 0
            delivered, answered = self._fetch_on(sock, peer, keys, sink, deadline, checksum)
            if answered or fresh:
                return delivered
        return 0

    def _fetch_on(self, sock: Connection | socket.socket, peer: PeerInfo, keys: list[bytes],
                  sink: ChunkSink,
                  deadline: float, checksum: bool) -> tuple[int, bool]:
        """One request on ``sock``: (chunks delivered, whether the peer answered at all)."""
        sock = _as_connection(sock)
        delivered = 0
        healthy = False
        answered = False
        try:
            sock.send_message({"v": PROTOCOL_VERSION, "type": "fetch", "keys": list(keys),
                               "checksum": checksum}, deadline)
            header = bytearray(CHUNK_HEADER.size)
            for key in keys:
                sock.recv_header(header, deadline)
                answered = True
                status, crc, nbytes = CHUNK_HEADER.unpack(header)
                if status != STATUS_OK:
                    break
                if not self._receive_chunk(sock, key, nbytes, crc, checksum, sink, deadline):
                    break
                delivered += 1
            else:
                healthy = True
        except TimeoutError as exc:
            answered = True  # the deadline is spent: no second try
            log.warning("fetch of %d chunks from peer %s stopped after %d: %s", len(keys),
                        peer.worker_id, delivered, exc)
        except (OSError, ConnectionError, TransferError) as exc:
            log.log(logging.WARNING if answered else logging.DEBUG,
                    "fetch of %d chunks from peer %s stopped after %d: %s", len(keys),
                    peer.worker_id, delivered, exc)
        if healthy:
            self._give_back(peer, sock)
        else:
            sock.close()  # the stream position is unknown: never reuse it
        return delivered, answered

    def _receive_chunk(self, sock: Connection, key: bytes, nbytes: int, crc: int,
                       checksum: bool, sink: ChunkSink, deadline: float) -> bool:
        buffers = sink.begin(key, nbytes)
        if buffers is None:
            raise TransferError(f"no room for a chunk of {nbytes} bytes")
        ok = False
        try:
            sock.recv_body(buffers, deadline)
            ok = not checksum or crc32_of(buffers) == crc
            if not ok:
                raise TransferError("checksum mismatch: chunk dropped")
            return True
        finally:
            sink.end(key, ok)

    def close(self) -> None:
        with self._lock:
            for sockets in self._idle.values():
                for sock in sockets:
                    sock.close()
            self._idle.clear()


class TcpPeerServer:
    """Serves chunks of the local pool to peers. One thread per connection."""

    def __init__(self, source: ChunkSource, host: str = "127.0.0.1", port: int = 0,
                 send_timeout_s: float = 10.0, locator: Locator | None = None,
                 releaser: Releaser | None = None, idle_timeout_s: float = 300.0,
                 key: ClusterKey | None = None, handshake_timeout_s: float = 5.0,
                 encrypt: bool = False) -> None:
        self.source = source
        self._keys = key.data_keys() if key is not None else [data_key(None)]
        self.encrypt = encrypt  # encrypt every connection (a client may ask for it anyway)
        self.handshake_timeout_s = handshake_timeout_s
        #: connections refused before any request, by reason (bad_mac, timeout, closed)
        self.refused: Counter[str] = Counter()
        self._refused_hosts: set[str] = set()
        # leases a locate on this port made: the only ones a release on this port may end
        self._located: dict[int, float] = {}
        self.idle_timeout_s = idle_timeout_s
        self.locator = locator
        self.releaser = releaser
        self.send_timeout_s = send_timeout_s
        self._listener = socket.create_server((host, port), reuse_port=False, backlog=128)
        self.host, self.port = self._listener.getsockname()[:2]
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._in_flight = 0
        self._state = threading.Condition()
        self.bytes_served = 0
        self.chunks_served = 0
        self.accept_failures = 0
        self.max_connections = MAX_CONNECTIONS
        self._thread = threading.Thread(target=self._accept_loop, name="lmshare-peer-accept",
                                        daemon=True)

    def start(self) -> TcpPeerServer:
        self._thread.start()
        return self

    def in_flight(self) -> int:
        with self._state:
            return self._in_flight

    def _accept_loop(self) -> None:
        """Accept until stopped. Running out of descriptors or memory (EMFILE, ENFILE,
        ENOBUFS) pauses accepting, with a warning, and never ends the loop."""
        self._listener.settimeout(0.2)
        backoff = ACCEPT_BACKOFF_S[0]
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    break
                self.accept_failures += 1
                log.warning("cannot accept peer connections (%s); %d connections open; "
                            "retrying in %.2fs (raise the open-files limit, ulimit -n)",
                            exc.strerror or exc, len(self._connections), backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, ACCEPT_BACKOFF_S[1])
                continue
            backoff = ACCEPT_BACKOFF_S[0]
            with self._state:
                full = len(self._connections) >= self.max_connections
                if not full:
                    self._connections.add(conn)
            if full:
                self.refused["too_many_connections"] += 1
                conn.close()
                continue
            _tune(conn)
            threading.Thread(target=self._serve, args=(conn,), name="lmshare-peer-conn",
                             daemon=True).start()

    def _read_request(self, channel: Connection | socket.socket) -> dict | None:
        """The next request, validated; None when the peer closed or stayed idle past
        ``idle_timeout_s`` (an idle peer connection is closed after it)."""
        body = _as_connection(channel).wait_message(self.idle_timeout_s, self.send_timeout_s)
        if body is None:
            return None
        try:
            return protocol.decode_request(body, PEER_TYPES, MAX_REQUEST_BYTES)
        except ProtocolError as exc:
            raise ConnectionError(f"malformed request: {exc}") from None

    def set_key(self, key: ClusterKey | None) -> None:
        """Accept the keys of ``key`` from now on (a reloaded key file); connections opened
        with a key it no longer holds are closed at their next request."""
        self._keys = key.data_keys() if key is not None else [data_key(None)]

    def refused_total(self) -> int:
        with self._state:
            return sum(self.refused.values())

    def refused_counts(self) -> dict[str, int]:
        with self._state:
            return dict(self.refused)

    def _refuse(self, conn: socket.socket, exc: HandshakeRefused) -> None:
        try:
            host = conn.getpeername()[0]
        except OSError:
            host = "an unknown address"
        with self._state:
            self.refused[exc.reason] += 1
            first = host not in self._refused_hosts and len(self._refused_hosts) < 1024
            if first:
                self._refused_hosts.add(host)
        if first:
            log.warning("data port refused a connection from %s (%s): %s; logged once per "
                        "address", host, exc.reason, exc)

    def _release(self, handle: object) -> None:
        if self.releaser is None or not isinstance(handle, int):
            return
        with self._state:
            located = self._located.pop(handle, None) is not None
        if located:
            self.releaser(handle)

    def _remember_located(self, handle: object) -> None:
        if not isinstance(handle, int) or not handle:
            return
        now = time.monotonic()
        with self._state:
            if len(self._located) > 100_000:  # leases expire on their own; forget old ones
                horizon = now - 3600
                self._located = {h: t for h, t in self._located.items() if t > horizon}
            self._located[handle] = now

    def _serve(self, conn: socket.socket) -> None:
        try:
            try:
                session, proved = server_handshake_any(
                    conn, self._keys, time.monotonic() + self.handshake_timeout_s, self.encrypt)
            except HandshakeRefused as exc:
                self._refuse(conn, exc)
                return
            channel = Connection(conn, session)
            while not self._stopping.is_set():
                request = self._read_request(channel)
                if request is None or proved not in self._keys:
                    break  # (a key retired since the handshake: the peer must reconnect)
                if request["type"] == "release":
                    self._release(request.get("handle"))
                    continue
                with self._state:
                    self._in_flight += 1
                try:
                    if request["type"] == "locate":
                        self._answer_locate(channel, request)
                    else:
                        self._answer(channel, request)
                finally:
                    with self._state:
                        self._in_flight -= 1
                        self._state.notify_all()
        except Exception as exc:  # one bad peer never takes the server down
            if not self._stopping.is_set():
                log.info("peer connection closed: %s", exc)
        finally:
            with self._state:
                self._connections.discard(conn)
            conn.close()

    def _answer_locate(self, conn: Connection | socket.socket, request: dict) -> None:
        conn = _as_connection(conn)
        if self.locator is None:
            reply = {"handle": 0, "chunks": [], "gens": []}
        else:
            reply = self.locator(request["keys"], request["lease_s"])
            self._remember_located(reply.get("handle"))
        conn.send_message(reply, time.monotonic() + self.send_timeout_s)

    def _answer(self, conn: Connection | socket.socket, request: dict) -> None:
        conn = _as_connection(conn)
        checksum = bool(request.get("checksum"))
        deadline = time.monotonic() + self.send_timeout_s
        for key in request["keys"]:
            found = self.source(key) if isinstance(key, bytes) else None
            if found is None:
                conn.send_chunk(CHUNK_HEADER.pack(STATUS_MISSING, 0, 0), [], deadline)
                return
            views, release = found
            try:
                nbytes = sum(v.nbytes for v in views)
                crc = crc32_of(views) if checksum else 0
                conn.send_chunk(CHUNK_HEADER.pack(STATUS_OK, crc, nbytes), views, deadline)
                self.bytes_served += nbytes
                self.chunks_served += 1
            finally:
                release()

    def stop(self, drain_timeout_s: float = 5.0) -> None:
        """Stop accepting, let in-flight requests finish (up to the timeout), close everything."""
        self._stopping.set()
        self._listener.close()
        deadline = time.monotonic() + drain_timeout_s
        with self._state:
            while self._in_flight and time.monotonic() < deadline:
                self._state.wait(timeout=0.05)
            for conn in list(self._connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if self._thread.ident is not None:  # (a server that never started has no thread)
            self._thread.join(timeout=1.0)
