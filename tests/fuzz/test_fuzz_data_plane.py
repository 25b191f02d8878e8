"""Fuzzing the TCP data plane's decoders on both sides: a server reading any request bytes,
and a client reading any answer (chunk headers, lengths, bodies) into its pool. Neither
raises anything but a connection error, and the client's pool keeps no half-written entry."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmshare.errors import ProtocolError
from lmshare.pool import KVPool
from lmshare.testing.fuzz import FUZZ, payloads
from lmshare.transports import tcp
from lmshare.transports.base import PeerInfo
from lmshare.transports.locate import Located
from lmshare.transports.tcp import CHUNK_HEADER, REQUEST_LENGTH, TcpPeerServer, TcpTransport
from lmshare.worker.peer_fetch import PoolSink

NS = b"n" * 16


@contextmanager
def reader_pool(name: str = "fuzz-data") -> Iterator[KVPool]:
    """A small pool holding 4 chunks (the LMSHARE_SHM_DIR the caller chose)."""
    pool = KVPool(4 << 20, 64 << 10, name=name)
    for i in range(4):
        pool.put(NS, i.to_bytes(16, "big"), bytes(5000 * i + 1))
    try:
        yield pool
    finally:
        pool.close()


@contextmanager
def peer_server() -> Iterator[TcpPeerServer]:
    """A peer server (not listening: requests are handed to it) serving a pool's chunks."""
    with reader_pool("fuzz-served") as pool:
        def source(key):
            entry = pool.pin(key)
            return None if entry is None else (pool.views(entry), lambda: pool.unpin(entry))

        def locator(keys, lease_s):
            return {"handle": 0, "chunks": [], "gens": []}
        server = TcpPeerServer(source, locator=locator, send_timeout_s=0.5, idle_timeout_s=0.5)
        try:
            yield server
        finally:
            server.stop(0)


@pytest.fixture(scope="module")
def shm_dir(tmp_path_factory):
    monkey = pytest.MonkeyPatch()
    monkey.setenv("LMSHARE_SHM_DIR", str(tmp_path_factory.mktemp("fuzz-shm")))
    yield
    monkey.undo()


@pytest.fixture(scope="module")
def pool(shm_dir):
    with reader_pool() as pool:
        yield pool


@pytest.fixture(scope="module")
def server(shm_dir):
    with peer_server() as server:
        yield server


@st.composite
def framed_requests(draw) -> bytes:
    body = draw(payloads(tcp.PEER_TYPES))
    length = draw(st.sampled_from([len(body)]) | st.integers(0, 2**32 - 1))
    return REQUEST_LENGTH.pack(length) + body


def check_request(server, data: bytes) -> None:
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(data)
        theirs.shutdown(socket.SHUT_WR)
        try:
            request = server._read_request(ours)
            if request is not None:
                assert request["type"] in tcp.PEER_TYPES
                if request["type"] == "fetch":
                    server._answer(ours, request)
                elif request["type"] == "locate":
                    server._answer_locate(ours, request)
        except (ConnectionError, OSError):
            pass
    finally:
        ours.close()
        theirs.close()


@st.composite
def answers(draw, keys: int) -> bytes:
    """What a hostile or broken holder may send back for ``keys`` chunks."""
    out = b""
    for _ in range(draw(st.integers(0, keys + 1))):
        status = draw(st.sampled_from([tcp.STATUS_OK, tcp.STATUS_MISSING]) | st.integers(0, 255))
        nbytes = draw(st.integers(0, 70_000) | st.sampled_from([2**63, 2**64 - 1, 1 << 30]))
        out += CHUNK_HEADER.pack(status, draw(st.integers(0, 2**32 - 1)), nbytes)
        out += draw(st.binary(max_size=min(nbytes, 2000)))
    return out + draw(st.binary(max_size=32))


