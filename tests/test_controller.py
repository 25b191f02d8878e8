"""The controller, in-process: registry, index, sequencing, failure detection, bad input."""

import threading
import time

import msgpack
import pytest
import zmq

from lmshare.control import ControllerClient
from lmshare.controller import ControllerConfig, ControllerService
from lmshare.errors import ConfigError, ControllerUnavailable, RemoteError
from lmshare.testing.waiting import slack, wait_until

NS = b"n" * 16


def k(i: int) -> bytes:
    return i.to_bytes(16, "big")


@pytest.fixture
def controller():
    service = ControllerService(ControllerConfig(port=0, heartbeat_interval_s=0.1,
                                                 heartbeat_timeout_s=0.6,
                                                 max_message_bytes=1024 * 1024))
    thread = threading.Thread(target=service.serve_forever, daemon=True)
    thread.start()
    yield service
    service.stop()
    thread.join(5)


@pytest.fixture
def client(controller):
    c = ControllerClient("127.0.0.1", controller.port, timeout_s=2.0)
    yield c
    c.close()


def register(client, worker_id, port=9000):
    reply = client.call("register", worker_id=worker_id, host="127.0.0.1", data_port=port,
                        transports=["tcp"], capacity_bytes=1 << 20, host_id="h")
    return reply["epoch"]


def test_register_batch_lookup_holders(client):
    e1, e2 = register(client, "w1"), register(client, "w2", 9001)
    assert client.call("batch", worker_id="w1", epoch=e1, seq=1, admit={NS: [k(0), k(1), k(2)]},
                       evict=[])["resync"] is False
    client.call("batch", worker_id="w2", epoch=e2, seq=1, admit={NS: [k(0)]}, evict=[])
    reply = client.call("lookup", namespace=NS, keys=[k(0), k(1), k(3), k(2)])
    assert reply["matched"] == 2
    assert reply["holders"] == [["w1", "w2"], ["w1"]]
    assert reply["workers"]["w2"]["data_port"] == 9001
    client.call("batch", worker_id="w1", epoch=e1, seq=2, admit={}, evict=[k(0)])
    assert client.call("lookup", namespace=NS, keys=[k(0)])["holders"] == [["w2"]]


def test_sequence_gap_asks_for_full_sync(client, controller):
    epoch = register(client, "w1")
    client.call("batch", worker_id="w1", epoch=epoch, seq=1, admit={NS: [k(0)]}, evict=[])
    assert client.call("batch", worker_id="w1", epoch=epoch, seq=3, admit={NS: [k(9)]},
                       evict=[])["resync"] is True
    assert client.call("lookup", namespace=NS, keys=[k(9)])["matched"] == 0  # not applied
    client.call("sync", worker_id="w1", epoch=epoch, seq=3, part=0, final=False, entries={NS: [k(5)]})
    client.call("sync", worker_id="w1", epoch=epoch, seq=3, part=1, final=True, entries={NS: [k(6)]})
    assert client.call("heartbeat", worker_id="w1", epoch=epoch, seq=3, stats={})["resync"] is False
    assert client.call("lookup", namespace=NS, keys=[k(5)])["matched"] == 1
    with pytest.raises(RemoteError, match="unknown_namespace"):
        client.call("lookup", namespace=b"x" * 16, keys=[k(0)])
    assert controller.index.worker_chunks("w1") == 2


def test_missed_heartbeats_remove_worker_and_its_chunks_at_once(client, controller):
    epoch = register(client, "w1")
    client.call("batch", worker_id="w1", epoch=epoch, seq=1, admit={NS: [k(0)]}, evict=[])
    started = time.monotonic()
    wait_until(lambda: not client.call("stats")["stats"]["chunks_indexed"], 3.0,
               "the silent worker's chunks dropped")
    # its 0.6 s liveness timeout, then the next check (every 0.1 s); a loaded machine's
    # scheduling stretches the upper bound, never the lower one
    assert 0.5 < time.monotonic() - started < 1.5 * slack()
    with pytest.raises(RemoteError, match="unknown_worker"):
        client.call("heartbeat", worker_id="w1", epoch=epoch, seq=1, stats={})
    stats = client.call("stats")["stats"]
    assert [w["state"] for w in stats["workers"]] == ["dead"]
    assert any(e["kind"] == "dead" for e in stats["events"])


def raw(controller, payload: bytes) -> dict:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{controller.port}")
    try:
        sock.send(payload)
        assert sock.poll(2000), "controller did not answer"
        return msgpack.unpackb(sock.recv())
    finally:
        sock.close()


@pytest.mark.parametrize("payload,code", [
    (b"\x93\x01", "bad_message"),  # truncated msgpack
    (b"not msgpack at all \xc1", "bad_message"),
    (msgpack.packb({"v": 2, "type": "ping"}), "bad_version"),
    (msgpack.packb({"v": 1, "type": "frobnicate"}), "unknown_type"),
    (msgpack.packb({"v": 1, "type": "acquire", "namespace": NS, "keys": [], "peers": True,
                    "lease_s": 1}), "unknown_type"),  # a worker-local type
    (msgpack.packb({"v": 1, "type": "lookup", "namespace": NS, "keys": [b"short"]}), "bad_message"),
    (msgpack.packb({"v": 1, "type": "heartbeat", "worker_id": "ghost", "epoch": 1, "seq": 0,
                    "stats": {}}), "unknown_worker"),
    (msgpack.packb({"v": 1, "type": "lookup", "namespace": NS, "keys": ["x" * 2_000_000]}), "too_large"),
])
def test_bad_input_gets_an_error_reply_and_others_keep_being_served(controller, client, payload, code):
    epoch = register(client, "good")
    reply = raw(controller, payload)
    assert reply["type"] == "error" and reply["code"] == code
    assert reply["message"]
    assert client.call("heartbeat", worker_id="good", epoch=epoch, seq=0, stats={})["type"] == "ok"


