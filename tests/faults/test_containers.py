"""Workers in containers: their own PID and mount namespaces (``unshare``), a small tmpfs as
/dev/shm, or one /dev/shm shared between containers. Needs root and util-linux's unshare."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from lmshare.keys import ModelSignature
from lmshare.local_cluster import LocalCluster
from lmshare.shm import NameLock, remove_stale_regions
from lmshare.testing.waiting import wait_until

SIG = ModelSignature(model="container-model", chunk_tokens=16)

needs_namespaces = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare (util-linux) for PID and mount namespaces")


def container(shm_mb: int | None = None) -> tuple[str, ...]:
    """A prefix running the command as in a container: new PID and mount namespaces, /proc of
    its own (the command is pid 1 there), optionally a private ``shm_mb`` MiB tmpfs as
    /dev/shm. Stopping the prefix's process stops the command (SIGTERM)."""
    script = 'exec "$0" "$@"'
    if shm_mb is not None:
        script = f"mount -t tmpfs -o size={shm_mb}m tmpfs /dev/shm && {script}"
    return ("unshare", "--pid", "--mount", "--mount-proc", "--kill-child=SIGTERM", "sh", "-c",
            script)


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    monkeypatch.delenv("LMSHARE_SHM_DIR", raising=False)
    c = LocalCluster(heartbeat_timeout_s=5.0, runtime_dir=tmp_path)
    c.start_controller("--heartbeat-interval", "0.3")
    try:
        yield c
    finally:
        c.stop()


def _worker_cli(cluster: LocalCluster, name: str, cache: str, prefix: tuple[str, ...],
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "lmshare", "worker", "--controller",
                           cluster.controller_address, "--name", name, "--cache-size", cache],
                          capture_output=True, text=True, timeout=60,
                          env=env or cluster.env())


@needs_namespaces
def test_a_pool_larger_than_dev_shm_is_refused_at_start_with_the_fix(cluster):
    """Docker's default /dev/shm is 64 MiB: a 128 MiB pool exits 2 with one line naming
    --shm-size and --cache-size, instead of starting and dying of SIGBUS on a later write."""
    result = _worker_cli(cluster, "too-big", "128MiB", container(shm_mb=64))
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "--shm-size" in errors[0] and "--cache-size" in errors[0]


@needs_namespaces
def test_a_pool_that_fits_is_fully_usable(cluster):
    """48 MiB of a 64 MiB /dev/shm: a client in the container writes 80 MiB through the pool
    (filling it, then evicting) with no SIGBUS, since the worker reserved every page at start."""
    # its clients' regions lie in the container's /dev/shm: wait for its ready line instead
    # of connecting a client from out here
    cluster.start_worker("fits", "48MiB", prefix=container(shm_mb=64), wait=False)
    wait_until(lambda: "registered in" in cluster.workers["fits"].log_text(), 30,
               "the worker in the container to register")
    unshare_pid = cluster.workers["fits"].process.pid
    worker_pid = subprocess.run(["pgrep", "-P", str(unshare_pid)], capture_output=True,
                                text=True).stdout.split()[0]
    code = ("import os, sys\n"
            "from lmshare.client import Client\n"
            "from lmshare.keys import ModelSignature\n"
            "c = Client(endpoint=sys.argv[1])\n"
            "s = ModelSignature(model='container-model', chunk_tokens=16)\n"
            "print(sum(c.put(s, list(range(i * 10**6, i * 10**6 + 160)),\n"
            "                [os.urandom(1 << 20) for _ in range(10)]) for i in range(8)))\n")
    result = subprocess.run(["nsenter", "-t", worker_pid, "-m", sys.executable, "-c", code,
                             cluster.worker_endpoint("fits")], capture_output=True, text=True,
                            timeout=60, env=cluster.env())
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) == 80
    assert cluster.workers["fits"].alive()
    assert "evict" not in result.stderr


