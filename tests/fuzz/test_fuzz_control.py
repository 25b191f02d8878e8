"""Fuzzing the controller's decoder and handlers: any bytes from anyone get an ok or an error
reply with a known code, never an ``internal`` error, an exception or a reply that cannot be
encoded. Examples per test: LMSHARE_FUZZ_EXAMPLES (default 1000); `make fuzz` runs the same
checks coverage-guided (tests/fuzz/coverage_fuzz.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmshare import protocol
from lmshare.controller import ControllerConfig, ControllerService
from lmshare.controller.service import CONTROLLER_TYPES
from lmshare.testing.fuzz import FUZZ, messages, pack, payloads

CODES = set(vars(protocol.ErrorCode).values()) - {protocol.ErrorCode.INTERNAL}


@contextmanager
def controller() -> Iterator[ControllerService]:
    """A controller service (not serving a socket) with two registered workers."""
    service = ControllerService(ControllerConfig(port=0, max_message_bytes=1 << 20,
                                                 max_keys_per_worker=5000))
    service.known = {}
    for name in ("w1", "w2"):
        envelope, reply = service.answer([b"peer", pack(protocol.request(
            "register", 1, worker_id=name, host="127.0.0.1", data_port=9000,
            transports=["tcp"], capacity_bytes=1 << 30, host_id="h"))])
        service.known[name] = msgpack.unpackb(reply)["epoch"]
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def service():
    with controller() as service:
        yield service


def check(service, frames: list[bytes], socket_name: str = "control") -> dict:
    envelope, data = service.answer(frames, "", socket_name)
    reply = msgpack.unpackb(data, strict_map_key=False)
    assert reply["type"] in ("ok", "error")
    if reply["type"] == "error":
        assert reply["code"] in CODES, reply
        assert len(reply["message"]) <= protocol.MAX_ERROR_TEXT
    service.index.absorb(10**6)
    return reply


def check_payload(service, payload: bytes) -> None:
    check(service, [b"peer", payload])


def as_worker(service, case: tuple[dict, str | None]) -> dict:
    """The drawn message, sent as the drawn registered worker (its id and epoch) unless it
    is a registration or none was drawn."""
    message, worker = case
    if worker is not None and message["type"] not in ("register", "deregister"):
        message["worker_id"] = worker
        message["epoch"] = service.known[worker]
    return message


def check_worker_message(service, case: tuple[dict, str | None]) -> None:
    """Near-valid messages that name a registered worker and its epoch, so they reach the
    handlers' logic (batches, syncs, heartbeats, lookups of what was indexed)."""
    check(service, [b"peer", pack(as_worker(service, case))])
    reply = check(service, [b"peer", pack(protocol.request("stats", 2))])
    assert reply["type"] == "ok"


def check_frames(service, frames: list[bytes]) -> None:
    check(service, frames)


def check_lane_message(service, case: tuple[dict, str | None]) -> None:
    """Anything on the lookup socket: a lookup or ping answered, everything else refused, and
    nothing it carries changes the registry or the index."""
    message = as_worker(service, case)
    before = (dict(service.registry.workers), len(service.index))
    reply = check(service, [b"peer", pack(message)], "lookup")
    if message.get("type") not in ("lookup", "ping"):
        assert reply["type"] == "error"
    assert (dict(service.registry.workers), len(service.index)) == before


def check_advertised_port(service, reply: object) -> None:
    """Whatever a reply carries as ``lookup_port``, a client learns a port or nothing."""
    from lmshare.control import advertised_lookup_port

    port = advertised_lookup_port(reply if isinstance(reply, dict) else {"lookup_port": reply})
    assert port is None or (type(port) is int and 1 <= port <= 65535)


PAYLOADS = payloads(CONTROLLER_TYPES)
WORKER_MESSAGES = st.tuples(messages(CONTROLLER_TYPES), st.sampled_from(["w1", "w2", None]))
FRAMES = st.lists(st.binary(max_size=64), min_size=2, max_size=6)
REPLY_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4), max_leaves=12)
# name: (what the fuzzer draws, the check, the context that makes the checked object)
TARGETS = {"control-payload": (PAYLOADS, check_payload, controller),
           "control-worker-message": (WORKER_MESSAGES, check_worker_message, controller),
           "control-frames": (FRAMES, check_frames, controller),
           "lookup-lane-message": (WORKER_MESSAGES, check_lane_message, controller),
           "lookup-port-advertised": (REPLY_VALUES, check_advertised_port, controller)}


@FUZZ
@given(PAYLOADS)
def test_any_payload_gets_a_clean_reply(service, payload):
    check_payload(service, payload)


@FUZZ
@given(WORKER_MESSAGES)
def test_messages_of_registered_workers_get_a_clean_reply(service, case):
    check_worker_message(service, case)


@FUZZ
@given(FRAMES)
def test_any_frames_get_a_clean_reply(service, frames):
    check_frames(service, frames)


@FUZZ
@given(WORKER_MESSAGES)
def test_the_lookup_lane_changes_nothing(service, case):
    check_lane_message(service, case)


@FUZZ
@given(REPLY_VALUES)
def test_an_advertised_lookup_port_is_checked(service, reply):
    check_advertised_port(service, reply)
