"""`pip install .` (not editable) gives a working CLI, and the services start without torch."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(ROOT)], check=True, timeout=300)
    (path,) = out.glob("lmshare-*.whl")
    return path


def test_wheel_holds_every_part_under_one_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("lmshare/cli.py", "lmshare/pool.py", "lmshare/controller/service.py",
                   "lmshare/worker/agent.py", "lmshare/transports/tcp.py",
                   "lmshare/router/service.py"):
        assert module in names
    assert not any(n.startswith(("controller/", "worker/", "router/", "tests/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "lmshare = lmshare.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_wheel_runs_without_torch(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, timeout=300)
    code = ("import sys; sys.modules['torch'] = None\n"  # importing torch would now fail
            "import lmshare.cli, lmshare.controller, lmshare.worker, lmshare.client\n"
            "print(lmshare.cli.__file__)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                            text=True, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert str(target) in result.stdout
    help_text = subprocess.run([sys.executable, "-m", "lmshare", "--help"], cwd=tmp_path,
                               capture_output=True, text=True, timeout=60,
                               env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert help_text.returncode == 0
    for command in ("controller", "worker", "status", "demo"):
        assert command in help_text.stdout
