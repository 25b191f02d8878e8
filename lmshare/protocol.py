"""The wire protocol: msgpack maps with a protocol version and a type.

Every request is ``{"v": PROTOCOL_VERSION, "type": <type>, "id": <int>, ...fields}``; every reply
is ``{"v": ..., "type": "ok" | "error", "id": <same id>, ...}``. :func:`decode` checks the
version, the type and the fields of every message against :data:`SCHEMAS`, so handlers only see
valid messages and a bad one gets an error reply, never a crash.
"""

from __future__ import annotations

from typing import Any

import msgpack

from lmshare.errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class ErrorCode:
    """Codes carried by error replies."""

    BAD_MESSAGE = "bad_message"
    BAD_VERSION = "bad_version"
    UNKNOWN_TYPE = "unknown_type"
    TOO_LARGE = "too_large"
    UNKNOWN_WORKER = "unknown_worker"
    UNKNOWN_NAMESPACE = "unknown_namespace"
    POOL_FULL = "pool_full"
    WORKER_RESTARTED = "worker_restarted"
    NOT_LEADER = "not_leader"
    NOT_FOUND = "not_found"
    INTERNAL = "internal"


_INT = (int,)
_STR = (str,)
_BYTES = (bytes,)
_LIST = (list, tuple)
_MAP = (dict,)
_BOOL = (bool,)
_NUM = (int, float)

# Required fields of each request type (beyond v/type/id), with the types they must have.
SCHEMAS: dict[str, dict[str, tuple[type, ...]]] = {
    # worker -> controller
    "register": {"worker_id": _STR, "host": _STR, "data_port": _INT, "transports": _LIST,
                 "capacity_bytes": _INT, "host_id": _STR},
    "heartbeat": {"worker_id": _STR, "epoch": _INT, "seq": _INT, "stats": _MAP},
    "batch": {"worker_id": _STR, "epoch": _INT, "seq": _INT, "admit": _MAP, "evict": _LIST},
    "sync": {"worker_id": _STR, "epoch": _INT, "seq": _INT, "part": _INT, "final": _BOOL,
             "entries": _MAP},
    "deregister": {"worker_id": _STR, "epoch": _INT},
    # anyone -> controller
    "lookup": {"namespace": _BYTES, "keys": _LIST},
    "stats": {},
    "ping": {},
    # client -> worker
    "hello": {},
    "local_lookup": {"namespace": _BYTES, "keys": _LIST, "peers": _BOOL},
    "reserve": {"namespace": _BYTES, "keys": _LIST, "sizes": _LIST},
    "commit": {"handles": _LIST},
    "abort": {"handles": _LIST},
    "acquire": {"namespace": _BYTES, "keys": _LIST, "peers": _BOOL, "lease_s": _NUM},
    "release": {"handle": _INT},
    "locate": {"keys": _LIST, "lease_s": _NUM},
    "worker_stats": {},
}

REPLY_TYPES = ("ok", "error")


def encode(message: dict[str, Any]) -> bytes:
    """Serialize a message; fills in the protocol version."""
    message.setdefault("v", PROTOCOL_VERSION)
    return msgpack.packb(message, use_bin_type=True)


def request(type_: str, request_id: int = 0, **fields: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "type": type_, "id": request_id, **fields}


def ok(request_id: int, **fields: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "type": "ok", "id": request_id, **fields}


def error(request_id: int, code: str, message: str) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "type": "error", "id": request_id, "code": code,
            "message": message}


def decode_raw(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """Decode and check the envelope (size, msgpack, map, version) of any message."""
    if len(data) > max_bytes:
        raise ProtocolError(f"{ErrorCode.TOO_LARGE}: message of {len(data)} bytes exceeds "
                            f"the limit of {max_bytes} bytes; send smaller batches")
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"{ErrorCode.BAD_MESSAGE}: not valid msgpack ({exc})") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"{ErrorCode.BAD_MESSAGE}: a message must be a msgpack map")
    version = message.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"{ErrorCode.BAD_VERSION}: protocol version {version!r} is not "
                            f"supported (this side speaks {PROTOCOL_VERSION}); upgrade lmshare "
                            "so both sides match")
    if not isinstance(message.get("type"), str):
        raise ProtocolError(f"{ErrorCode.BAD_MESSAGE}: message has no 'type' string")
    if not isinstance(message.setdefault("id", 0), int):
        raise ProtocolError(f"{ErrorCode.BAD_MESSAGE}: 'id' must be an integer")
    return message


def decode_request(data: bytes, allowed: set[str] | None = None,
                   max_bytes: int = MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """Decode a request and validate its fields against :data:`SCHEMAS`."""
    message = decode_raw(data, max_bytes)
    type_ = message["type"]
    schema = SCHEMAS.get(type_)
    if schema is None or (allowed is not None and type_ not in allowed):
        raise ProtocolError(f"{ErrorCode.UNKNOWN_TYPE}: unknown message type {type_!r}")
    for field, types in schema.items():
        if field not in message:
            raise ProtocolError(f"{ErrorCode.BAD_MESSAGE}: {type_!r} needs field {field!r}")
        value = message[field]
        if not isinstance(value, types) or (types is not _BOOL and isinstance(value, bool)
                                            and bool not in types):
            raise ProtocolError(f"{ErrorCode.BAD_MESSAGE}: field {field!r} of {type_!r} has "
                                f"type {type(value).__name__}")
    return message


def error_code_of(exc: ProtocolError) -> str:
    """The error code a ProtocolError message starts with."""
    code, _, _ = str(exc).partition(":")
    return code if code in vars(ErrorCode).values() else ErrorCode.BAD_MESSAGE
