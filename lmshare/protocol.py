"""The wire protocol: msgpack maps with a protocol version and a type.

Every request is ``{"v": PROTOCOL_VERSION, "type": <type>, "id": <int>, ...fields}``; every reply
is ``{"v": ..., "type": "ok" | "error", "id": <same id>, ...}``. :func:`decode` checks the
version, the type and the fields of every message against :data:`SCHEMAS`, so handlers only see
valid messages and a bad one gets an error reply, never a crash.
"""

from __future__ import annotations

from typing import Any

import msgpack

from lmshare.errors import ErrorCode, ProtocolError
from lmshare.keys import KEY_BYTES
from lmshare.schema import (
    I64_MAX,
    Bool,
    Bytes,
    Float,
    Int,
    KeyMap,
    List,
    Map,
    Optional,
    Scalar,
    Spec,
    Str,
)
from lmshare.signatures import WIRE as _SIGNATURE

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


# Bounds of what one message may carry (the whole message is also capped in bytes).
MAX_KEYS = 65536  # chunk keys in one request, or in one batch or sync part
MAX_NAME = 200  # worker ids
MAX_HOST = 255  # host names and host ids
MAX_LEASE_S = 86400.0  # the worker clamps a lease further (its --max-lease)
# the defaults of the leases the protocol grants (one place for each)
DEFAULT_LEASE_S = 30.0  # an acquire's pin on what a client got, unless it asks for another
READ_LEASE_S = 5.0  # a locate's pin on a peer's chunks while a one-sided reader copies them
MAX_COUNTER = 2**62  # a heartbeat counter (monotonic, since the worker started)
MAX_ERROR_TEXT = 1000  # characters of an error reply's message
MAX_HOLDERS = 64  # workers an acquire's plan names for one chunk

_KEY = Bytes(exact=KEY_BYTES)
_KEYS = List(_KEY, MAX_KEYS)
_EPOCH = Int(0, I64_MAX)
_HANDLE = Int(0, I64_MAX)
_LEASE = Float(0.0, MAX_LEASE_S)
_WORKER = Str(MAX_NAME, min_len=1)
# chunk key → the digest its writer recorded (with admits; see controller/digests.py)
# the tenant a local client stores and fetches as (its ModelSignature's; lmshare/tenancy.py)
_TENANT = Optional(Str(64))
_DIGESTS = Optional(Map(_KEY, Bytes(exact=16), MAX_KEYS))

# The fields of each request type (beyond v/type/id), each typed and bounded; absent fields
# are refused unless marked Optional. Unknown fields are ignored.
SCHEMAS: dict[str, dict[str, Spec]] = {
    # worker -> controller
    "register": {"worker_id": _WORKER, "host": Str(MAX_HOST), "data_port": Int(1, 65535),
                 "transports": List(Str(16), 8), "capacity_bytes": Int(0, MAX_COUNTER),
                 "host_id": Str(MAX_HOST),
                 "extra": Optional(Map(Str(64), Scalar(16 * 1024), 64)),
                 # random per worker process: a retried registration gets the same epoch
                 "instance": Optional(Bytes(exact=16))},
    "heartbeat": {"worker_id": _WORKER, "epoch": _EPOCH, "seq": Int(0, I64_MAX),
                  "stats": Map(Str(64), Int(0, MAX_COUNTER), 64),
                  # namespace its clients look up → [chunk tokens, lookups] (read by routers)
                  "namespaces": Optional(Map(_KEY, List(Int(0, MAX_COUNTER), 2), 16)),
                  # the signatures behind those namespaces (read by the controller's diagnosis)
                  "signatures": Optional(Map(_KEY, _SIGNATURE, 16)),
                  # tenant ("" = the cluster key's) → its figures in the pool (TENANT_FIGURES)
                  "tenants": Optional(Map(Str(64), Map(Str(32), Int(0, MAX_COUNTER), 16), 64))},
    "batch": {"worker_id": _WORKER, "epoch": _EPOCH, "seq": Int(0, I64_MAX),
              "admit": KeyMap(KEY_BYTES, MAX_KEYS), "evict": _KEYS, "digests": _DIGESTS},
    "sync": {"worker_id": _WORKER, "epoch": _EPOCH, "seq": Int(0, I64_MAX),
             "part": Int(0, 1 << 24), "final": Bool(), "entries": KeyMap(KEY_BYTES, MAX_KEYS),
             "digests": _DIGESTS},
    "deregister": {"worker_id": _WORKER, "epoch": _EPOCH},
    # a leaving worker's chunks (most recently used first) and their sizes, to hand to peers;
    # without keys: how far the hand-off got
    "handoff": {"worker_id": _WORKER, "epoch": _EPOCH, "keys": Optional(_KEYS),
                "sizes": Optional(List(Int(0, 1 << 40), MAX_KEYS))},
    # anyone -> controller
    "lookup": {"namespace": _KEY, "keys": _KEYS},
    "explain": {"namespace": _KEY, "keys": _KEYS},  # what is known of each chunk (read-only)
    "stats": {"offset": Optional(Int(0, I64_MAX)), "limit": Optional(Int(1, 100_000))},
    "ping": {},
    # client -> worker
    "hello": {"challenge": Optional(Bytes(exact=32))},
    "local_lookup": {"namespace": _KEY, "keys": _KEYS, "peers": Bool(),
                     "count": Optional(Bool()), "chunk_tokens": Optional(Int(1, 1 << 20)),
                     # offer a peer chunk to fetch only if fetching beats recomputing it
                     "recompute_tokens_per_s": Optional(Float(1e-3, 1e12)),
                     "chunk_bytes": Optional(Int(1, 1 << 40)), "direct": Optional(Bool()),
                     # the signature behind the namespace (reported to the controller)
                     "signature": Optional(_SIGNATURE),
                     # tokens after the last full chunk (counted as one partial_chunk miss),
                     # and how long the asker waits: a reply later than that counts as missed
                     "tail_tokens": Optional(Int(0, 1 << 20)),
                     "deadline_ms": Optional(Int(1, 86_400_000))},
    "reserve": {"namespace": _KEY, "keys": _KEYS, "sizes": List(Int(0, 1 << 40), MAX_KEYS),
                "incarnation": Optional(Str(64)), "tenant": _TENANT},
    "commit": {"handles": List(_HANDLE, MAX_KEYS), "incarnation": Optional(Str(64))},
    "abort": {"handles": List(_HANDLE, MAX_KEYS), "incarnation": Optional(Str(64))},
    "acquire": {"namespace": _KEY, "keys": _KEYS, "peers": Bool(), "lease_s": _LEASE,
                "direct": Optional(Bool()), "incarnation": Optional(Str(64)), "tenant": _TENANT,
                "chunk_bytes": Optional(Int(1, 1 << 40)),
                # a local_lookup's plan: per key, the workers holding it ([]: held here)
                "holders": Optional(List(List(_WORKER, MAX_HOLDERS), MAX_KEYS))},
    "release": {"handle": _HANDLE, "incarnation": Optional(Str(64))},
    "worker_stats": {},
    "drain": {},  # hand this worker's chunks to peers, then leave (lmshare drain)
    # peer -> worker, on the TCP data port (``release`` as above; ``locate`` and its reply:
    # lmshare/transports/locate.py)
    "fetch": {"keys": _KEYS, "checksum": Optional(Bool())},
    "locate": {"keys": _KEYS, "lease_s": _LEASE},
}


