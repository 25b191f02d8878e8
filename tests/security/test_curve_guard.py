"""The CURVE guard counts refusals, not clients that gave up: a connection closed before its
handshake finished (a client timing out on a busy server, a port probe) is not logged as a
process without the cluster's key."""

from __future__ import annotations

import socket

import zmq

from lmshare.credentials import generate_key_file
from lmshare.curve import REASON_NO_CURVE, CurveGuard, secure_client
from lmshare.testing.waiting import wait_until


def test_a_connection_closed_mid_handshake_is_not_a_refusal(tmp_path, caplog):
    key = generate_key_file(tmp_path / "cluster.key")
    context = zmq.Context()
    guard = CurveGuard(context, key, "test server")
    server = context.socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    guard.secure_server(server, key)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    try:
        for _ in range(3):  # connect and close before saying anything
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        member = context.socket(zmq.DEALER)
        member.setsockopt(zmq.LINGER, 0)
        secure_client(member, key.curve_client())
        member.connect(f"tcp://127.0.0.1:{port}")
        member.send(b"hello")
        assert server.poll(10_000) and server.recv_multipart()[-1] == b"hello"
        # one connection that speaks no CURVE (garbage for a greeting): refused
        with socket.create_connection(("127.0.0.1", port), timeout=5) as garbage:
            garbage.sendall(b"\xff" * 64)
            wait_until(lambda: guard.counts().get(REASON_NO_CURVE, 0) >= 1, 10, "the refusal")
        member.close()
        # the probes' events came before the member's message: all were seen, none counted
        assert guard.counts() == {REASON_NO_CURVE: 1}
        refusals = [r for r in caplog.records if "refused a connection" in r.getMessage()]
        assert len(refusals) == 1
    finally:
        guard.close()
        server.close()
        context.destroy(linger=0)
