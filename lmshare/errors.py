"""Error types. Every message says what went wrong and what to do about it.

Every error carries a ``code`` (one of :class:`ErrorCode`): a class-level default that a raise
may override (``LMShareError("...", code=ErrorCode.NOT_FOUND)``). Error replies carry the code
next to the message, and a refused request raises :class:`RemoteError` with the code it was
refused with: codes are read from the attribute, never from the text.
"""

from __future__ import annotations


class ErrorCode:
    """Codes carried by errors and error replies."""

    BAD_MESSAGE = "bad_message"
    BAD_VERSION = "bad_version"
    UNKNOWN_TYPE = "unknown_type"
    TOO_LARGE = "too_large"
    UNKNOWN_WORKER = "unknown_worker"
    UNKNOWN_NAMESPACE = "unknown_namespace"
    POOL_FULL = "pool_full"
    WORKER_RESTARTED = "worker_restarted"
    NOT_LEADER = "not_leader"
    WRONG_SHARD = "wrong_shard"  # keys another controller shard owns (lmshare/shards.py)
    WRONG_PORT = "wrong_port"  # a message the controller's lookup port does not serve
    NOT_FOUND = "not_found"
    BUSY = "busy"  # the worker's request queue is full or the request waited past its deadline
    INTERNAL = "internal"


ERROR_CODES = frozenset(v for k, v in vars(ErrorCode).items() if not k.startswith("_"))


class LMShareError(Exception):
    """Base class of every error lmshare raises on purpose; ``code`` says which kind it is."""

    code = ErrorCode.INTERNAL

    def __init__(self, *args: object, code: str | None = None) -> None:
        super().__init__(*args)
        if code is not None:
            self.code = code


class ConfigError(LMShareError):
    """Bad configuration or command-line input (a size, an address, a missing option)."""


class ProtocolError(LMShareError):
    """A message that cannot be decoded or is not valid for the protocol."""

    code = ErrorCode.BAD_MESSAGE
    request_id = 0  # the id of the refused request, when it could be read (for the reply)


class RemoteError(LMShareError):
    """The other side answered with an error reply: ``code`` and ``message`` are the reply's."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}", code=code)
        self.message = message


class ControllerUnavailable(LMShareError):
    """The controller did not answer before the deadline."""


class WorkerUnavailable(LMShareError):
    """The local worker did not answer before the deadline."""


class WorkerRestarted(WorkerUnavailable):
    """The local worker was restarted since this client mapped its pool: make a new Client."""

    code = ErrorCode.WORKER_RESTARTED


class PoolFullError(LMShareError):
    """The pool has no free slabs and every entry is pinned or being written."""

    code = ErrorCode.POOL_FULL


class EntryTooLarge(LMShareError):
    """An entry is larger than the whole pool."""

    code = ErrorCode.TOO_LARGE


class TransferError(LMShareError):
    """A peer transfer failed or missed its deadline. The hit is truncated, never wrong."""
