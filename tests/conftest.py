import os
import tempfile
from pathlib import Path

import pytest


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
