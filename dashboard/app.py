"""The live dashboard: a stats poller thread, a key reader thread, and a full-screen rich Live.

The poller asks the controller for its ClusterStats every ``refresh_s``; when the controller is
away the frame says so (keeping the last data) and the poller keeps trying, so the dashboard
picks the cluster up again when the controller is back. Keys are read from the terminal in
cbreak mode; the terminal is restored on every exit path (``q``, Ctrl-C, an exception).
"""

from __future__ import annotations

import logging
import os
import queue
import select
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.live import Live

from lmshare.control import shard_clients
from lmshare.credentials import ClusterKey
from lmshare.dashboard.view import SORTS, ViewState, budget, render
from lmshare.errors import LMShareError
from lmshare.stats import ClusterStats, RouterStats, fetch_shard_stats

log = logging.getLogger(__name__)


def fetch_router_stats(url: str, timeout_s: float) -> RouterStats:
    """A router's ``/router/stats``."""
    import json
    import urllib.request

    with urllib.request.urlopen(f"{url.rstrip('/')}/router/stats", timeout=timeout_s) as reply:
        return RouterStats.from_dict(json.loads(reply.read(1 << 20)))


class StatsPoller:
    """Fetches the controller's ClusterStats in a thread; the latest result is always at hand."""

    def __init__(self, controller: str, interval_s: float = 0.5, timeout_s: float = 1.0,
                 key: ClusterKey | None = None, router: str = "") -> None:
        self.controller = controller
        self.router = router  # a router's base URL, polled beside the controller
        self.timeout_s = timeout_s
        self.router_stats: RouterStats | None = None
        self.router_error: str | None = None
        self.interval_s = interval_s
        self._clients = shard_clients(controller, timeout_s, key)  # one per controller shard
        self.stats: ClusterStats | None = None
        self.error: str | None = None
        self.error_since = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmshare-dashboard-poll",
                                        daemon=True)

    def poll_once(self) -> ClusterStats | None:
        """One fetch; on failure remembers the error (and since when) instead of raising."""
        try:
            self.stats = fetch_shard_stats(self._clients)
            self.error = None
        except (LMShareError, KeyError, TypeError, ValueError) as exc:
            if self.error is None:
                self.error_since = time.monotonic()
                log.debug("controller %s unreachable: %s", self.controller, exc)
            self.error = str(exc) or type(exc).__name__
        if self.router:
            try:
                self.router_stats = fetch_router_stats(self.router, self.timeout_s)
                self.router_error = None
            except (OSError, ValueError, TypeError) as exc:
                self.router_error = str(exc) or type(exc).__name__
        return self.stats

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.poll_once()
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def start(self) -> StatsPoller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=3)
        for client in self._clients:
            client.close()


KEY_NAMES = {"\x1b[6~": "next", "\x1b[5~": "prev", "\x1b[B": "next", "\x1b[A": "prev",
             "\x1b[C": "next", "\x1b[D": "prev", " ": "next", "n": "next", "p": "prev",
             "q": "quit", "Q": "quit", "s": "sort", "S": "sort"}


def parse_keys(data: str) -> list[str]:
    """Key names in a chunk read from the terminal (escape sequences count as one key)."""
    keys, i = [], 0
    while i < len(data):
        for length in (4, 3):
            if len(data[i:i + length]) == length and data[i:i + length] in KEY_NAMES:
                keys.append(KEY_NAMES[data[i:i + length]])
                i += length
                break
        else:
            name = KEY_NAMES.get(data[i])
            if name:
                keys.append(name)
            i += 1
    return keys


@contextmanager
def key_reader(stop: threading.Event) -> Iterator[queue.Queue[str]]:
    """Yields a queue of key names typed on the controlling terminal (empty if stdin is not a
    tty). Puts the tty in cbreak mode (Ctrl-C still interrupts) and restores it on exit."""
    keys: queue.Queue[str] = queue.Queue()
    fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
    if fd is None:
        yield keys
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    done = threading.Event()

    def read() -> None:
        while not done.is_set() and not stop.is_set():
            try:
                ready, _, _ = select.select([fd], [], [], 0.1)
                if not ready:
                    continue
                data = os.read(fd, 64)
            except OSError:
                return
            if not data:
                return
            for name in parse_keys(data.decode(errors="ignore")):
                keys.put(name)

    try:
        tty.setcbreak(fd)
        thread = threading.Thread(target=read, name="lmshare-dashboard-keys", daemon=True)
        thread.start()
        yield keys
    finally:
        done.set()
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _frame(poller: StatsPoller, state: ViewState, console: Console, height: int | None):
    state.error = poller.error
    state.error_for_s = time.monotonic() - poller.error_since if poller.error else 0.0
    state.router_stats, state.router_error = poller.router_stats, poller.router_error
    return render(poller.stats, console.size.width, height, state)


def print_once(controller: str, console: Console | None = None, timeout_s: float = 3.0,
               key: ClusterKey | None = None, router: str = "") -> int:
    """Print a single frame (``lmshare dashboard --once``). Raises if the controller is away."""
    console = console or Console()
    clients = shard_clients(controller, timeout_s, key)
    try:
        stats = fetch_shard_stats(clients)
    finally:
        for client in clients:
            client.close()
    state = ViewState(controller=controller, keys_help=False, router=router)
    if router:
        try:
            state.router_stats = fetch_router_stats(router, timeout_s)
        except (OSError, ValueError, TypeError) as exc:
            state.router_error = str(exc) or type(exc).__name__
    height = console.size.height if console.is_terminal else None
    console.print(render(stats, console.size.width, height, state))
    return 0


def run_dashboard(controller: str, refresh_s: float = 0.5, stop: threading.Event | None = None,
                  footer: Callable[[], str] | None = None, console: Console | None = None,
                  key: ClusterKey | None = None, router: str = "") -> int:
    """Run the full-screen dashboard until ``q``, Ctrl-C, or ``stop`` is set. Returns 0."""
    console = console or Console()
    stop = stop or threading.Event()
    refresh_s = min(max(0.1, refresh_s), 0.5)  # at least twice a second
    poller = StatsPoller(controller, refresh_s, timeout_s=max(1.0, refresh_s * 2),
                         key=key, router=router).start()
    state = ViewState(controller=controller, router=router)
    try:
        with key_reader(stop) as keys, Live(console=console, screen=True, auto_refresh=False,
                                            transient=True, redirect_stderr=False,
                                            redirect_stdout=False) as live:
            while not stop.is_set():
                state.footer = footer() if footer else ""
                height = console.size.height
                live.update(_frame(poller, state, console, height), refresh=True)
                deadline = time.monotonic() + refresh_s
                while not stop.is_set():
                    try:
                        key = keys.get(timeout=max(0.0, min(0.1, deadline - time.monotonic())))
                    except queue.Empty:
                        if time.monotonic() >= deadline:
                            break
                        continue
                    if key == "quit":
                        return 0
                    pages = budget(poller.stats, height, state).pages
                    if key == "sort":
                        state.sort = SORTS[(SORTS.index(state.sort) + 1) % len(SORTS)]
                        state.page = 0
                    elif key == "next":
                        state.page = (state.page + 1) % pages
                    elif key == "prev":
                        state.page = (state.page - 1) % pages
                    break  # redraw at once
    except KeyboardInterrupt:
        return 0
    finally:
        poller.stop()
    return 0
