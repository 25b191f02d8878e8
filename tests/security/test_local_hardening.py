"""Local attacks: a squatted runtime directory, planted or injected shared-memory paths, and
terminal escape codes in names. Refused with a clear message; nothing read, nothing printed raw."""

import os
from pathlib import Path

import pytest

from lmshare import ModelSignature
from lmshare.client import Client
from lmshare.errors import ConfigError
from lmshare.keys import signature_keys
from lmshare.shm import SharedRegion
from lmshare.testing.waiting import wait_until
from lmshare.worker.config import host_identity

from .conftest import run_cli

SIG = ModelSignature(model="local-attack", chunk_tokens=16)
NOBODY = 65534


def squat(path, mode: int, owner: int | None = None):
    path.mkdir(mode=mode)
    os.chmod(path, mode)  # past the umask
    if owner is not None:
        os.chown(path, owner, owner)
    return path


@pytest.mark.parametrize("how", ["world-writable", "other-owner", "symlink"])
def test_a_squatted_runtime_dir_is_refused(cluster, tmp_path, how):
    cluster.start_controller()
    if how == "world-writable":
        runtime = squat(tmp_path / "squat", 0o777)
    elif how == "other-owner":
        if os.getuid() != 0:
            pytest.skip("chown to another user needs root")
        runtime = squat(tmp_path / "squat", 0o700, NOBODY)
    else:
        target = squat(tmp_path / "elsewhere", 0o700)
        runtime = tmp_path / "squat"
        runtime.symlink_to(target)
    env = dict(cluster.env(), LMSHARE_RUNTIME_DIR=str(runtime))
    result = run_cli("worker", "--controller", cluster.controller_address, "--name", "victim",
                     "--cache-size", "16MiB", env=env)
    assert result.returncode == 2, result.stderr
    assert "runtime directory" in result.stderr and "Traceback" not in result.stderr
    assert not list(runtime.glob("*.sock"))
    assert "victim" not in [w.worker_id for w in cluster.stats().workers]
    # a client refuses to talk to a socket in such a directory
    with pytest.raises(ConfigError, match="runtime directory"):
        Client(endpoint=f"ipc://{runtime}/worker-victim.sock", timeout_s=0.5)


def test_planted_shared_memory_files_are_not_mapped(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"root-only secret" * 4096)
    os.chmod(secret, 0o600)
    link = tmp_path / "lmshare-1-link"
    link.symlink_to(secret)
    with pytest.raises(ConfigError, match="link"):
        SharedRegion.attach(link, 4096, writable=False)
    shared = tmp_path / "lmshare-1-shared"
    shared.write_bytes(bytes(65536))
    os.chmod(shared, 0o644)
    with pytest.raises(ConfigError, match="mode 644"):
        SharedRegion.attach(shared, 4096, writable=False)
    if os.getuid() == 0:
        os.chmod(shared, 0o600)
        os.chown(shared, NOBODY, NOBODY)
        with pytest.raises(ConfigError, match="belongs to uid"):
            SharedRegion.attach(shared, 4096, writable=False)


def test_a_registration_cannot_make_a_worker_map_a_path(cluster, tmp_path):
    """A member's forged registration (same host id, shm, a region path, an endpoint and a data
    port of its choice) makes no worker map the path: a same-host reader locates on the data
    port and maps only the pool the worker answering there names (another worker's data port
    answers with its own pool, where the forged chunks are not)."""
    cluster.start_controller()
    cluster.start_worker("victim", "16MiB")
    cluster.start_worker("other", "16MiB")
    secret = tmp_path / "secret"
    secret.write_bytes(b"root-only secret" * 4096)
    os.chmod(secret, 0o600)
    tokens = list(range(16 * 2))
    keys = signature_keys(SIG, tokens)
    controller = cluster.controller_client()
    outside = tmp_path / "outside"
    outside.mkdir(mode=0o700)
    with cluster.client("other") as other:
        other_port = other.stats()["data_port"]
    try:
        for name, endpoint, port in (("evil-path", f"ipc://{outside}/worker-x.sock", 9),
                                     ("evil-other", cluster.worker_endpoint("other"), other_port)):
            epoch = controller.call(
                "register", worker_id=name, host="127.0.0.1", data_port=port,
                transports=["shm", "tcp"], capacity_bytes=1 << 30, host_id=host_identity(),
                extra={"region_path": str(secret), "generation_path": str(secret),
                       "region_bytes": 65536, "slab_bytes": 4096, "endpoint": endpoint})["epoch"]
            # (a member can record digests for keys nobody stored yet)
            controller.call("batch", worker_id=name, epoch=epoch, seq=1,
                            admit={SIG.namespace(): keys}, evict=[],
                            digests={k: bytes(16) for k in keys})
        with cluster.client("victim") as victim:
            wait_until(lambda: victim.lookup(SIG, tokens).peer_tokens == 32, 5, "the forgery")
            for direct in (False, True):
                with victim.acquire(SIG, tokens, direct=direct) as hit:
                    assert len(hit) == 0
            assert victim.stats()["counters"]["entries"] == 0
            maps = Path(f"/proc/{cluster.workers['victim'].process.pid}/maps").read_text()
            assert str(secret) not in maps
        log = cluster.workers["victim"].log_text()
        assert "Connection refused" in log  # (the forged data port was tried, and failed)
        assert "root-only secret" not in log
    finally:
        controller.close()


def test_names_with_escape_codes_are_printed_sanitized(cluster):
    cluster.start_controller()
    evil = "evil\x1b[2J\x1b]0;owned\x07\u202e"
    controller = cluster.controller_client()
    try:
        controller.call("register", worker_id=evil, host="127.0.0.1\x1b[31m", data_port=9,
                        transports=["tcp\x1b[5m"], capacity_bytes=1, host_id="h\x1b[0m")
    finally:
        controller.close()
    for command in (["status"], ["status", "--json"], ["dashboard", "--once"]):
        result = run_cli(*command, "--controller", cluster.controller_address,
                         env=dict(cluster.env(), COLUMNS="200"))
        assert result.returncode == 0, result.stderr
        assert "evil" in result.stdout
        assert "\x1b]" not in result.stdout and "\x1b[2J" not in result.stdout
        assert "\x07" not in result.stdout and "\u202e" not in result.stdout
