"""Encryption of KV bytes in transit (``lmshare worker --encrypt``): a wiretap between two
members sees no KV byte, a flipped bit costs the chunk it hit (a transfer error, the hit ends
there), never a wrong byte, and nobody in between can switch encryption off."""

import hashlib
import hmac
import os
import socket
import threading
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from lmshare import ModelSignature
from lmshare.handshake import MAGIC, NONCE_BYTES, HandshakeRefused, client_handshake, data_key
from lmshare.keys import signature_keys
from lmshare.pool import KVPool
from lmshare.testing.waiting import wait_until
from lmshare.transports import records
from lmshare.transports.base import PeerInfo
from lmshare.transports.tcp import TcpPeerServer, TcpTransport
from lmshare.worker.peer_fetch import PoolSink

from .conftest import run_cli

SIG = ModelSignature(model="encrypted-model", chunk_tokens=16)
MARKER = b"users-prompt-kv:" * 64
# sizes that are not multiples of a record, nor of the reader's slabs
SIZES = [records.RECORD_BYTES * 2 + 12_345, 70_000, records.RECORD_BYTES]
CHUNKS = [os.urandom(size - len(MARKER)) + MARKER for size in SIZES]


class Wiretap:
    """A TCP relay between a client and a server that records what the server sends and can
    flip one byte of it (at ``flip_at``, counted from the start of each connection)."""

    def __init__(self, target: tuple[str, int], flip_at: int | None = None) -> None:
        self.target, self.flip_at = target, flip_at
        self.seen = bytearray()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_server: bool) -> None:
        sent = 0
        try:
            while data := source.recv(1 << 16):
                data = bytearray(data)
                if from_server:
                    self.seen += data
                    if self.flip_at is not None and sent <= self.flip_at < sent + len(data):
                        data[self.flip_at - sent] ^= 0x01
                sent += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._listener.close()


def serve(key, encrypt: bool) -> tuple[TcpPeerServer, list[bytes]]:
    keys = signature_keys(SIG, list(range(16 * len(CHUNKS))))
    stored = dict(zip(keys, CHUNKS))

    def source(key_):
        data = stored.get(key_)
        return None if data is None else ([memoryview(data)], lambda: None)

    return TcpPeerServer(source, key=key, encrypt=encrypt).start(), keys


def fetch(transport: TcpTransport, port: int, keys: list[bytes]) -> tuple[int, list]:
    """(chunks fetched, what the reader's pool holds for each key) through ``port``."""
    reader = KVPool(8 << 20, 100_000, name=f"enc-reader-{os.getpid()}-{port}")
    try:
        got = transport.fetch(PeerInfo("holder", "127.0.0.1", port), keys,
                              PoolSink(reader, SIG.namespace()), time.monotonic() + 10)
        return got, [reader.read(k) if reader.contains(k) else None for k in keys]
    finally:
        reader.close()


def test_a_wiretap_sees_no_kv_byte_when_either_side_encrypts(cluster):
    for server_encrypts, client_encrypts in ((False, False), (True, False), (False, True)):
        server, keys = serve(cluster.key, server_encrypts)
        tap = Wiretap((server.host, server.port))
        transport = TcpTransport(key=cluster.key, encrypt=client_encrypts)
        try:
            got, held = fetch(transport, tap.port, keys)
            assert got == len(CHUNKS) and held == CHUNKS  # every byte arrives intact
            assert len(tap.seen) > sum(SIZES)
            if server_encrypts or client_encrypts:
                assert MARKER[:32] not in tap.seen
            else:  # the tap does see plain KV: the check above can fail
                assert MARKER in tap.seen
        finally:
            transport.close()
            tap.close()
            server.stop()


def test_a_flipped_byte_costs_its_chunk_never_a_wrong_byte(cluster):
    server, keys = serve(cluster.key, True)
    handshake = 8 + 32 + 32  # server hello + proof, before the first record
    second_chunk = handshake + 32 + SIZES[0] + 16 * len(records.record_sizes(SIZES[0])) + 32
    try:
        for flip_at, intact in ((second_chunk + 1000, 1),  # in the 2nd chunk's body
                                (second_chunk - 10, 1),  # in the 2nd chunk's header
                                (handshake + 40, 0),  # in the 1st chunk's body
                                (handshake + 5, 0)):  # in the 1st chunk's header
            tap = Wiretap((server.host, server.port), flip_at=flip_at)
            transport = TcpTransport(key=cluster.key, encrypt=True)
            try:
                got, held = fetch(transport, tap.port, keys)
                assert got == intact, flip_at
                assert held == CHUNKS[:intact] + [None] * (len(CHUNKS) - intact)
                assert not transport._idle  # the connection was dropped, never reused
                # a fresh connection without tampering gets everything again
                assert fetch(transport, server.port, keys)[1] == CHUNKS
            finally:
                transport.close()
                tap.close()
    finally:
        server.stop()


