"""One error type carrying a code: every lmshare error has one, and an error reply carries the
code of what its handler raised (never parsed back out of the message text)."""

from __future__ import annotations

import pytest

from lmshare import errors, protocol, serving
from lmshare.errors import (
    ERROR_CODES,
    EntryTooLarge,
    ErrorCode,
    LMShareError,
    PoolFullError,
    ProtocolError,
    RemoteError,
    WorkerRestarted,
)


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_every_error_type_has_a_known_code():
    types = [LMShareError, *_subclasses(LMShareError)]
    assert {t.__name__ for t in types} >= {n for n in vars(errors) if n.endswith(("Error",
                                                                                   "Large"))}
    for type_ in types:
        assert type_.code in ERROR_CODES, type_
    assert PoolFullError.code == "pool_full" and EntryTooLarge.code == "too_large"
    assert WorkerRestarted.code == "worker_restarted" and ProtocolError.code == "bad_message"


def test_a_raise_may_name_another_code():
    exc = LMShareError("no such thing", code=ErrorCode.NOT_FOUND)
    assert exc.code == "not_found" and str(exc) == "no such thing"
    assert LMShareError("x").code == "internal"  # the class default stays


def _ping(raise_: BaseException | None):
    def handler(message):
        if raise_ is not None:
            raise raise_
        return protocol.ok(message["id"], pong=True)
    return handler


@pytest.mark.parametrize("raised, code", [
    (None, None),
    (PoolFullError("every slab is pinned"), "pool_full"),
    (EntryTooLarge("larger than the pool"), "too_large"),
    (LMShareError("standby", code=ErrorCode.NOT_LEADER), "not_leader"),
    (RemoteError("unknown_worker", "register again"), "unknown_worker"),
    (ValueError("a bug"), "internal"),
])
def test_a_reply_carries_the_code_of_what_its_handler_raised(raised, code):
    payload = protocol.encode(protocol.request("ping", 42))
    reply = serving.answer(payload, {"ping"}, _ping(raised))
    assert reply["id"] == 42
    if code is None:
        assert reply["type"] == "ok" and reply["pong"] is True
    else:
        assert reply["type"] == "error" and reply["code"] == code
        assert reply["message"].startswith(str(raised)[:10]) or code == "internal"


def test_a_bad_request_gets_its_code_and_id_without_running_the_handler():
    ran = []
    payload = protocol.encode(protocol.request("release", 9, handle="not an int"))
    reply = serving.answer(payload, {"release"}, lambda m: ran.append(m) or {})
    assert (reply["type"], reply["code"], reply["id"]) == ("error", "bad_message", 9)
    reply = serving.answer(protocol.encode(protocol.request("release", 5, handle=1)), {"ping"},
                           lambda m: ran.append(m) or {})
    assert (reply["code"], reply["id"]) == ("unknown_type", 5)
    assert not ran
