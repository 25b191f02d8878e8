"""The request/reply skeleton every lmshare service shares: decode, dispatch, error reply.

A request is decoded and validated against :data:`lmshare.protocol.SCHEMAS` once
(:func:`decode`), run by its handler (:func:`run`), and anything a handler raises becomes an
error reply: an :class:`~lmshare.errors.LMShareError` with its own ``code``, anything else
``internal`` (and is logged). A bad message costs its sender an error reply, never the service.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from lmshare import protocol
from lmshare.errors import ErrorCode, LMShareError, ProtocolError

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def error_reply(exc: BaseException, request_id: int) -> dict[str, Any]:
    """The error reply for ``exc`` raised while answering request ``request_id``."""
    if isinstance(exc, LMShareError):
        if isinstance(exc, ProtocolError) and exc.request_id:
            request_id = exc.request_id
        return protocol.error(request_id, exc.code, str(exc))
    log.error("request %d failed", request_id, exc_info=exc)
    return protocol.error(request_id, ErrorCode.INTERNAL, f"internal error: {exc}")


def decode(payload: bytes, allowed: set[str],
           max_bytes: int = protocol.MAX_MESSAGE_BYTES) -> tuple[dict[str, Any] | None,
                                                                dict[str, Any] | None]:
    """``(request, None)`` for a valid request of one of the ``allowed`` types, else
    ``(None, error reply)``."""
    try:
        return protocol.decode_request(payload, allowed, max_bytes), None
    except ProtocolError as exc:
        return None, error_reply(exc, exc.request_id)


def run(handler: Handler, message: dict[str, Any]) -> dict[str, Any]:
    """The reply of ``handler`` to a decoded ``message`` (an ok reply gets the request's id),
    or the error reply for what it raised. Never raises."""
    request_id = message["id"]
    try:
        reply = handler(message)
    except Exception as exc:  # every failure becomes an error reply
        return error_reply(exc, request_id)
    reply.setdefault("v", protocol.PROTOCOL_VERSION)
    reply.setdefault("type", "ok")
    reply["id"] = request_id
    return reply


def answer(payload: bytes, allowed: set[str], handler: Handler,
           max_bytes: int = protocol.MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """Decode one request and run ``handler`` on it: the reply to send. Never raises."""
    message, refusal = decode(payload, allowed, max_bytes)
    return refusal if message is None else run(handler, message)
