"""A source checkout runs: from the repository root, ``python -m lmshare ...`` and
``lmshare demo`` work with a regular and with an editable install (the demo's children run
``python -m lmshare`` there, which finds the checkout first)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(extra)
    return env


def _regular(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """``pip install .`` (a wheel, not editable) into its own folder: its ``bin/lmshare``."""
    wheels, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(wheels), str(ROOT)], check=True, timeout=300)
    (wheel,) = wheels.glob("lmshare-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, timeout=300)
    return target / "bin" / "lmshare", _env(PYTHONPATH=str(target))


def _editable(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """``pip install -e .`` into a virtualenv of its own (its dependencies those of the
    interpreter running the tests): its ``bin/lmshare``."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"], check=True,
                             capture_output=True, text=True, timeout=60).stdout.strip()
    # a path line adds the test interpreter's packages (its own .pth files are not run)
    (Path(purelib) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                    "--no-deps", "--no-build-isolation", "-q", "-e", str(ROOT)], check=True,
                   timeout=300)
    return venv / "bin" / "lmshare", _env()


@pytest.mark.parametrize("install", [_regular, _editable], ids=["regular", "editable"])
def test_a_checkout_runs_from_its_root(install, tmp_path):
    script, env = install(tmp_path)
    (tmp_path / "shm").mkdir()
    env["LMSHARE_SHM_DIR"] = str(tmp_path / "shm")
    python = script.parent / "python" if (script.parent / "python").exists() else sys.executable
    for command in ("controller", "worker", "status"):
        result = subprocess.run([str(python), "-m", "lmshare", command, "--help"], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "usage: lmshare" in result.stdout
    imported = subprocess.run([str(python), "-c", "import lmshare.controller.service, "
                               "lmshare.worker.agent, lmshare.dashboard.app; import lmshare; "
                               "print(lmshare.__file__)"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)
    assert imported.returncode == 0, imported.stderr
    demo = subprocess.run([str(script), "demo", "--no-dashboard", "--duration", "3",
                           "--workers", "2", "--cache-size", "64MiB"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    done = next(line for line in demo.stdout.splitlines() if "lmshare demo: done." in line)
    assert " 0 req " not in done and "verified" in done, done
