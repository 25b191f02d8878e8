"""Helpers of the attack tests: the CLI as a subprocess, raw sockets, scrapes."""

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmshare.local_cluster import LocalCluster


def run_cli(*args: str, env: dict | None = None, timeout: float = 30
            ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmshare", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one Prometheus scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(autouse=True)
def _private_shm_dir(monkeypatch):
    """Pools (and the host-wide lock on worker names) in a directory of this test's own, so
    tests running at the same time on one host never collide over a worker name."""
    path = tempfile.mkdtemp(prefix="lmshare-security-",
                            dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    monkeypatch.setenv("LMSHARE_SHM_DIR", path)
    yield
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cluster(tmp_path):
    """A keyed cluster (LocalCluster makes its own key); the test starts its processes."""
    c = LocalCluster(heartbeat_timeout_s=10.0, runtime_dir=tmp_path / "cluster")  # fakes beat rarely
    try:
        yield c
    finally:
        c.stop()
