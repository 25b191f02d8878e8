"""Encrypted records of the TCP data plane (``lmshare worker --encrypt``).

After a handshake that chose encryption (``lmshare/handshake.py``), every byte on a peer
connection travels in AES-256-GCM records:

- a message (request, locate reply): ``u32 length`` in the clear, then ``length`` bytes of
  ciphertext and a 16-byte tag; the length is the record's associated data;
- a chunk header: its 16 bytes sealed (32 bytes on the wire);
- a chunk body of ``nbytes``: records of :data:`RECORD_BYTES` (the last one shorter), each
  sealed on its own, so a reader checks every record before it takes the next.

Each direction has its own key, derived from the cluster's data-plane key and both sides'
fresh handshake nonces (so no two connections share a key), and its own 64-bit record counter
as the nonce: a nonce is never used twice under one key. A record that was altered, dropped,
replayed or reordered fails its tag: the reader raises :class:`TransferError`, drops the chunk
it was filling and closes the connection; bytes that failed their tag never reach a caller.
"""

from __future__ import annotations

import struct

from lmshare.errors import TransferError

TAG_BYTES = 16
RECORD_BYTES = 256 * 1024
MAX_RECORDS = 1 << 63  # a counter that would wrap ends the connection instead


class RecordKeys:
    """One direction's sealing state: the key and the next record number."""

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if len(key) != 32:
            raise ValueError("a record key is 32 bytes")
        self._aead = AESGCM(key)
        self._counter = 0

    def _nonce(self) -> bytes:
        if self._counter >= MAX_RECORDS:
            raise TransferError("record counter exhausted: reconnect")
        nonce = struct.pack("<4xQ", self._counter)
        self._counter += 1
        return nonce

    def seal_into(self, plain, out: memoryview, aad: bytes = b"") -> int:
        """Encrypt ``plain`` into ``out`` (``len(plain) + TAG_BYTES`` bytes); bytes written."""
        return self._aead.encrypt_into(self._nonce(), plain, aad, out)

    def open_into(self, sealed, out: memoryview, aad: bytes = b"") -> None:
        """Check and decrypt ``sealed`` (ciphertext + tag) into ``out``; TransferError when the
        tag does not match (``out`` then holds garbage the caller must drop)."""
        from cryptography.exceptions import InvalidTag

        try:
            self._aead.decrypt_into(self._nonce(), sealed, aad, out)
        except InvalidTag:
            raise TransferError("a data-plane record failed its authentication tag (altered "
                                "in transit, or not from this connection's peer)") from None


def record_sizes(nbytes: int) -> list[int]:
    """The plaintext sizes of the records of a body of ``nbytes``."""
    full, rest = divmod(nbytes, RECORD_BYTES)
    return [RECORD_BYTES] * full + ([rest] if rest else [])


def gather(views: list[memoryview], offset: int, size: int, scratch: memoryview) -> memoryview:
    """Bytes ``[offset, offset+size)`` of the concatenation of ``views``: a slice of one view
    when they lie in one, else copied into ``scratch``."""
    position = 0
    filled = 0
    for view in views:
        end = position + view.nbytes
        if end > offset and filled < size:
            start = max(offset, position) - position
            take = min(view.nbytes - start, size - filled)
            if filled == 0 and take == size:
                return view[start:start + take]
            scratch[filled:filled + take] = view[start:start + take]
            filled += take
        position = end
        if filled >= size:
            break
    return scratch[:size]


def scatter(source: memoryview, views: list[memoryview], offset: int) -> None:
    """Copy ``source`` to ``[offset, offset+len)`` of the concatenation of ``views``."""
    position = 0
    done = 0
    for view in views:
        end = position + view.nbytes
        if end > offset + done and done < source.nbytes:
            start = offset + done - position
            take = min(view.nbytes - start, source.nbytes - done)
            view[start:start + take] = source[done:done + take]
            done += take
        position = end
        if done >= source.nbytes:
            break


def target(views: list[memoryview], offset: int, size: int) -> memoryview | None:
    """The slice of one view that holds ``[offset, offset+size)``, or None if it spans more."""
    position = 0
    for view in views:
        end = position + view.nbytes
        if position <= offset and offset + size <= end:
            return view[offset - position:offset - position + size]
        if end > offset:
            return None
        position = end
    return None
