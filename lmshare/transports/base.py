"""The transport interface every data path (TCP, shared memory, UCX) implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class PeerInfo:
    """How to reach a worker's data plane, as registered with the controller."""

    worker_id: str
    host: str
    data_port: int
    host_id: str = ""
    transports: tuple[str, ...] = ("tcp",)
    extra: dict = field(default_factory=dict, compare=False, hash=False)


class ChunkSink(Protocol):
    """Where fetched chunks land. ``begin`` gives destination buffers for ``nbytes`` (or None to
    refuse the chunk); ``end`` reports whether the bytes arrived whole."""

    def begin(self, key: bytes, nbytes: int) -> list[memoryview] | None: ...

    def end(self, key: bytes, ok: bool) -> None: ...


class Transport(ABC):
    """Moves chunks from one peer into a sink, within a deadline."""

    name: str = "abstract"

    @abstractmethod
    def fetch(self, peer: PeerInfo, keys: list[bytes], sink: ChunkSink, deadline: float,
              checksum: bool = False) -> int:
        """Fetch ``keys`` in order from ``peer``; returns how many leading keys arrived whole.

        Must return by ``deadline`` (a ``time.monotonic()`` value) and must call ``sink.end``
        once for every ``sink.begin`` that returned buffers.
        """

    def close(self) -> None:  # noqa: B027 - an optional hook, not abstract
        """Release connections."""
