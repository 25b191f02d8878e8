"""The data port of a keyed worker, attacked with raw sockets: nothing without the handshake,
no replay, no data from or to a worker without the key, and the port can never end a local
client's lease."""

import hashlib
import hmac
import os
import socket
import struct
import time

import msgpack

from lmshare import ModelSignature
from lmshare.credentials import generate_key_file
from lmshare.handshake import MAGIC, NONCE_BYTES, client_handshake, data_key
from lmshare.keys import signature_keys
from lmshare.pool import KVPool
from lmshare.protocol import PROTOCOL_VERSION
from lmshare.testing.waiting import wait_until
from lmshare.transports.base import PeerInfo
from lmshare.transports.tcp import REQUEST_LENGTH, TcpTransport
from lmshare.worker.peer_fetch import PoolSink

SIG = ModelSignature(model="data-plane-attack", chunk_tokens=16)
TOKENS = list(range(16 * 3))
SECRET_KV = [os.urandom(50_000) + b"users-prompt-kv" for _ in range(3)]


def request(message: dict) -> bytes:
    body = msgpack.packb(message)
    return REQUEST_LENGTH.pack(len(body)) + body


def holder_address(cluster, name: str) -> tuple[str, int]:
    worker = next(w for w in cluster.stats().workers if w.worker_id == name)
    host, port = worker.address.rsplit(":", 1)
    return host, int(port)


def read_all(sock: socket.socket, timeout_s: float = 2.0) -> bytes:
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(1 << 20):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def test_data_port_gives_nothing_without_the_key(cluster, tmp_path):
    cluster.start_controller()
    cluster.start_worker("holder", "32MiB")
    with cluster.client("holder") as holder:
        holder.put(SIG, TOKENS, SECRET_KV)
        keys = signature_keys(SIG, TOKENS)
        address = holder_address(cluster, "holder")
        fetch = request({"v": PROTOCOL_VERSION, "type": "fetch", "keys": keys,
                         "checksum": False})

        # 1. a request straight away, no handshake: closed, no KV byte
        with socket.create_connection(address, timeout=2) as raw:
            raw.sendall(fetch)
            answer = read_all(raw)
        assert answer[:len(MAGIC)] == MAGIC and len(answer) == len(MAGIC) + NONCE_BYTES
        assert b"users-prompt-kv" not in answer

        # 2. a made-up MAC, then the request: closed, no KV byte
        with socket.create_connection(address, timeout=2) as raw:
            hello = raw.recv(len(MAGIC) + NONCE_BYTES, socket.MSG_WAITALL)
            raw.sendall(os.urandom(NONCE_BYTES) + os.urandom(32) + fetch)
            assert b"users-prompt-kv" not in read_all(raw)

        # 3. a replay: a member's recorded handshake answer does not open a new connection
        k = data_key(cluster.key)
        with socket.create_connection(address, timeout=2) as raw:
            hello = raw.recv(len(MAGIC) + NONCE_BYTES, socket.MSG_WAITALL)
            nonce = os.urandom(NONCE_BYTES)
            recorded = nonce + hmac.new(k, b"client" + hello[len(MAGIC):] + nonce,
                                        hashlib.sha256).digest()
            raw.sendall(recorded)
            assert len(raw.recv(32, socket.MSG_WAITALL)) == 32  # this one was fresh: accepted
        with socket.create_connection(address, timeout=2) as raw:
            raw.recv(len(MAGIC) + NONCE_BYTES, socket.MSG_WAITALL)
            raw.sendall(recorded + fetch)
            assert b"users-prompt-kv" not in read_all(raw)

        # 4. an lmshare worker of another cluster, or --insecure: fetches nothing
        other = generate_key_file(tmp_path / "other.key")
        reader = KVPool(16 << 20, name="attacker")
        try:
            peer = PeerInfo("holder", *address)
            for transport in (TcpTransport(key=other), TcpTransport()):
                got = transport.fetch(peer, keys, PoolSink(reader, SIG.namespace()),
                                      time.monotonic() + 3)
                assert got == 0 and reader.stats().entries == 0
            # a member (this cluster's key) does get the bytes: the refusals were the key's
            member = TcpTransport(key=cluster.key)
            assert member.fetch(peer, keys, PoolSink(reader, SIG.namespace()),
                                time.monotonic() + 5) == 3
            assert reader.read(keys[2]) == SECRET_KV[2]
            member.close()
        finally:
            reader.close()

        # refused, counted and logged once per address; the holder serves on
        counters = wait_until(lambda: (c := holder.stats()["counters"])
                              ["refused_connections"] >= 5 and c, 5, "refusals counted")
        assert counters["refused_connections"] >= 5
        log = cluster.workers["holder"].log_text()
        assert log.count("data port refused a connection from 127.0.0.1") == 1, log
        assert holder.get(SIG, TOKENS) == SECRET_KV


def test_release_on_the_data_port_never_ends_a_local_clients_lease(cluster):
    cluster.start_controller()
    cluster.start_worker("holder", "32MiB")
    with cluster.client("holder") as holder:
        holder.put(SIG, TOKENS, SECRET_KV)
        keys = signature_keys(SIG, TOKENS)
        hit = holder.acquire(SIG, TOKENS)
        assert len(hit) == 3 and hit.handle
        leases = holder.stats()["leases"]
        address = holder_address(cluster, "holder")
        # an authenticated peer (it holds the key) forges releases of every small handle and
        # of the client's real one
        with socket.create_connection(address, timeout=2) as sock:
            client_handshake(sock, data_key(cluster.key), time.monotonic() + 2)
            for handle in [*range(1, 200), hit.handle]:
                sock.sendall(request({"v": PROTOCOL_VERSION, "type": "release",
                                      "handle": handle}))
            # the same connection still answers (a round trip after the releases)
            sock.sendall(request({"v": PROTOCOL_VERSION, "type": "locate", "keys": keys[:1],
                                  "lease_s": 1.0}))
            (length,) = struct.unpack("<I", sock.recv(4, socket.MSG_WAITALL))
            located = msgpack.unpackb(sock.recv(length, socket.MSG_WAITALL))
            assert located["chunks"]
            # its own locate lease it may end
            sock.sendall(request({"v": PROTOCOL_VERSION, "type": "release",
                                  "handle": located["handle"]}))
        wait_until(lambda: holder.stats()["leases"] == leases, 5, "the peer's own lease to end")
        assert holder.stats()["counters"]["pinned_entries"] == 3  # the client's pins stand
        assert [hit.read(i) for i in range(3)] == SECRET_KV and hit.verify(0)
        hit.release()
        wait_until(lambda: holder.stats()["leases"] == leases - 1, 5, "the client's release")