def test_port_in_use_is_a_config_error(controller):
    with pytest.raises(ConfigError, match="choose another --port"):
        ControllerService(ControllerConfig(port=controller.port))


def test_calls_to_a_missing_controller_fail_within_their_deadline():
    client = ControllerClient("127.0.0.1", 1, timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(ControllerUnavailable, match="not reachable"):
        client.call("ping")
    assert time.monotonic() - started < 1.0


def test_stats_reflect_workers_and_lookups(client):
    epoch = register(client, "w1")
    client.call("heartbeat", worker_id="w1", epoch=epoch, seq=0,
                stats={"capacity_bytes": 100, "used_bytes": 40, "peer_hit_chunks": 3})
    client.call("batch", worker_id="w1", epoch=epoch, seq=1, admit={NS: [k(1)]}, evict=[])
    client.call("lookup", namespace=NS, keys=[k(1)])
    stats = client.call("stats")["stats"]
    assert stats["lookups"] == 1 and stats["chunks_indexed"] == 1 and stats["namespaces"] == 1
    (worker,) = stats["workers"]
    assert worker["counters"]["used_bytes"] == 40 and worker["state"] == "alive"


def test_lookup_codes_each_chunk_past_its_prefix_within_a_bound(client):
    """Past the held prefix, one code per chunk: held (behind the stop), new, gone (its last
    holder left), evicted (its last holder evicted it); at most MISS_CODES of them."""
    from lmshare import misses
    from lmshare.controller.service import MISS_CODES

    e1, e2 = register(client, "w1"), register(client, "w2", 9001)
    client.call("batch", worker_id="w1", epoch=e1, seq=1, admit={NS: [k(0), k(2), k(3)]},
                evict=[])
    client.call("batch", worker_id="w2", epoch=e2, seq=1, admit={NS: [k(4)]}, evict=[])
    client.call("batch", worker_id="w1", epoch=e1, seq=2, admit={}, evict=[k(3)])
    client.call("deregister", worker_id="w2", epoch=e2)
    keys = [k(0), k(1), k(2), k(3), k(4)] + [k(100 + i) for i in range(2 * MISS_CODES)]
    reply = client.call("lookup", namespace=NS, keys=keys)
    assert reply["matched"] == 1
    assert reply["misses"][:4] == bytes([misses.NEW, misses.HELD, misses.EVICTED_CODE,
                                         misses.GONE])
    assert len(reply["misses"]) == MISS_CODES
    # a namespace whose chunks are all gone is still known: an answer, not unknown_namespace
    client.call("batch", worker_id="w1", epoch=e1, seq=3, admit={}, evict=[k(0), k(2)])
    reply = client.call("lookup", namespace=NS, keys=[k(0), k(9)])
    assert reply["matched"] == 0 and reply["misses"] == bytes([misses.EVICTED_CODE, misses.NEW])
    with pytest.raises(RemoteError, match="unknown_namespace"):
        client.call("lookup", namespace=b"y" * 16, keys=[k(0)])


def test_a_retried_registration_gets_the_same_epoch_and_a_new_process_a_new_one(client):
    # a worker whose first answer was lost registers again; a late copy of either attempt
    # must not void the epoch it goes on with
    fields = dict(worker_id="w1", host="127.0.0.1", data_port=9000, transports=["tcp"],
                  capacity_bytes=1 << 20, host_id="h")
    first = client.call("register", instance=b"a" * 16, **fields)["epoch"]
    again = client.call("register", instance=b"a" * 16, **fields)["epoch"]
    assert again == first
    client.call("heartbeat", worker_id="w1", epoch=first, seq=0, stats={})
    restarted = client.call("register", instance=b"b" * 16, **fields)["epoch"]
    assert restarted != first
    with pytest.raises(RemoteError, match="unknown_worker"):
        client.call("heartbeat", worker_id="w1", epoch=first, seq=0, stats={})
    assert client.call("register", **fields)["epoch"] not in (first, restarted)  # no token


def test_chunks_of_a_worker_that_left_are_missed_as_holder_gone_while_they_are_swept_out():
    """A leaving worker's keys leave the index slice by slice; until they are gone, a lookup
    past them says their holder is gone (not nothing, as if they were still held)."""
    from lmshare import misses
    from lmshare.controller import index as index_module
    from lmshare.testing.in_process import answerer, register_workers

    service = ControllerService(ControllerConfig(port=0))

    answer = answerer(service)
    epochs = register_workers(answer, ("leaver", "asker"))
    keys = [k(i) for i in range(3 * index_module.SLICE_KEYS)]
    answer("batch", worker_id="leaver", epoch=epochs["leaver"], seq=1, admit={NS: keys}, evict=[])
    while service.index.pending:
        service.index.absorb()
    answer("deregister", worker_id="leaver", epoch=epochs["leaver"])
    assert service.index.pending, "the sweep of its keys is still queued"
    reply = answer("lookup", namespace=NS, keys=keys[:16])
    assert reply["matched"] == 0 and set(reply["misses"]) == {misses.GONE}
    while service.index.pending:
        service.index.absorb()
    reply = answer("lookup", namespace=NS, keys=keys[:16])
    assert reply["matched"] == 0 and set(reply["misses"]) == {misses.GONE}  # orphaned now
