"""The engine's recompute rate: prompt tokens per second of its own prefill steps.

A lookup offers peer chunks that must be fetched only while fetching them beats recomputing
them (see ``worker/fetch_policy.py``): this is the "recomputing" side, measured where the work
happens. Steps that compute at least ``min_tokens`` tokens and load nothing are timed, from the
start of the step's KV loads to the end of its forward: by events on the compute stream on a
GPU (the host returns long before the GPU is done), by the wall clock on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RecomputeRate:
    """Times prefill steps and keeps an exponential average of their tokens per second."""

    make_marker: Callable[[], Any]  # a marker with record(), done() and seconds_since(other)
    min_tokens: int = 1024
    smoothing: float = 0.3
    tokens_per_s: float | None = None
    _step: tuple[Any, int] | None = None  # (start marker, tokens) of the step running now
    _ended: list[tuple[Any, Any, int]] = field(default_factory=list)  # (start, end, tokens)

    def step_started(self, tokens: int, loads: bool) -> None:
        self._step = None
        if tokens >= self.min_tokens and not loads:
            start = self.make_marker()
            start.record()
            self._step = (start, tokens)

    def step_ended(self) -> None:
        if self._step is not None:
            end = self.make_marker()
            end.record()
            self._ended.append((self._step[0], end, self._step[1]))
            del self._ended[:-8]  # a few in flight at most
            self._step = None

    def poll(self) -> float | None:
        """Fold in the steps whose end has passed; the current estimate."""
        still = []
        for start, end, tokens in self._ended:
            if not end.done():
                still.append((start, end, tokens))
                continue
            seconds = end.seconds_since(start)
            if seconds > 0:
                rate = tokens / seconds
                self.tokens_per_s = rate if self.tokens_per_s is None else \
                    self.tokens_per_s + self.smoothing * (rate - self.tokens_per_s)
        self._ended = still
        return self.tokens_per_s
