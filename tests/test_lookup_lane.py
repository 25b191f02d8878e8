"""The controller's lookup lane: a second socket, served before the main socket's queue.

Order, not time, is asserted: which of the queued messages the controller had applied when it
answered the lookup."""

import threading

import pytest
import zmq

from lmshare import ModelSignature, protocol
from lmshare.control import ControllerClient, FailoverControllerClient, LookupPorts, call_all
from lmshare.controller import ControllerConfig, ControllerService
from lmshare.credentials import generate_key_file
from lmshare.curve import REASON_NO_CURVE, REASON_WRONG_KEY, secure_client
from lmshare.errors import ConfigError, ControllerUnavailable, RemoteError
from lmshare.local_cluster import LocalCluster, free_port
from lmshare.testing.waiting import wait_until

NS = b"n" * 16
QUEUED_PARTS = 300


def k(i: int) -> bytes:
    return i.to_bytes(16, "big")


def register(client, worker_id: str) -> int:
    return client.call("register", worker_id=worker_id, host="127.0.0.1", data_port=9000,
                       transports=["tcp"], capacity_bytes=1 << 20, host_id="h")["epoch"]


def serve(service: ControllerService) -> threading.Thread:
    thread = threading.Thread(target=service.serve_forever, daemon=True)
    thread.start()
    return thread


def stop(service: ControllerService, thread: threading.Thread | None) -> None:
    service.stop()
    if thread is not None:
        thread.join(10)


def dealer(context: zmq.Context, port: int) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    return sock


def test_a_lookup_is_answered_before_the_main_sockets_queue():
    """Hundreds of full-sync parts wait on the main socket when the loop starts; a lookup on the
    lookup lane is answered first: the final part's key is not indexed yet in its answer."""
    service = ControllerService(ControllerConfig(port=0))
    thread = None
    context = zmq.Context()
    try:
        # w1 holds k(0), applied before the queue (the namespace is known)
        w1 = service.answer([b"w1", protocol.encode(protocol.request(
            "register", 1, worker_id="w1", host="127.0.0.1", data_port=9000, transports=["tcp"],
            capacity_bytes=1 << 20, host_id="h"))])
        epoch1 = protocol.decode_raw(w1[1])["epoch"]
        service.answer([b"w1", protocol.encode(protocol.request(
            "batch", 2, worker_id="w1", epoch=epoch1, seq=1, admit={NS: [k(0)]}, evict=[]))])
        w2 = protocol.decode_raw(service.answer([b"w2", protocol.encode(protocol.request(
            "register", 3, worker_id="w2", host="127.0.0.1", data_port=9001, transports=["tcp"],
            capacity_bytes=1 << 20, host_id="h"))])[1])
        # w2's full sync: QUEUED_PARTS parts, none read, the last one holding k(1)
        main = dealer(context, service.port)
        for part in range(QUEUED_PARTS):
            final = part == QUEUED_PARTS - 1
            keys = [k(1)] if final else [k(1000 + part * 512 + i) for i in range(512)]
            main.send(protocol.encode(protocol.request(
                "sync", 100 + part, worker_id="w2", epoch=w2["epoch"], seq=1, part=part,
                final=final, entries={NS: keys})))
        lane = dealer(context, service.lookup_port)
        lane.send(protocol.encode(protocol.request("lookup", 7, namespace=NS,
                                                   keys=[k(0), k(1)])))
        # both queues hold their messages before the loop runs (poll only: nothing is taken)
        assert service._socket.poll(10_000) and service._lookup_socket.poll(10_000)
        thread = serve(service)
        assert lane.poll(30_000)
        reply = protocol.decode_raw(lane.recv())
        assert reply["type"] == "ok" and reply["id"] == 7
        assert reply["matched"] == 1  # k(1) of the last queued part: not applied yet
        # and the worker traffic is served in full afterwards, in order
        ids = []
        while len(ids) < QUEUED_PARTS and main.poll(30_000):
            ids.append(protocol.decode_raw(main.recv())["id"])
        assert ids == [100 + part for part in range(QUEUED_PARTS)]
        lane.send(protocol.encode(protocol.request("lookup", 8, namespace=NS,
                                                   keys=[k(0), k(1)])))
        assert lane.poll(30_000) and protocol.decode_raw(lane.recv())["matched"] == 2
        assert service.served["lookup"]["lookups"] == 2
        assert service.served["control"]["lookups"] == 0
        main.close()
        lane.close()
    finally:
        stop(service, thread)
        context.destroy(linger=0)


