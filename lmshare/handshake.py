"""The data-plane handshake: a mutual HMAC challenge/response that opens every peer connection.

Before the first request on a TCP peer connection (and so before any KV byte moves):

  server → client: ``MAGIC`` + 32-byte server nonce
  client → server: 32-byte client nonce + HMAC(k, "client" | server nonce | client nonce)
  server → client: HMAC(k, "server" | client nonce | server nonce)

``k`` is the cluster key's data-plane key (all zeros for ``--insecure`` processes, which thus
only talk among themselves). Each side proves it holds ``k`` on a nonce the other chose fresh,
so a recorded handshake cannot be replayed and a peer without the key learns nothing.

Encryption in transit (``lmshare worker --encrypt``) is chosen inside the same three messages:
a client that wants it MACs with the role ``client+enc`` instead of ``client``; the server
encrypts when either side wants it and says so by MACing with ``server+enc``. Both roles are
bound to the key and the nonces, so nobody in between can turn encryption off. An encrypted
connection then carries AES-256-GCM records (``lmshare/transports/records.py``) under keys
derived from ``k`` and both nonces, one per direction; a plain one carries the bytes as they
are, authenticated at connection start only.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import time
from dataclasses import dataclass

from lmshare.credentials import ClusterKey

MAGIC = b"LMSHAKE1"
NONCE_BYTES = 32
MAC_BYTES = 32
INSECURE_KEY = bytes(32)


class HandshakeRefused(ConnectionError):
    """The other side does not hold the cluster key (or does not speak the handshake)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def data_key(key: ClusterKey | None) -> bytes:
    return key.data_key() if key is not None else INSECURE_KEY


@dataclass
class Session:
    """The record keys of an encrypted connection: what this side seals and what it opens."""

    send: object  # lmshare.transports.records.RecordKeys
    receive: object


def _session(key: bytes, server_nonce: bytes, client_nonce: bytes, server: bool) -> Session:
    from lmshare.transports.records import RecordKeys

    def derive(label: bytes) -> RecordKeys:
        return RecordKeys(hashlib.blake2b(label + server_nonce + client_nonce, key=key,
                                          digest_size=32).digest())

    to_server, to_client = derive(b"records:client->server"), derive(b"records:server->client")
    return Session(to_client, to_server) if server else Session(to_server, to_client)


def _role(name: bytes, encrypt: bool) -> bytes:
    return name + b"+enc" if encrypt else name


def _mac(key: bytes, role: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(key, role + first + second, hashlib.sha256).digest()


def _recv_exact(sock: socket.socket, count: int, deadline: float) -> bytes:
    data = bytearray()
    while len(data) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise HandshakeRefused("timeout", "handshake not finished in time")
        sock.settimeout(left)
        try:
            part = sock.recv(count - len(data))
        except TimeoutError:
            raise HandshakeRefused("timeout", "handshake not finished in time") from None
        if not part:
            raise HandshakeRefused("closed", "connection closed during the handshake")
        data += part
    return bytes(data)


def _send(sock: socket.socket, data: bytes, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise HandshakeRefused("timeout", "handshake not finished in time")
    sock.settimeout(left)
    sock.sendall(data)


def server_handshake(sock: socket.socket, key: bytes, deadline: float,
                     encrypt: bool = False) -> Session | None:
    """Run the server's side; raises HandshakeRefused (reason: bad_mac, timeout, closed).
    Returns the record keys when the connection is encrypted (``encrypt`` here, or the
    client asked for it), else None."""
    return server_handshake_any(sock, [key], deadline, encrypt)[0]


def server_handshake_any(sock: socket.socket, keys: list[bytes], deadline: float,
                         encrypt: bool = False) -> tuple[Session | None, bytes]:
    """:func:`server_handshake` accepting a client that proves any of ``keys`` (during a key
    rotation: the key in use and the next or previous one); also returns the key it proved."""
    server_nonce = secrets.token_bytes(NONCE_BYTES)
    _send(sock, MAGIC + server_nonce, deadline)
    answer = _recv_exact(sock, NONCE_BYTES + MAC_BYTES, deadline)
    client_nonce, mac = answer[:NONCE_BYTES], answer[NONCE_BYTES:]
    for key in keys:
        if hmac.compare_digest(mac, _mac(key, b"client", server_nonce, client_nonce)):
            asked = False
            break
        if hmac.compare_digest(mac, _mac(key, b"client+enc", server_nonce, client_nonce)):
            asked = True
            break
    else:
        raise HandshakeRefused("bad_mac", "the peer does not hold this cluster's key")
    encrypted = encrypt or asked
    _send(sock, _mac(key, _role(b"server", encrypted), client_nonce, server_nonce), deadline)
    return (_session(key, server_nonce, client_nonce, server=True) if encrypted else None), key


def client_handshake(sock: socket.socket, key: bytes, deadline: float,
                     encrypt: bool = False) -> Session | None:
    """Run the client's side; raises HandshakeRefused when the server is not a member.
    Returns the record keys when the connection is encrypted (``encrypt`` here, or the
    server encrypts all its connections), else None."""
    hello = _recv_exact(sock, len(MAGIC) + NONCE_BYTES, deadline)
    if hello[:len(MAGIC)] != MAGIC:
        raise HandshakeRefused("protocol", "the peer does not speak lmshare's data-plane "
                                           "handshake (an older lmshare, or not lmshare)")
    server_nonce = hello[len(MAGIC):]
    client_nonce = secrets.token_bytes(NONCE_BYTES)
    _send(sock, client_nonce + _mac(key, _role(b"client", encrypt), server_nonce, client_nonce),
          deadline)
    try:
        proof = _recv_exact(sock, MAC_BYTES, deadline)
    except HandshakeRefused as exc:
        if exc.reason == "closed":
            raise HandshakeRefused("bad_mac", "the peer refused this process's cluster key "
                                              "(another cluster's key, or --insecure)") from None
        raise
    if hmac.compare_digest(proof, _mac(key, b"server+enc", client_nonce, server_nonce)):
        return _session(key, server_nonce, client_nonce, server=False)
    if not encrypt and hmac.compare_digest(proof, _mac(key, b"server", client_nonce,
                                                       server_nonce)):
        return None
    raise HandshakeRefused("bad_mac", "the peer does not hold this cluster's key (or answered "
                                      "an encrypted handshake in the clear)")
