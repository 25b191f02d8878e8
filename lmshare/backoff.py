"""Retry waits: exponential backoff with full jitter, capped, with an optional deadline.

A fleet's workers all lose the controller at the same moment (a restart, a failover) and all
retry against it. Fixed waits keep them in step: every retry lands on the controller together,
a busy controller answers too late, and the late answers turn into more retries. With full
jitter the n-th wait is drawn uniformly from ``[0, min(cap, base * 2**n)]``: retries spread over
the whole window, and the window grows until the controller keeps up.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """The waits between attempts of one thing (a registration, a re-sync).

    ``next_wait()`` after each failed attempt, ``reset()`` once it worked. With ``deadline_s``
    the waits stop at that many seconds after the first failure: ``next_wait()`` then returns
    None (give up) and never a wait that would end past the deadline.
    """

    base_s: float = 0.5
    cap_s: float = 10.0
    deadline_s: float | None = None
    rand: Callable[[], float] = random.random  # uniform in [0, 1)
    clock: Callable[[], float] = time.monotonic
    attempts: int = 0
    _first_failure: float | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.base_s <= self.cap_s:
            raise ValueError(f"backoff needs 0 < base ({self.base_s}) <= cap ({self.cap_s})")

    def ceiling(self) -> float:
        """The longest the next wait may be."""
        return min(self.cap_s, self.base_s * 2.0 ** min(self.attempts, 62))

    def next_wait(self) -> float | None:
        """How long to wait before the next attempt, or None when the deadline has passed."""
        now = self.clock()
        if self._first_failure is None:
            self._first_failure = now
        wait = self.ceiling() * self.rand()
        self.attempts += 1
        if self.deadline_s is not None:
            left = self._first_failure + self.deadline_s - now
            if left <= 0:
                return None
            wait = min(wait, left)
        return wait

    def reset(self) -> None:
        """The attempt worked: the next failure starts from ``base_s`` again."""
        self.attempts = 0
        self._first_failure = None