@pytest.fixture
def controller():
    service = ControllerService(ControllerConfig(port=0, max_message_bytes=1024 * 1024))
    thread = serve(service)
    yield service
    stop(service, thread)


def test_the_lane_refuses_what_changes_state_and_keeps_serving(controller):
    main = ControllerClient("127.0.0.1", controller.port)
    lane = ControllerClient("127.0.0.1", controller.lookup_port)
    try:
        ping = main.call("ping")
        assert ping["lookup_port"] == controller.lookup_port
        assert main.call("stats")["lookup_port"] == controller.lookup_port
        with pytest.raises(RemoteError) as refused:
            register(lane, "w1")
        assert refused.value.code == "wrong_port"
        assert str(controller.port) in refused.value.message
        with pytest.raises(RemoteError) as refused:
            lane.call("stats")
        assert refused.value.code == "wrong_port"
        # what is too large is refused there as on the main socket
        context = zmq.Context.instance()
        raw = dealer(context, controller.lookup_port)
        raw.send(protocol.encode(protocol.request("lookup", 5, namespace=NS, keys=[k(0)],
                                                  pad=b"x" * (3 << 19))))
        assert raw.poll(10_000) and protocol.decode_raw(raw.recv())["code"] == "too_large"
        raw.close()
        assert lane.call("ping")["lookup_port"] == controller.lookup_port
        epoch = register(main, "w1")  # the main socket still serves lookups too (older clients)
        main.call("batch", worker_id="w1", epoch=epoch, seq=1, admit={NS: [k(0)]}, evict=[])
        assert lane.call("lookup", namespace=NS, keys=[k(0)])["matched"] == 1
        assert main.call("lookup", namespace=NS, keys=[k(0)])["matched"] == 1
        sockets = main.call("stats")["sockets"]
        assert sockets["lookup"]["refused"] == 3 and sockets["lookup"]["lookups"] == 1
        assert sockets["control"]["refused"] == 0 and sockets["control"]["lookups"] == 1
        assert "w1" in controller.registry.workers  # nothing the lane refused was applied
    finally:
        main.close()
        lane.close()


@pytest.mark.parametrize("lookup_port", [-1, 65536, "7801", True])
def test_a_bad_lookup_port_is_a_config_error(lookup_port):
    with pytest.raises(ConfigError, match="lookup-port"):
        ControllerConfig(port=0, lookup_port=lookup_port)


def test_the_lookup_port_must_differ_from_the_control_port():
    with pytest.raises(ConfigError, match="port of its own"):
        ControllerConfig(port=7900, lookup_port=7900)
    port = free_port()
    with pytest.raises(ConfigError, match="--lookup-port"):
        with socket_taken(port):
            ControllerService(ControllerConfig(port=0, lookup_port=port))


