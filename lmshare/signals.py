"""Process signals, recorded and acted on outside the handler.

A Python signal handler runs in the main thread between two bytecodes, possibly while that
thread holds a lock; a handler that takes a lock itself (``Event.set`` does) can then wait for
ever on its own thread. The handlers here only append to a list. The controller's and the
worker's loops look at the record between steps; code whose main thread blocks on an event
(the demo) starts :meth:`SignalLatch.relay`, a thread that sets the event for it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RELOAD_SIGNALS = (signal.SIGHUP,)
RELAY_POLL_S = 0.1


class SignalLatch:
    """Records stop signals (SIGTERM, SIGINT) and reload signals (SIGHUP) once installed."""

    def __init__(self, stop: Iterable[int] = STOP_SIGNALS,
                 reload: Iterable[int] = RELOAD_SIGNALS) -> None:
        self._stop_signals = tuple(stop)
        self._reload_signals = tuple(reload)
        self._stops: list[int] = []
        self._reloads: list[int] = []
        self._previous: dict[int, object] = {}

    def install(self) -> SignalLatch:
        """Take over the signals (from the main thread); :meth:`restore` gives them back."""
        for sig in self._stop_signals:
            self._previous[sig] = signal.signal(sig, lambda number, _f: self._stops.append(number))
        for sig in self._reload_signals:
            self._previous[sig] = signal.signal(
                sig, lambda number, _f: self._reloads.append(number))
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    @property
    def stop_requested(self) -> bool:
        return bool(self._stops)

    def take_reload(self) -> bool:
        """True once for each burst of reload signals since the last call."""
        if not self._reloads:
            return False
        self._reloads.clear()
        return True

    def relay(self, event: threading.Event) -> threading.Thread:
        """A daemon thread that sets ``event`` when a stop signal arrives (and ends when the
        event is set by anyone)."""
        def watch() -> None:
            while not event.wait(RELAY_POLL_S):
                if self._stops:
                    event.set()

        thread = threading.Thread(target=watch, name="lmshare-signals", daemon=True)
        thread.start()
        return thread
