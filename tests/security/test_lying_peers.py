"""Peers that lie about what they hold: a member's fake holder announcing oversized chunks
makes the reader neither reserve nor evict anything, and the refusal is counted."""

import os
import socket
import threading
import time

import msgpack

from lmshare import ModelSignature
from lmshare.errors import RemoteError
from lmshare.handshake import data_key, server_handshake
from lmshare.keys import signature_keys
from lmshare.testing.waiting import wait_until
from lmshare.transports.tcp import CHUNK_HEADER, REQUEST_LENGTH, STATUS_OK

SIG = ModelSignature(model="lying-peer", chunk_tokens=16)
CHUNK = 200_000


class FakeHolder:
    """A data port that passes the handshake (it holds the key) and announces every chunk as
    ``announced`` bytes long, then sends garbage."""

    def __init__(self, key, announced: int, whole: bool = False) -> None:
        self.announced = announced
        self.whole = whole  # send all the announced (random) bytes
        self.requests = 0
        self._key = data_key(key)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._listener.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            with conn:
                try:
                    server_handshake(conn, self._key, time.monotonic() + 5)
                    (length,) = REQUEST_LENGTH.unpack(conn.recv(4, socket.MSG_WAITALL))
                    request = msgpack.unpackb(conn.recv(length, socket.MSG_WAITALL))
                    self.requests += 1
                    for _ in request["keys"]:
                        conn.sendall(CHUNK_HEADER.pack(STATUS_OK, 0, self.announced))
                        conn.sendall(os.urandom(self.announced if self.whole
                                                else min(self.announced, 1 << 16)))
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._listener.close()


def announce(cluster, name: str, port: int, keys: list[bytes],
             digests: dict | None = None) -> threading.Event:
    """Register ``name`` (a member: it holds the key), announce ``keys`` with ``digests``
    (default: made up, for keys nobody stored yet) and keep it alive with heartbeats until the
    returned event is set."""
    controller = cluster.controller_client()
    epoch = controller.call("register", worker_id=name, host="127.0.0.1", data_port=port,
                            transports=["tcp"], capacity_bytes=1 << 30,
                            host_id="another-host")["epoch"]
    controller.call("batch", worker_id=name, epoch=epoch, seq=1,
                    admit={SIG.namespace(): keys}, evict=[],
                    digests=digests if digests is not None else {k: bytes(16) for k in keys})
    stop = threading.Event()

    def beat() -> None:
        try:
            while not stop.wait(0.3):
                controller.call("heartbeat", worker_id=name, epoch=epoch, seq=1, stats={})
        except RemoteError:
            pass  # e.g. the controller refused its chunks and forgot it
        finally:
            controller.close()

    threading.Thread(target=beat, daemon=True).start()
    return stop


def holders_of(cluster, keys: list[bytes]) -> tuple[list, list]:
    controller = cluster.controller_client()
    try:
        reply = controller.call("lookup", namespace=SIG.namespace(), keys=keys)
        return reply["holders"], reply["digests"]
    except RemoteError as exc:  # no holder at all (yet, or any more)
        assert exc.code == "unknown_namespace", exc
        return [], []
    finally:
        controller.close()


def test_oversized_announcements_reserve_and_evict_nothing(cluster):
    cluster.start_controller()
    cluster.start_worker("victim", "8MiB")
    fake = FakeHolder(cluster.key, announced=6 << 20)  # most of the pool
    alive: list[threading.Event] = []
    try:
        with cluster.client("victim") as victim:
            # the victim's pool is nearly full of its own chunks of the namespace
            own_tokens = list(range(10_000, 10_000 + 16 * 30))
            own = [os.urandom(CHUNK) for _ in range(30)]
            assert victim.put(SIG, own_tokens, own) == 30
            before = victim.stats()["counters"]
            tokens = list(range(16 * 3))
            keys = signature_keys(SIG, tokens)
            alive.append(announce(cluster, "liar", fake.port, keys))
            wait_until(lambda: victim.lookup(SIG, tokens).peer_tokens == 48, 5, "the announce")
            # asked without a size: bounded by the namespace's own chunks (200 kB)
            with victim.acquire(SIG, tokens) as hit:
                assert len(hit) == 0
            # asked with the size the model's layout gives: must be exactly that
            fake.announced = CHUNK + 1
            with victim.acquire_keys(SIG.namespace(), keys, chunk_bytes=CHUNK) as hit:
                assert len(hit) == 0
            assert fake.requests >= 2
            after = victim.stats()["counters"]
            assert after["evictions"] == before["evictions"] == 0
            assert after["entries"] == 30 and after["refused_chunks"] >= 2
            assert victim.get(SIG, own_tokens) == own  # nothing of its own was lost
        log = cluster.workers["victim"].log_text()
        assert "announced a chunk of 6291456 bytes where at most 200000" in log
    finally:
        for event in alive:
            event.set()
        fake.close()


def test_poison_for_recorded_chunks_is_refused_and_detected(cluster):
    """A member that serves its own bytes for chunks an honest writer stored: announced with
    another digest it is not indexed; announced with the writer's digest, its bytes fail the
    reader's check. Nothing poisoned is kept."""
    cluster.start_controller()
    cluster.start_worker("writer", "16MiB")
    cluster.start_worker("reader", "16MiB")
    tokens = list(range(16 * 3))
    keys = signature_keys(SIG, tokens)
    honest = [os.urandom(CHUNK) for _ in range(3)]
    with cluster.client("writer") as writer:
        writer.put(SIG, tokens, honest)
    wait_until(lambda: len(holders_of(cluster, keys)[0]) == 3, 5, "the writer's chunks indexed")
    _, recorded = holders_of(cluster, keys)
    assert all(isinstance(d, bytes) and len(d) == 16 for d in recorded)

    fake = FakeHolder(cluster.key, announced=CHUNK, whole=True)
    alive: list[threading.Event] = []
    try:
        refused_before = cluster.stats().refused_messages
        alive.append(announce(cluster, "liar", fake.port, keys))  # made-up digests: refused
        wait_until(lambda: cluster.stats().refused_messages > refused_before, 5,
                   "the conflicting announce refused")
        assert all("liar" not in chunk for chunk in holders_of(cluster, keys)[0])
        assert any("differs from their writer's record" in e.detail
                   for e in cluster.stats().events)

        alive.append(announce(cluster, "liar2", fake.port, keys, dict(zip(keys, recorded))))
        cluster.workers["writer"].terminate()  # only the liar is left to fetch from
        wait_until(lambda: holders_of(cluster, keys)[0] == [["liar2"]] * 3, 10,
                   "only the liar holding them")
        with cluster.client("reader") as reader:
            with reader.acquire(SIG, tokens) as hit:
                assert len(hit) == 0  # the poison was fetched, checked and dropped
            counters = reader.stats()["counters"]
            assert counters["digest_mismatches"] >= 1 and counters["entries"] == 0
            assert fake.requests >= 1
        log = cluster.workers["reader"].log_text()
        assert "do not match the digest its writer recorded" in log
    finally:
        for event in alive:
            event.set()
        fake.close()
