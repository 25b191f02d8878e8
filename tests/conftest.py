import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Property tests check what happens, not how fast: on a busy machine one example can take far
# longer than hypothesis' 200 ms default deadline (a flaky failure that says nothing).
settings.register_profile("lmshare", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("lmshare")


@pytest.fixture(autouse=True)
def _private_runtime_dir(monkeypatch, tmp_path):
    """Each test gets its own worker endpoint directory."""
    monkeypatch.setenv("LMSHARE_RUNTIME_DIR", str(tmp_path / "run"))
    yield


@pytest.fixture
def shm_dir(monkeypatch):
    path = Path(tempfile.mkdtemp(prefix="lmshare-test-shm-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    monkeypatch.setenv("LMSHARE_SHM_DIR", str(path))
    yield path
    for leftover in path.glob("*"):
        leftover.unlink()
    path.rmdir()


@pytest.fixture
def keyed_cluster(tmp_path, monkeypatch):
    """Start a LocalCluster (keyword arguments: LocalCluster's) with its controller
    heartbeating every 0.3 s; the CLI commands a test runs find its key in LMSHARE_KEY_FILE.
    Stopped after the test."""
    from lmshare.local_cluster import LocalCluster

    started = []

    def start(**options):
        cluster = LocalCluster(runtime_dir=tmp_path / f"cluster-{len(started)}", **options)
        started.append(cluster)
        monkeypatch.setenv("LMSHARE_KEY_FILE", cluster.key_file)
        cluster.start_controller("--heartbeat-interval", "0.3")
        return cluster
    yield start
    for cluster in started:
        cluster.stop()