class socket_taken:
    def __init__(self, port: int) -> None:
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.ROUTER)
        self.sock.bind(f"tcp://127.0.0.1:{port}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close(linger=0)
        self.context.destroy(linger=0)


def test_without_the_key_the_lane_answers_nothing_and_counts_the_refusal(tmp_path):
    key = generate_key_file(tmp_path / "cluster.key")
    other = generate_key_file(tmp_path / "other.key")
    service = ControllerService(ControllerConfig(port=0, key=key))
    thread = serve(service)
    context = zmq.Context()
    try:
        plain = dealer(context, service.lookup_port)  # no CURVE at all
        plain.send(protocol.encode(protocol.request("ping", 1)))
        stranger = context.socket(zmq.DEALER)  # CURVE, with another cluster's client key
        stranger.setsockopt(zmq.LINGER, 0)
        keys = key.curve_client()
        stranger.curve_serverkey = keys.server_public
        stranger.curve_publickey = other.curve_client().public
        stranger.curve_secretkey = other.curve_client().secret
        stranger.connect(f"tcp://127.0.0.1:{service.lookup_port}")
        stranger.send(protocol.encode(protocol.request("ping", 1)))
        wait_until(lambda: service.guard.by_socket()["lookup"].get(REASON_NO_CURVE, 0) >= 1
                   and service.guard.by_socket()["lookup"].get(REASON_WRONG_KEY, 0) >= 1, 10,
                   "the lane's refusals")
        assert not plain.poll(100) and not stranger.poll(100)
        assert service.guard.by_socket()["control"] == {}
        member = context.socket(zmq.DEALER)
        member.setsockopt(zmq.LINGER, 0)
        secure_client(member, keys)
        member.connect(f"tcp://127.0.0.1:{service.lookup_port}")
        member.send(protocol.encode(protocol.request("ping", 2)))
        assert member.poll(10_000) and protocol.decode_raw(member.recv())["type"] == "ok"
        client = ControllerClient("127.0.0.1", service.port, key=key)
        sockets = client.call("stats")["sockets"]
        client.close()
        assert sockets["lookup"]["refused_connections"][REASON_NO_CURVE] >= 1
        for sock in (plain, stranger, member):
            sock.close()
    finally:
        stop(service, thread)
        context.destroy(linger=0)


def test_a_lookup_client_follows_the_advertised_port_and_forgets_a_dead_one(controller):
    ports = LookupPorts()
    address = ("127.0.0.1", controller.port)
    client = FailoverControllerClient([address], timeout_s=0.5, lookup_ports=ports)
    main = ControllerClient("127.0.0.1", controller.port)
    try:
        client.call("ping")
        assert controller.served["control"]["messages"] >= 1
        ports.learn(address, main.call("ping"))
        assert ports.get(address) == controller.lookup_port
        client.call("ping")
        assert controller.served["lookup"]["messages"] == 1
        assert call_all([(client, "ping", {})], 2.0)[0]["type"] == "ok"
        assert controller.served["lookup"]["messages"] == 2
        # hostile or missing advertisements: nothing learned, the control port is used
        for bad in ({"lookup_port": 0}, {"lookup_port": "1"}, {"lookup_port": True},
                    {"lookup_port": 70000}, {}):
            ports.learn(address, bad)
            assert ports.get(address) is None
        # a port where nobody answers (a restarted controller's old one) is forgotten
        ports.learn(address, {"lookup_port": free_port()})
        with pytest.raises(ControllerUnavailable):
            client.call("ping")
        assert ports.get(address) is None
        assert client.call("ping")["type"] == "ok"  # back on the control port
        ports.learn(address, {"lookup_port": free_port()})
        assert isinstance(call_all([(client, "ping", {})], 0.5)[0], ControllerUnavailable)
        assert ports.get(address) is None
    finally:
        client.close()
        main.close()


SIG = ModelSignature(model="lane-model", chunk_tokens=16)


@pytest.mark.parametrize("shards", [1, 2])
def test_a_workers_lookups_go_to_the_advertised_lookup_port(tmp_path, shards):
    cluster = LocalCluster(heartbeat_timeout_s=3.0, runtime_dir=tmp_path)
    try:
        if shards > 1:
            cluster.start_shards(shards, "--heartbeat-interval", "0.3")
        else:
            cluster.start_controller("--heartbeat-interval", "0.3")
        cluster.start_worker("a")
        cluster.start_worker("b")
        tokens = list(range(8 * SIG.chunk_tokens))
        with cluster.client("a") as a, cluster.client("b") as b:
            assert a.put(SIG, tokens, [b"x" * 1024] * 8) == 8
            wait_until(lambda: b.lookup(SIG, tokens).peer_tokens == 8 * SIG.chunk_tokens, 10,
                       "the chunks found through the controller")
        for shard in range(shards):
            client = cluster.controller_client(timeout_s=5.0, shard=shard)
            try:
                sockets = client.call("stats")["sockets"]
            finally:
                client.close()
            assert sockets["lookup"]["lookups"] >= 1, sockets
            assert sockets["control"]["lookups"] == 0, sockets
    finally:
        cluster.stop()
