"""Fetch only when it wins: a peer chunk is offered as a hit only while fetching it is expected
to beat recomputing it.

The worker learns each peer's throughput from its own fetches (wall time over bytes of each
fetch from that peer, an exponential average, forgotten after a while without fetches); the
engine says how fast it recomputes (prompt
tokens per second, measured by the connector on its own prefills). A lookup then offers the
chunks that must be fetched (not those read in place from a same-host pool) only if the
expected fetch time of all of them is below their recompute time, scaled by ``margin``. Peers
never measured are tried: the first fetch measures them.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class PeerRate:
    """A peer's measured fetch speed, as an average of seconds per byte (so that one slow fetch
    weighs as much as the time it cost), and when it was last measured."""

    seconds_per_byte: float
    measured_at: float
    samples: int = 1


@dataclass
class FetchPolicy:
    """Per-peer throughput estimates and the fetch-or-recompute decision. An estimate older than
    ``expire_s`` is dropped, so a peer once found slow is tried (and measured) again."""

    smoothing: float = 0.3  # weight of the newest fetch in the average
    margin: float = 1.0  # fetch while fetch time < margin * recompute time
    min_sample_bytes: int = 1 << 20  # smaller fetches say more about latency than throughput
    expire_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    _rates: dict[str, PeerRate] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    skipped_chunks: int = 0  # peer chunks not offered: recomputing them was expected to win

    def observe(self, peer: str, nbytes: int, seconds: float) -> None:
        """A fetch of ``nbytes`` from ``peer`` took ``seconds`` (wall time)."""
        if nbytes < self.min_sample_bytes or not (seconds > 0 and math.isfinite(seconds)):
            return
        per_byte, now = seconds / nbytes, self.clock()
        with self._lock:
            old = self._rates.get(peer)
            if old is None or now - old.measured_at > self.expire_s:
                self._rates[peer] = PeerRate(per_byte, now)
            else:
                old.seconds_per_byte += self.smoothing * (per_byte - old.seconds_per_byte)
                old.measured_at = now
                old.samples += 1

    def forget(self, peer: str) -> None:
        with self._lock:
            self._rates.pop(peer, None)

    def rate(self, peer: str) -> float | None:
        """Bytes per second expected from ``peer``; None when not measured lately."""
        with self._lock:
            known = self._rates.get(peer)
            if known is None or self.clock() - known.measured_at > self.expire_s:
                return None
            return 1.0 / known.seconds_per_byte

    def rates(self) -> dict[str, float]:
        with self._lock:
            peers = list(self._rates)
        return {peer: rate for peer in peers if (rate := self.rate(peer)) is not None}

    def worth_fetching(self, chunks_by_peer: dict[str, int], chunk_bytes: int,
                       chunk_tokens: int, recompute_tokens_per_s: float | None) -> bool:
        """Whether fetching ``chunks_by_peer[p]`` chunks from each peer ``p`` (in parallel) is
        expected to take less than recomputing all of them. Unknown rates: yes."""
        if not chunks_by_peer or not recompute_tokens_per_s or recompute_tokens_per_s <= 0:
            return True
        fetch_s = 0.0
        for peer, count in chunks_by_peer.items():
            rate = self.rate(peer)
            if rate is None:
                return True  # not measured yet: this fetch measures it
            fetch_s = max(fetch_s, count * chunk_bytes / rate)
        recompute_s = sum(chunks_by_peer.values()) * chunk_tokens / recompute_tokens_per_s
        if fetch_s < self.margin * recompute_s:
            return True
        with self._lock:
            self.skipped_chunks += sum(chunks_by_peer.values())
        return False