def test_a_client_that_asks_for_encryption_never_gets_plain_bytes(cluster):
    """A server that answers an encrypted handshake with a plain proof (a rogue member; a
    relay trying to switch encryption off cannot compute either proof) is refused before any
    request is sent."""
    k = data_key(cluster.key)
    for role, expected in ((b"server", "bad_mac"), (b"server+enc", "encrypted")):
        left, right = socket.socketpair()
        server_nonce = os.urandom(NONCE_BYTES)

        def answer(role=role, right=right, server_nonce=server_nonce):
            right.sendall(MAGIC + server_nonce)
            client_nonce = right.recv(NONCE_BYTES + 32, socket.MSG_WAITALL)[:NONCE_BYTES]
            right.sendall(hmac.new(k, role + client_nonce + server_nonce,
                                   hashlib.sha256).digest())

        thread = threading.Thread(target=answer)
        thread.start()
        try:
            session = client_handshake(left, k, time.monotonic() + 5, encrypt=True)
            outcome = "encrypted" if session is not None else "plain"
        except HandshakeRefused as exc:
            outcome = exc.reason
        thread.join()
        left.close()
        right.close()
        assert outcome == expected, role


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 3000), min_size=1, max_size=6), st.data())
def test_records_gather_and_scatter_any_layout(sizes, data):
    total = sum(sizes)
    blob = os.urandom(total)
    views, position = [], 0
    for size in sizes:
        views.append(memoryview(bytearray(blob[position:position + size])))
        position += size
    offset = data.draw(st.integers(0, total - 1))
    size = data.draw(st.integers(1, total - offset))
    scratch = memoryview(bytearray(total))
    assert bytes(records.gather(views, offset, size, scratch)) == blob[offset:offset + size]
    piece = os.urandom(size)
    records.scatter(memoryview(piece), views, offset)
    joined = b"".join(bytes(v) for v in views)
    assert joined == blob[:offset] + piece + blob[offset + size:]
    one = records.target(views, offset, size)
    assert one is None or bytes(one) == piece


def test_encrypting_workers_through_the_cli(cluster):
    cluster.start_controller()
    cluster.start_worker("enc-holder", "16MiB", "--encrypt", "--transports", "tcp")
    cluster.start_worker("enc-reader", "16MiB", "--encrypt", "--transports", "tcp")
    tokens = list(range(16 * len(CHUNKS)))
    with cluster.client("enc-holder") as holder, cluster.client("enc-reader") as reader:
        holder.put(SIG, tokens, CHUNKS)
        wait_until(lambda: reader.lookup(SIG, tokens).peer_tokens == len(tokens), 10, "index")
        assert reader.get(SIG, tokens) == CHUNKS  # fetched over encrypted TCP
        assert reader.stats()["counters"]["peer_hit_chunks"] >= len(CHUNKS)
        # the holder encrypts for a client that did not ask: a tap sees no KV byte
        worker = next(w for w in cluster.stats().workers if w.worker_id == "enc-holder")
        host, port = worker.address.rsplit(":", 1)
        tap = Wiretap((host, int(port)))
        transport = TcpTransport(key=cluster.key)
        try:
            keys = signature_keys(SIG, tokens)
            assert fetch(transport, tap.port, keys)[1] == CHUNKS
            assert MARKER[:32] not in tap.seen
        finally:
            transport.close()
            tap.close()


def test_encrypt_without_a_key_is_refused():
    done = run_cli("worker", "--controller", "127.0.0.1:1", "--insecure", "--encrypt",
                   timeout=30)
    assert done.returncode != 0
    assert "--encrypt needs a cluster key" in done.stderr


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 1, 7]), st.integers(0, 300_000) |
                          st.sampled_from([2**40, 2**64 - 1])), min_size=1, max_size=4),
       st.integers(0, 3), st.booleans(), st.binary(max_size=64))
def test_a_member_sending_any_records_never_gets_wrong_bytes_kept(chunks, cut, garble, tail):
    """A holder holding the key (so its records pass their tags) announcing any sizes and
    statuses, cutting the stream or sending garbage: the reader keeps only chunks whose every
    byte it received, and leaves no reservation behind."""
    from lmshare.handshake import server_handshake_any
    from lmshare.transports.tcp import CHUNK_HEADER, Connection

    key = bytes(range(32))
    keys = [(7 + i).to_bytes(16, "big") for i in range(len(chunks))]
    bodies = [os.urandom(min(n, 300_000)) for _, n in chunks]
    ours, theirs = socket.socketpair()

    def holder():
        try:
            session, _ = server_handshake_any(theirs, [key], time.monotonic() + 5, True)
            conn = Connection(theirs, session)
            conn.recv_message(time.monotonic() + 5)
            for index, ((status, nbytes), body) in enumerate(zip(chunks, bodies)):
                if index == cut:
                    theirs.sendall(tail if garble else b"")
                    break
                header = CHUNK_HEADER.pack(status, 0, nbytes)
                conn.send_chunk(header, [memoryview(body)] if status == 0 else [],
                                time.monotonic() + 5)
        except OSError:
            pass
        finally:
            theirs.close()

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    pool = KVPool(4 << 20, 64 << 10, name=f"enc-fuzz-{os.getpid()}")
    try:
        session = client_handshake(ours, key, time.monotonic() + 5, encrypt=True)
        delivered, _ = TcpTransport(key=None)._fetch_on(
            Connection(ours, session), PeerInfo("p", "127.0.0.1", 1), keys,
            PoolSink(pool, SIG.namespace()), time.monotonic() + 2, False)
        assert pool.stats().reserved_bytes == 0
        for index in range(delivered):  # only whole chunks, exactly as sent
            assert pool.read(keys[index]) == bodies[index]
        assert all(not pool.contains(k) for k in keys[delivered:])
    finally:
        ours.close()
        thread.join(timeout=5)
        pool.close()
