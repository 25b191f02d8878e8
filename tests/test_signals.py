"""Signal handlers record and return: a signal that arrives while the main thread holds the
very lock a handler would take (an Event's) must not hang the process."""

import os
import signal
import threading

from lmshare.signals import SignalLatch
from lmshare.testing.waiting import wait_until


def test_a_stop_signal_is_relayed_while_the_main_thread_holds_the_events_lock():
    stop = threading.Event()
    before = signal.getsignal(signal.SIGTERM)
    latch = SignalLatch().install()
    try:
        latch.relay(stop)
        with stop._cond:  # the lock Event.set takes: a handler calling it would wait for ever
            os.kill(os.getpid(), signal.SIGTERM)
            wait_until(lambda: latch.stop_requested, 10, "the handler to run")
            assert not stop.is_set()  # nobody could set it while we hold its lock
        assert stop.wait(10), "the relay thread sets the event once the lock is free"
    finally:
        latch.restore()
    assert signal.getsignal(signal.SIGTERM) is before


def test_reload_signals_are_taken_once_per_burst_and_handlers_come_back():
    before = signal.getsignal(signal.SIGHUP)
    latch = SignalLatch().install()
    try:
        assert not latch.take_reload()
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGHUP)
        wait_until(lambda: latch._reloads, 10, "the SIGHUP handler to run")
        assert latch.take_reload() and not latch.take_reload()
        assert not latch.stop_requested
    finally:
        latch.restore()
    assert signal.getsignal(signal.SIGHUP) is before