@needs_namespaces
def test_containers_sharing_dev_shm_keep_each_others_pools(cluster, shm_dir):
    """A worker on the host and one in a container with its own PID namespace share /dev/shm:
    the container's stale-region cleanup, which cannot see the host worker's pid, leaves its
    live pool alone (it used to delete it as a dead worker's)."""
    env = {**cluster.env(), "LMSHARE_SHM_DIR": str(shm_dir)}
    cluster.extra_env["LMSHARE_SHM_DIR"] = str(shm_dir)
    cluster.start_worker("first", "16MiB")
    regions = sorted(p.name for p in shm_dir.glob("lmshare-[0-9]*-first*"))
    assert len(regions) == 2, "the first worker's pool and generation regions"
    for path in shm_dir.glob("lmshare-*"):
        os.utime(path, (0, 0))  # as old as a long-running worker's
    cluster.start_worker("second", "16MiB", prefix=container())
    assert sorted(p.name for p in shm_dir.glob("lmshare-[0-9]*-first*")) == regions
    # and the first still serves local clients (which map its region by path)
    with cluster.client("first") as client:
        tokens = list(range(2 * SIG.chunk_tokens))
        data = [os.urandom(10_000) for _ in range(2)]
        assert client.put(SIG, tokens, data) == 2
        assert client.get(SIG, tokens) == data
    # a second worker named "first", in a container, is refused
    result = _worker_cli(cluster, "first", "16MiB", container(), env=env)
    assert result.returncode == 2
    assert "already running" in result.stderr and "--name" in result.stderr
    # once the first is killed (no clean-up of its own), its files are stale and removed
    cluster.workers["first"].kill()
    for path in shm_dir.glob("lmshare-*first*"):
        os.utime(path, (0, 0))
    removed = {p.name for p in remove_stale_regions()}
    assert set(regions) <= removed
    assert any(n.startswith("lmshare-worker-") and n.endswith("-first.lock") for n in removed)
    assert list(shm_dir.glob("lmshare-*second*"))  # the live container's files stay


def test_a_second_worker_with_a_running_name_is_refused(cluster, shm_dir):
    cluster.extra_env["LMSHARE_SHM_DIR"] = str(shm_dir)
    cluster.start_worker("twin", "16MiB")
    result = _worker_cli(cluster, "twin", "16MiB", ())
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "already running" in errors[0], result.stderr
    assert cluster.workers["twin"].alive()
    names = [w.worker_id for w in cluster.stats().workers if w.state == "alive"]
    assert names == ["twin"]
    cluster.workers["twin"].terminate()
    cluster_scope = cluster.controller_address.replace(":", "_")
    lock = NameLock("twin", cluster_scope)  # a clean stop gave the name up
    lock.release()
    other = NameLock("twin", "another-controller_7800")  # another cluster may use the name
    other.release()


@pytest.mark.parametrize("args, words", [
    (("controller", "--heartbeat-timeout", "nan"), "--heartbeat-timeout"),
    (("controller", "--heartbeat-interval", "-1"), "--heartbeat-interval"),
    (("controller", "--max-message-bytes", "0"), "--max-message-bytes"),
    (("worker", "--controller", "127.0.0.1:1", "--fetch-timeout", "nan"), "--fetch-timeout"),
    (("worker", "--controller", "127.0.0.1:1", "--connect-timeout", "inf"), "--connect-timeout"),
    (("worker", "--controller", "127.0.0.1:1", "--cache-size", "0"), "--cache-size"),
    (("status", "--timeout", "0"), "--timeout"),
])
def test_cli_values_are_validated(args, words):
    result = subprocess.run([sys.executable, "-m", "lmshare", *args], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and words in errors[0] and "Traceback" not in result.stderr


def test_a_missing_shm_dir_is_one_line_naming_the_setting(tmp_path):
    missing = tmp_path / "not-made"
    result = subprocess.run([sys.executable, "-m", "lmshare", "worker", "--insecure",
                             "--controller", "127.0.0.1:1", "--cache-size", "16MiB"],
                            capture_output=True, text=True, timeout=30,
                            env={**os.environ, "LMSHARE_SHM_DIR": str(missing)})
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "LMSHARE_SHM_DIR" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and not missing.exists()