def encode(message: dict[str, Any]) -> bytes:
    """Serialize a message; fills in the protocol version. Raises ProtocolError (code
    ``internal``) for a value msgpack cannot carry, e.g. an integer beyond 64 bits."""
    message.setdefault("v", PROTOCOL_VERSION)
    try:
        return msgpack.packb(message, use_bin_type=True)
    except (OverflowError, TypeError, ValueError) as exc:
        raise ProtocolError(f"cannot encode {message.get('type')!r:.20} message ({exc})",
                            code=ErrorCode.INTERNAL) from None


def encode_reply(reply: dict[str, Any]) -> bytes:
    """Serialize a reply; one that cannot be encoded becomes an ``internal`` error reply, so
    no reply can stop the loop that sends it."""
    try:
        return encode(reply)
    except ProtocolError as exc:
        return encode(error(reply.get("id", 0) if type(reply.get("id")) is int else 0,
                            ErrorCode.INTERNAL, str(exc)))


def request(type_: str, request_id: int = 0, **fields: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "type": type_, "id": request_id, **fields}


def ok(request_id: int, **fields: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "type": "ok", "id": request_id, **fields}


def error(request_id: int, code: str, message: str) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "type": "error", "id": request_id, "code": code,
            "message": message[:MAX_ERROR_TEXT]}


def decode_raw(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """Decode and check the envelope (size, msgpack, map, version) of any message."""
    if len(data) > max_bytes:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the limit of {max_bytes} "
                            "bytes; send smaller batches", code=ErrorCode.TOO_LARGE)
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"not valid msgpack ({exc})") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a msgpack map")
    version = message.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r:.20} is not supported (this side "
                            f"speaks {PROTOCOL_VERSION}); upgrade lmshare so both sides match",
                            code=ErrorCode.BAD_VERSION)
    if not isinstance(message.get("type"), str):
        raise ProtocolError("message has no 'type' string")
    if type(message.setdefault("id", 0)) is not int:
        raise ProtocolError("'id' must be an integer")
    return message


def decode_request(data: bytes, allowed: set[str] | None = None,
                   max_bytes: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """Decode a request and validate its fields against :data:`SCHEMAS`."""
    message = decode_raw(data, max_bytes)
    type_ = message["type"]
    schema = SCHEMAS.get(type_)
    if schema is None or (allowed is not None and type_ not in allowed):
        exc = ProtocolError(f"unknown message type {type_!r:.60}", code=ErrorCode.UNKNOWN_TYPE)
        exc.request_id = message["id"]
        raise exc
    try:
        for field, spec in schema.items():
            if field not in message:
                if type(spec) is Optional:
                    continue
                raise ProtocolError(f"{type_!r} needs field {field!r}")
            message[field] = spec.check(message[field], f"{field!r} of {type_!r}")
    except ProtocolError as exc:
        exc.request_id = message["id"]  # the refusal answers this request
        raise
    return message

