"""Heartbeat pacing: a controller that cannot keep up asks its workers to heartbeat less often.

Heartbeats are most of a big fleet's messages (10,000 workers at the default 1 s: 10,000 a
second). A controller that gets less CPU than they need (a busy host, a restart's re-syncs on
top) falls behind, every message waits in its queue, and each late answer is a worker's timeout
and retry. So the controller watches how much of its time it is idle, waiting for messages:
almost never idle over a window, it doubles the interval it asks for (up to ``max_factor``
times the configured one); mostly idle, it halves it again. Heartbeat and registration replies
carry the interval; workers adopt it. Many heartbeats arriving late (a fifth of those of a
window came more than half the timeout after the worker's previous one) also counts as behind:
that backlog is where the loop cannot see it. A worker that died sends none, so it never counts. The liveness timeout grows with the interval, and shrinks
only once every worker has had time to hear that the interval shrank.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

BUSY_IDLE_FRACTION = 0.1  # idle less than this over a window: behind, slow the heartbeats
SPARE_IDLE_FRACTION = 0.6  # idle more than this: twice the heartbeats would still fit
LATE_FRACTION = 0.2  # this many workers' heartbeats late at once: it is the controller that is
# late (its backlog sits in its socket's I/O thread or the kernel, where idleness cannot show)


@dataclass
class HeartbeatPacing:
    """The heartbeat interval and liveness timeout in force (``interval_s``, ``timeout_s``).

    The serve loop reports the time it spent waiting for messages (``idle``) and calls
    ``tick()`` once a loop step; a decision is made per ``window_s``.
    """

    base_interval_s: float
    base_timeout_s: float
    max_factor: int = 8
    window_s: float = 2.0
    clock: Callable[[], float] = time.monotonic
    factor: int = 1
    _timeout_factor: int = 1  # the factor the timeout still allows for (workers not yet told)
    _timeout_until: float = 0.0  # when the timeout may follow a smaller factor
    _window_start: float | None = field(default=None, repr=False)
    _idle_s: float = 0.0

    @property
    def interval_s(self) -> float:
        return self.base_interval_s * self.factor

    @property
    def timeout_s(self) -> float:
        return self.base_timeout_s * max(self.factor, self._timeout_factor)

    def idle(self, seconds: float) -> None:
        """The loop waited ``seconds`` for a message."""
        self._idle_s += seconds

    def tick(self, late: Callable[[], float] | None = None) -> bool:
        """End of a loop step; True when the interval changed. ``late`` gives the fraction of
        heartbeats that arrived late (asked once a window)."""
        now = self.clock()
        if self._window_start is None:
            self._window_start = now
        if now >= self._timeout_until:
            self._timeout_factor = self.factor
        elapsed = now - self._window_start
        if elapsed < self.window_s:
            return False
        idle = self._idle_s / elapsed
        late_fraction = late() if late is not None else 0.0
        self._window_start, self._idle_s = now, 0.0
        before = self.factor
        behind = idle < BUSY_IDLE_FRACTION or late_fraction > LATE_FRACTION
        if behind and self.factor < self.max_factor:
            self.factor *= 2
            self._timeout_factor = max(self._timeout_factor, self.factor)
        elif idle > SPARE_IDLE_FRACTION and not behind and self.factor > 1:
            # workers told the longer interval hear of the shorter one at their next heartbeat:
            # until then, the timeout still allows for the longer one
            self._timeout_factor = max(self._timeout_factor, self.factor)
            self._timeout_until = now + self.base_interval_s * self.factor + self.base_timeout_s
            self.factor //= 2
        if self.factor == before:
            return False
        log.warning("controller %s: heartbeats every %.1f s (liveness timeout %.1f s); it was "
                    "idle %.0f%% of the last %.1f s, %.0f%% of the workers late",
                    "behind" if self.factor > before else "keeping up again", self.interval_s,
                    self.timeout_s, idle * 100, elapsed, late_fraction * 100)
        return True
