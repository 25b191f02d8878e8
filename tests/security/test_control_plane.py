"""Cluster credentials and the CURVE control plane, through the CLI and raw sockets: a process
without the cluster key gets nothing from the controller, is logged once and counted."""

import os
import stat

import msgpack
import pytest
import zmq

from lmshare import protocol
from lmshare.credentials import load_key_file
from lmshare.errors import ConfigError, RemoteError
from lmshare.local_cluster import free_port
from lmshare.testing.waiting import wait_until

from .conftest import run_cli, scrape


def test_keygen_makes_a_private_key_and_never_overwrites(tmp_path):
    path = tmp_path / "cluster.key"
    made = run_cli("keygen", "--out", str(path))
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_key_file(path)
    assert key.fingerprint in made.stdout and key.secret.hex() not in made.stdout
    again = run_cli("keygen", "--out", str(path))
    assert again.returncode == 2 and "never overwrites" in again.stderr
    assert load_key_file(path).secret == key.secret


def test_a_key_others_can_read_is_refused(tmp_path):
    path = tmp_path / "cluster.key"
    assert run_cli("keygen", "--out", str(path)).returncode == 0
    os.chmod(path, 0o644)
    try:
        load_key_file(path)
        raise AssertionError("a world-readable key was accepted")
    except ConfigError as exc:
        assert "chmod 600" in str(exc)
    started = run_cli("controller", "--port", str(free_port()), "--key-file", str(path))
    assert started.returncode == 2 and "chmod 600" in started.stderr
    assert "Traceback" not in started.stderr


def test_no_key_no_start_unless_insecure(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LMSHARE_KEY_FILE"}
    for command in (["controller", "--port", str(free_port())],
                    ["worker", "--controller", f"127.0.0.1:{free_port()}", "--cache-size",
                     "16MiB"],
                    ["status", "--controller", f"127.0.0.1:{free_port()}"],
                    ["dashboard", "--once", "--controller", f"127.0.0.1:{free_port()}"]):
        result = run_cli(*command, env=env)
        assert result.returncode == 2, (command, result.stderr)
        assert "lmshare keygen" in result.stderr and "--insecure" in result.stderr
        assert "Traceback" not in result.stderr
    # --insecure is an explicit choice: the command then runs (here: finds no controller)
    result = run_cli("status", "--insecure", "--timeout", "0.3", "--controller",
                     f"127.0.0.1:{free_port()}", env=env)
    assert result.returncode == 2 and "not reachable" in result.stderr


def test_unauthenticated_peers_get_nothing_and_are_logged_once_and_counted(cluster, tmp_path):
    metrics = free_port()
    cluster.start_controller("--metrics-port", str(metrics))
    cluster.start_worker("member", "16MiB")
    address = cluster.controller_address

    # a raw zmq client without CURVE: its "stats" request is never answered
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{address}")
    sock.send(protocol.encode(protocol.request("stats", 1)))
    assert not sock.poll(1500, zmq.POLLIN)
    sock.close()
    # a raw TCP speaker of garbage
    import socket
    host, port = address.split(":")
    with socket.create_connection((host, int(port)), timeout=2) as raw:
        raw.sendall(b"\xff" * 64 + msgpack.packb({"type": "register"}))
        raw.settimeout(2)
        try:
            leaked = raw.recv(4096)
        except (TimeoutError, ConnectionResetError):
            leaked = b""
        assert b"worker" not in leaked and b"member" not in leaked
    # the CLI with another cluster's key, and with none
    other = tmp_path / "other.key"
    assert run_cli("keygen", "--out", str(other)).returncode == 0
    env = {k: v for k, v in cluster.env().items() if k != "LMSHARE_KEY_FILE"}
    wrong = run_cli("status", "--controller", address, "--timeout", "1", "--key-file", str(other),
                    env=env)
    assert wrong.returncode == 2 and "not reachable" in wrong.stderr and "member" not in wrong.stdout
    plain = run_cli("status", "--controller", address, "--timeout", "1", "--insecure", env=env)
    assert plain.returncode == 2 and "member" not in plain.stdout
    intruder = run_cli("worker", "--controller", address, "--cache-size", "16MiB", "--name",
                       "intruder", "--insecure", "--connect-timeout", "1", env=env)
    assert intruder.returncode == 2 and "not reachable" in intruder.stderr

    # members still get everything; the refusals are counted (stats, metrics) and logged once
    member = run_cli("status", "--controller", address, "--json", env=cluster.env())
    assert member.returncode == 0, member.stderr
    assert '"member"' in member.stdout and "intruder" not in member.stdout
    stats = cluster.stats()
    assert stats.secure and stats.refused_connections.get("handshake", 0) >= 5
    assert [w.worker_id for w in stats.workers] == ["member"]
    samples = wait_until(lambda: scrape(metrics), 10, "controller metrics")
    assert samples[("lmshare_controller_refused_connections_total",
                    (("reason", "handshake"),))] >= 5
    log = cluster.controller.log_text()
    refusals = [line for line in log.splitlines() if "refused a connection from 127.0.0.1" in line]
    assert len(refusals) == 1, log  # once per address, however often it retries
    context.term()


def test_worker_epochs_cannot_be_guessed(cluster):
    """Even a member cannot deregister (or feed) another worker by guessing its epoch."""
    cluster.start_controller()
    cluster.start_worker("real", "16MiB")
    controller = cluster.controller_client()
    try:
        mine = [controller.call("register", worker_id=f"probe-{i}", host="127.0.0.1",
                                data_port=9, transports=["tcp"], capacity_bytes=1,
                                host_id="h")["epoch"] for i in range(3)]
        assert max(mine) > 2**32 and sorted(b - a for a, b in zip(mine, mine[1:])) != [1, 1]
        for guess in [*range(min(mine) - 50, min(mine) + 50), *(e + 1 for e in mine)]:
            with pytest.raises(RemoteError) as refused:
                controller.call("deregister", worker_id="real", epoch=guess)
            assert refused.value.code == "unknown_worker"
    finally:
        controller.close()
    assert "real" in [w.worker_id for w in cluster.stats().workers
                      if w.state == "alive"]
