"""A controller shard (``--shard K/N``), in-process: it names its shard, indexes only its own
keys and refuses the others' with ``wrong_shard``, before applying any of a message."""

from __future__ import annotations

import threading

import pytest

from lmshare import cli
from lmshare.control import ControllerClient
from lmshare.controller import ControllerConfig, ControllerService
from lmshare.errors import ErrorCode, RemoteError
from lmshare.shards import Shard

NS = b"n" * 16


def key(first: int, i: int = 0) -> bytes:
    return bytes([first]) + i.to_bytes(15, "big")


OWN, FOREIGN = key(0x10), key(0x90)  # shard 0/2 owns first bytes 0x00-0x7f


@pytest.fixture
def shard0():
    service = ControllerService(ControllerConfig(port=0, shard=Shard(0, 2)))
    thread = threading.Thread(target=service.serve_forever, daemon=True)
    thread.start()
    client = ControllerClient("127.0.0.1", service.port, timeout_s=5.0)
    yield service, client
    client.close()
    service.stop()
    thread.join(5)


def register(client, worker_id="w1"):
    return client.call("register", worker_id=worker_id, host="127.0.0.1", data_port=9000,
                       transports=["tcp"], capacity_bytes=1 << 20, host_id="h")


def refused(call, *args, **fields) -> RemoteError:
    with pytest.raises(RemoteError) as caught:
        call(*args, **fields)
    assert caught.value.code == ErrorCode.WRONG_SHARD
    assert "shard 0/2" in caught.value.message and "--controller" in caught.value.message
    return caught.value


def test_a_shard_names_itself_and_refuses_keys_it_does_not_own(shard0):
    service, client = shard0
    reply = register(client)
    assert reply["shard"] == "0/2"
    assert client.call("stats")["shard"] == "0/2"
    assert client.call("stats")["stats"]["shard"] == "0/2"
    epoch = reply["epoch"]
    common = {"worker_id": "w1", "epoch": epoch}
    # a batch with one foreign key is refused whole: nothing of it is applied
    refused(client.call, "batch", **common, seq=1, admit={NS: [OWN, FOREIGN]}, evict=[])
    refused(client.call, "batch", **common, seq=1, admit={NS: [OWN]}, evict=[FOREIGN])
    assert service.index.worker_chunks("w1") == 0
    assert client.call("batch", **common, seq=1, admit={NS: [OWN, key(0x7f)]},
                       evict=[])["resync"] is False
    refused(client.call, "sync", **common, seq=2, part=0, final=True, entries={NS: [FOREIGN]})
    assert service.index.worker_chunks("w1") == 2  # the refused sync dropped nothing
    error = refused(client.call, "lookup", namespace=NS, keys=[OWN, FOREIGN])
    assert "0x00-0x7f" in error.message and "1 of the 2 keys" in error.message
    refused(client.call, "explain", namespace=NS, keys=[FOREIGN])
    refused(client.call, "handoff", **common, keys=[FOREIGN], sizes=[1])
    # and it keeps serving
    reply = client.call("lookup", namespace=NS, keys=[OWN, key(0x7f), key(0x00)])
    assert reply["matched"] == 2 and reply["holders"] == [["w1"], ["w1"]]
    assert client.call("stats")["stats"]["chunks_indexed"] == 2


def test_the_default_controller_owns_every_key():
    service = ControllerService(ControllerConfig(port=0))
    thread = threading.Thread(target=service.serve_forever, daemon=True)
    thread.start()
    client = ControllerClient("127.0.0.1", service.port, timeout_s=5.0)
    try:
        reply = register(client)
        assert reply["shard"] == "0/1"
        client.call("batch", worker_id="w1", epoch=reply["epoch"], seq=1,
                    admit={NS: [OWN, FOREIGN]}, evict=[])
        assert client.call("lookup", namespace=NS, keys=[OWN, FOREIGN])["matched"] == 2
    finally:
        client.close()
        service.stop()
        thread.join(5)


@pytest.mark.parametrize("spec", ["2/2", "1", "x/2", "0/0"])
def test_a_bad_shard_option_is_one_line_and_exit_2(spec, capsys):
    assert cli.main(["controller", "--insecure", "--port", "0", "--shard", spec]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shard" in err and "K/N" in err


def test_calls_to_several_controllers_take_one_deadline_in_all(shard0):
    """call_all sends every request before waiting: silent controllers cost one deadline
    together, and the one that answers is answered."""
    import time

    import zmq

    from lmshare.control import FailoverControllerClient, call_all
    from lmshare.errors import ControllerUnavailable
    from lmshare.testing.waiting import slack

    service, _ = shard0
    context = zmq.Context.instance()
    silent = [context.socket(zmq.ROUTER) for _ in range(3)]  # they read, never answer
    try:
        ports = [sock.bind_to_random_port("tcp://127.0.0.1") for sock in silent]
        clients = [FailoverControllerClient([("127.0.0.1", port)]) for port in
                   [service.port, *ports]]
        started = time.monotonic()
        results = call_all([(client, "ping", {}) for client in clients], timeout_s=1.0)
        elapsed = time.monotonic() - started
        assert results[0]["shard"] == "0/2"
        assert all(isinstance(r, ControllerUnavailable) for r in results[1:])
        assert elapsed < 1.5 * slack()  # not one deadline after another (3 s)
        for client in clients:
            client.close()
    finally:
        for sock in silent:
            sock.close(linger=0)
