"""Fuzzing a worker's local endpoint: every request a local client may send is decoded and
handled without an exception or an ``internal`` error (the agent runs in-process, not
registered, so lookups stay local)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import example, given

from lmshare import protocol
from lmshare.errors import LMShareError, ProtocolError
from lmshare.testing.fuzz import FUZZ, messages, pack, payloads
from lmshare.worker import WorkerAgent, WorkerConfig
from lmshare.worker.local_server import LOCAL_TYPES

CODES = set(vars(protocol.ErrorCode).values()) - {protocol.ErrorCode.INTERNAL}


@contextmanager
def local_agent() -> Iterator[WorkerAgent]:
    """A worker agent (not registered, LMSHARE_SHM_DIR/LMSHARE_RUNTIME_DIR as the caller
    chose) holding 8 small chunks."""
    agent = WorkerAgent(WorkerConfig(controller_host="127.0.0.1", controller_port=1,
                                     cache_bytes=8 << 20, slab_bytes=64 << 10, name="fuzz",
                                     transports=("tcp",)))
    for i in range(8):  # something to find
        agent.pool.put(b"n" * 16, i.to_bytes(16, "big"), bytes(1000 * i))
    try:
        yield agent
    finally:
        agent.close()


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz-local")
    shm = tmp_path_factory.mktemp("fuzz-shm")
    monkey = pytest.MonkeyPatch()
    monkey.setenv("LMSHARE_SHM_DIR", str(shm))
    monkey.setenv("LMSHARE_RUNTIME_DIR", str(directory / "run"))
    with local_agent() as agent:
        yield agent
    monkey.undo()


def handle(agent, payload: bytes) -> None:
    try:
        message = protocol.decode_request(payload, LOCAL_TYPES)
    except ProtocolError as exc:
        assert exc.code in CODES, exc
        return
    if message["type"] == "drain":  # stops the worker, as asked: not a decoder's concern
        return
    handler = agent.local_handlers[message["type"]]
    agent._may_wait_on_peers(message)
    try:
        reply = handler(message)
    except LMShareError as exc:
        assert exc.code in CODES, exc
        return
    protocol.decode_raw(protocol.encode(reply))


def check_payload(agent, payload: bytes) -> None:
    handle(agent, payload)
    agent.leases.sweep()


def check_message(agent, message: dict) -> None:
    message.pop("incarnation", None)
    if message["type"] in ("acquire", "reserve", "local_lookup") and isinstance(
            message.get("keys"), list) and message["keys"][:1] == [b""]:
        message["keys"] = [i.to_bytes(16, "big") for i in range(8)]
    handle(agent, pack(message))
    if len(agent.leases) > 1000:
        agent.leases.release_all()


PAYLOADS = payloads(LOCAL_TYPES)
MESSAGES = messages(LOCAL_TYPES)
# name: (what the fuzzer draws, the check, the context that makes the checked object)
TARGETS = {"local-payload": (PAYLOADS, check_payload, local_agent),
           "local-message": (MESSAGES, check_message, local_agent)}


@FUZZ
@given(PAYLOADS)
def test_any_local_payload_is_handled_cleanly(agent, payload):
    check_payload(agent, payload)


@FUZZ
@given(MESSAGES)
@example({"v": 1, "type": "reserve", "id": 0, "namespace": bytes(16),  # larger than the pool
          "keys": [b"\xfe" * 16, b"\xff" * 16], "sizes": [0, 8 * 2**20 + 1]})
def test_near_valid_local_requests_are_handled_cleanly(agent, message):
    check_message(agent, message)