def check_answer(pool, case: tuple[tuple[int, bytes], bool]) -> None:
    (count, data), checksum = case
    keys = [(10**6 + i).to_bytes(16, "big") for i in range(count)]
    ours, theirs = socket.socketpair()
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    transport = TcpTransport()
    try:
        theirs.sendall(data)
        theirs.shutdown(socket.SHUT_WR)
        delivered, _ = transport._fetch_on(ours, PeerInfo("p", "127.0.0.1", 1), keys,
                                           PoolSink(pool, NS), time.monotonic() + 0.5,
                                           checksum)
        assert 0 <= delivered <= count
        assert pool.stats().reserved_bytes == 0  # nothing left half-written
    finally:
        transport.close()
        ours.close()
        theirs.close()
        for key in keys:
            pool.remove(key)


def check_locate_reply(_, data: bytes) -> None:
    """The one-sided transports' reader of a locate reply (lmshare/transports/locate.py): any
    bytes are a connection or protocol error, or a reply whose every chunk lies in the pool."""
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(data)
        theirs.shutdown(socket.SHUT_WR)
        try:
            reply = tcp.Connection(ours).recv_message(time.monotonic() + 0.5)
            located = Located.from_wire(reply, 4, 4096, 64)
        except (ConnectionError, OSError, ProtocolError):
            return
        assert len(located.chunks) <= 4
        bound = located.region.num_slabs if located.region is not None else 64
        for chunk in located.chunks:
            assert len(chunk.generations) == len(chunk.slabs) and all(
                0 <= s < bound for s in chunk.slabs)
    finally:
        ours.close()
        theirs.close()


def framed(message) -> bytes:
    body = msgpack.packb(message)
    return REQUEST_LENGTH.pack(len(body)) + body


NUMBER = st.integers(-2, 70) | st.just(2**64 - 1) | st.text(max_size=2)


@st.composite
def locate_answers(draw) -> bytes:
    """Locate replies near the valid ones: chunks whose slabs, sizes and generations mostly
    agree, each part sometimes off (a wrong count, a slab out of the pool, a bad type)."""
    chunks, gens = [], []
    for _ in range(draw(st.integers(0, 5))):
        nbytes = draw(st.integers(0, 4 * 4096) | st.integers(-1, 2**40))
        count = max(1, -(-nbytes // 4096)) + draw(st.sampled_from([0, 0, 0, 1, -1]))
        count = min(max(0, count), 8)  # (a huge size: its slabs cannot match)
        slabs = draw(st.lists(st.integers(0, 63) | NUMBER, min_size=count, max_size=count))
        chunks.append(draw(st.just([slabs, nbytes]) | st.lists(NUMBER, max_size=3)))
        gens.append(draw(st.just([0] * len(slabs)) | st.lists(NUMBER, max_size=5)))
    answer = {"handle": draw(st.integers(-1, 2**63) | st.none()), "chunks": chunks, "gens": gens}
    if draw(st.booleans()):
        answer["region"] = draw(st.fixed_dictionaries(
            {"path": st.text(max_size=8), "bytes": st.integers(-1, 1 << 20) | st.floats(),
             "gen_path": st.text(max_size=8), "slab_bytes": st.integers(-1, 8192)}))
    return framed(answer)


REQUESTS = framed_requests() | st.binary(max_size=64)
ANSWERS = st.tuples(st.integers(1, 3).flatmap(lambda n: st.tuples(st.just(n), answers(n))),
                    st.booleans())
LOCATE_REPLIES = st.binary(max_size=200) | framed_requests() | locate_answers()
# name: (what the fuzzer draws, the check, the context that makes the checked object)
TARGETS = {"data-request": (REQUESTS, check_request, peer_server),
           "data-answer": (ANSWERS, check_answer, reader_pool),
           "data-locate-reply": (LOCATE_REPLIES, check_locate_reply, nullcontext)}


@FUZZ
@given(REQUESTS)
def test_the_peer_server_reads_any_request_cleanly(server, data):
    check_request(server, data)


@FUZZ
@given(ANSWERS)
def test_the_client_reads_any_answer_cleanly(pool, case):
    check_answer(pool, case)


@FUZZ
@given(LOCATE_REPLIES)
def test_the_client_reads_any_locate_reply_cleanly(data):
    check_locate_reply(None, data)
