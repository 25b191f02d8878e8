"""Keys: what makes two KV chunks the same.

A :class:`ModelSignature` names everything that changes the bytes of a KV cache. Its hash is the
*namespace*. Token ids are cut into fixed chunks; chunk ``i``'s key is a chained 128-bit hash

    key_0 = H(namespace || tokens[0:C]),   key_i = H(key_{i-1} || tokens[i*C:(i+1)*C])

so a key names the whole prefix up to the end of its chunk, in that namespace. Keys are content
hashes (blake2b), identical in every process, never Python's salted ``hash()``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack

from lmshare.errors import ConfigError

KEY_BYTES = 16
DEFAULT_CHUNK_TOKENS = 256


@dataclass(frozen=True)
class ModelSignature:
    """Everything that changes the bytes of a model's KV cache. Equal signatures share KV."""

    model: str
    revision: str = ""
    tokenizer_hash: str = ""
    kv_dtype: str = "bfloat16"
    kv_layout: str = ""  # e.g. "layers=32,kv_heads=8,head_dim=128,block=16,backend=flash"
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    rope_scaling: str = ""
    quantization: str = ""
    lora_adapter: str = ""
    tp_size: int = 1
    tp_rank: int = 0
    tenant: str = ""

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("ModelSignature needs a model id (the name or path vLLM serves)")
        if self.chunk_tokens <= 0:
            raise ConfigError(f"chunk_tokens must be positive, got {self.chunk_tokens}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ConfigError(f"tp_rank {self.tp_rank} is outside tp_size {self.tp_size}")

    def namespace(self) -> bytes:
        """The 16-byte namespace: a hash of every field, in a fixed order."""
        fields = sorted(dataclasses.asdict(self).items())
        return hashlib.blake2b(
            msgpack.packb(fields), digest_size=KEY_BYTES, person=b"lmshare-ns-v1"
        ).digest()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelSignature:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown model signature fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


def _token_bytes(tokens: Sequence[int]) -> bytes:
    try:
        return struct.pack(f"<{len(tokens)}I", *tokens)
    except struct.error as exc:
        raise ConfigError(f"token ids must be integers in [0, 2**32): {exc}") from None


def chunk_keys(namespace: bytes, token_ids: Sequence[int], chunk_tokens: int) -> list[bytes]:
    """Chained keys of every *full* chunk of ``token_ids`` (a trailing partial chunk has none)."""
    if len(namespace) != KEY_BYTES:
        raise ConfigError(f"namespace must be {KEY_BYTES} bytes, got {len(namespace)}")
    keys: list[bytes] = []
    previous = namespace
    for start in range(0, len(token_ids) - chunk_tokens + 1, chunk_tokens):
        digest = hashlib.blake2b(previous, digest_size=KEY_BYTES, person=b"lmshare-chunk-v1")
        digest.update(_token_bytes(token_ids[start : start + chunk_tokens]))
        previous = digest.digest()
        keys.append(previous)
    return keys


def signature_keys(signature: ModelSignature, token_ids: Sequence[int]) -> list[bytes]:
    """Chunk keys of ``token_ids`` under ``signature``'s namespace and chunk size."""
    return chunk_keys(signature.namespace(), token_ids, signature.chunk_tokens)
