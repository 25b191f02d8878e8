"""``lmshare demo`` in a real terminal (tmux): the dashboard shows the workers and peer hits,
``q`` / Ctrl-C stop it cleanly, and nothing is left behind (processes, shared memory)."""

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmshare.local_cluster import free_port
from lmshare.shm import shm_dir

TMUX = shutil.which("tmux")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(TMUX is None, reason="tmux is not installed (Debian: apt-get install -y "
                                            "tmux, or `make system-deps`); this test drives "
                                            "the demo in a real terminal through it"),
]


def lmshare_processes(port: int) -> dict[int, list[str]]:
    """Processes of this demo run: the demo itself, its controller and its workers."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        joined = " ".join(argv)
        ours = f"--port {port}" in joined or f"127.0.0.1:{port}" in joined
        if ours and ("lmshare" in argv or argv[1:2] and argv[1].endswith("/lmshare")):
            found[int(entry.name)] = argv
    return found


class Tmux:
    def __init__(self, name: str) -> None:
        self.base = [TMUX, "-L", name, "-f", "/dev/null"]

    def __call__(self, *args: str) -> str:
        return subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "demo")

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=10)


@pytest.mark.parametrize("stop_key", ["q", "C-c"])
def test_demo_dashboard_in_tmux(tmp_path, stop_key):
    port = free_port()
    exit_file = tmp_path / "exit-code"
    demo = (f"{shlex.quote(sys.executable)} -m lmshare demo --workers 3 --port {port} "
            f"--duration 120; echo $? > {shlex.quote(str(exit_file))}; sleep 60")
    tmux = Tmux(f"lmshare-test-{os.getpid()}-{stop_key}")
    processes: dict[int, list[str]] = {}
    try:
        tmux("new-session", "-d", "-s", "demo", "-x", "80", "-y", "24", demo)
        deadline = time.monotonic() + 60
        screen = ""
        while True:
            screen = tmux.screen()
            peer = re.search(r"peer (\d+)%", screen)
            if all(f"worker-{i}" in screen for i in (1, 2, 3)) and peer and int(peer.group(1)):
                break
            assert time.monotonic() < deadline, f"no workers and peer hits on screen:\n{screen}"
            time.sleep(0.5)
        assert "3 alive" in screen and "q quit" in screen
        processes = lmshare_processes(port)
        workers = [pid for pid, argv in processes.items() if "worker" in argv]
        assert len(workers) == 3, processes

        tmux("send-keys", "-t", "demo", stop_key)
        deadline = time.monotonic() + 45
        while not exit_file.exists() or not exit_file.read_text().strip():
            assert time.monotonic() < deadline, f"the demo did not exit:\n{tmux.screen()}"
            time.sleep(0.2)
        assert exit_file.read_text().strip() == "0", tmux.screen()
        screen = tmux.screen()
        assert "lmshare demo: done." in screen and "Traceback" not in screen, screen
        assert not lmshare_processes(port), "lmshare processes left behind"
        leftovers = [p for pid in workers for p in shm_dir().glob(f"lmshare-{pid}-*")]
        assert not leftovers, f"shared memory left behind: {leftovers}"
    finally:
        tmux.kill()
        for pid in {*processes, *lmshare_processes(port)}:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
