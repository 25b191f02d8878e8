"""A controller's message handler called in process, as its socket would call it: every
message encoded, decoded and checked as from the wire, with no socket and no loop thread (so
a test can hold the clock)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import msgpack

from lmshare import protocol


def answerer(service: Any) -> Callable[..., dict[str, Any]]:
    """``answer(type_, **fields)``: the reply of ``service`` (a ControllerService) to one
    request, decoded."""

    def answer(type_: str, **fields: Any) -> dict[str, Any]:
        reply = service.answer([b"id", protocol.encode(protocol.request(type_, 1, **fields))])
        return msgpack.unpackb(reply[1])

    return answer


def register_workers(answer: Callable[..., dict[str, Any]],
                     names: Iterable[str]) -> dict[str, int]:
    """Register workers ``names`` (one host, data ports from 9000); their epochs by name."""
    return {name: answer("register", worker_id=name, host="127.0.0.1", data_port=9000 + n,
                         transports=["tcp"], capacity_bytes=1 << 30, host_id="h")["epoch"]
            for n, name in enumerate(names)}
