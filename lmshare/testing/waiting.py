"""Polling with a deadline, for tests and examples that wait on other processes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def slack() -> float:
    """How many times longer than on an idle machine a wait may take now: the load average
    per core (at least 1, at most 10), or ``LMSHARE_TEST_SLACK`` when set. A deadline is a
    guard against a hang, not a speed target: on a busy machine it grows with the load."""
    if os.environ.get("LMSHARE_TEST_SLACK"):
        return max(1.0, float(os.environ["LMSHARE_TEST_SLACK"]))
    try:
        load = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return 1.0
    return min(10.0, max(1.0, load))


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str,
               interval_s: float = 0.05) -> T:
    """Call ``predicate`` until it returns something true and return that; raise
    AssertionError naming ``what`` after ``timeout_s`` (times :func:`slack`)."""
    limit = timeout_s * slack()
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {limit:.0f}s waiting for {what}")
