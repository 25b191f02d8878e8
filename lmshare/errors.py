"""Error types. Every message says what went wrong and what to do about it."""

from __future__ import annotations


class LMShareError(Exception):
    """Base class of every error lmshare raises on purpose."""


class ConfigError(LMShareError):
    """Bad configuration or command-line input (a size, an address, a missing option)."""


class ProtocolError(LMShareError):
    """A message that cannot be decoded or is not valid for the protocol."""

    request_id = 0  # the id of the refused request, when it could be read (for the reply)


class RemoteError(LMShareError):
    """The other side answered with an error; ``code`` names it (see ``protocol.ErrorCode``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ControllerUnavailable(LMShareError):
    """The controller did not answer before the deadline."""


class WorkerUnavailable(LMShareError):
    """The local worker did not answer before the deadline."""


class WorkerRestarted(WorkerUnavailable):
    """The local worker was restarted since this client mapped its pool: make a new Client."""


class PoolFullError(LMShareError):
    """The pool has no free slabs and every entry is pinned or being written."""


class EntryTooLarge(LMShareError):
    """An entry is larger than the whole pool."""


class TransferError(LMShareError):
    """A peer transfer failed or missed its deadline. The hit is truncated, never wrong."""
