"""Fuzzing a worker's local endpoint: every request a local client may send is decoded and
handled without an exception or an ``internal`` error (the agent runs in-process, not
registered, so lookups stay local)."""

from __future__ import annotations

import pytest
from hypothesis import example, given

from lmshare import protocol
from lmshare.errors import LMShareError, ProtocolError
from lmshare.testing.fuzz import FUZZ, messages, pack, payloads
from lmshare.worker import WorkerAgent, WorkerConfig
from lmshare.worker.local_server import LOCAL_TYPES

CODES = set(vars(protocol.ErrorCode).values()) - {protocol.ErrorCode.INTERNAL}


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz-local")
    shm = tmp_path_factory.mktemp("fuzz-shm")
    monkey = pytest.MonkeyPatch()
    monkey.setenv("LMSHARE_SHM_DIR", str(shm))
    monkey.setenv("LMSHARE_RUNTIME_DIR", str(directory / "run"))
    agent = WorkerAgent(WorkerConfig(controller_host="127.0.0.1", controller_port=1,
                                     cache_bytes=8 << 20, slab_bytes=64 << 10, name="fuzz",
                                     transports=("tcp",)))
    for i in range(8):  # something to find
        agent.pool.put(b"n" * 16, i.to_bytes(16, "big"), bytes(1000 * i))
    yield agent
    agent.close()
    monkey.undo()


def handle(agent, payload: bytes) -> None:
    try:
        message = protocol.decode_request(payload, LOCAL_TYPES)
    except ProtocolError as exc:
        assert protocol.error_code_of(exc) in CODES
        return
    handler = {"hello": agent._on_hello, "local_lookup": agent._on_lookup,
               "reserve": agent._on_reserve, "commit": agent._on_commit,
               "abort": agent._on_abort, "acquire": agent._on_acquire,
               "release": agent._on_release, "locate": agent._on_locate,
               "worker_stats": agent._on_stats, "ping": lambda m: protocol.ok(m["id"])
               }[message["type"]]
    agent._may_wait_on_peers(message)
    try:
        reply = handler(message)
    except LMShareError as exc:
        assert getattr(exc, "code", None) in CODES, exc
        return
    protocol.decode_raw(protocol.encode(reply))


@FUZZ
@given(payloads(LOCAL_TYPES))
def test_any_local_payload_is_handled_cleanly(agent, payload):
    handle(agent, payload)
    agent.leases.sweep()


@FUZZ
@given(messages(LOCAL_TYPES))
@example({"v": 1, "type": "reserve", "id": 0, "namespace": bytes(16),  # larger than the pool
          "keys": [b"\xfe" * 16, b"\xff" * 16], "sizes": [0, 8 * 2**20 + 1]})
def test_near_valid_local_requests_are_handled_cleanly(agent, message):
    message.pop("incarnation", None)
    if message["type"] in ("acquire", "reserve", "local_lookup") and isinstance(
            message.get("keys"), list) and message["keys"][:1] == [b""]:
        message["keys"] = [i.to_bytes(16, "big") for i in range(8)]
    handle(agent, pack(message))
    if len(agent.leases) > 1000:
        agent.leases.release_all()
