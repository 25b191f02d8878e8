"""Key-range shards of the controller: which controller process indexes which keys.

Keys are 128-bit content hashes, so their first byte is uniform: shard ``k`` of ``n`` owns the
keys whose first byte ``b`` has ``b * n // 256 == k``. Every shard knows every worker (each
worker registers and heartbeats with each); a key's admits, evictions, syncs and lookups go to
the shard that owns it only. One shard (``n == 1``) owns every key: a cluster without shards.

Written on the command line as ``HOST:PORT[,HOST:PORT...][;HOST:PORT[,...]...]``: shards in
order, separated by ``;``; within a shard, the controllers elected through etcd, by ``,``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lmshare.errors import ConfigError, ErrorCode, LMShareError

MAX_SHARDS = 256  # one first byte a shard at most


def shard_of(key: bytes, count: int) -> int:
    """The shard of ``count`` that owns ``key`` (an empty key: shard 0)."""
    return key[0] * count // 256 if key else 0


@dataclass(frozen=True)
class Shard:
    """This controller's part of the key space: shard ``index`` of ``count``."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_SHARDS:
            raise ConfigError(f"a cluster has 1 to {MAX_SHARDS} shards, not {self.count} "
                              "(write --shard K/N with 1 <= N)")
        if not 0 <= self.index < self.count:
            raise ConfigError(f"shard {self.index} is outside 0..{self.count - 1} "
                              f"(write --shard K/N with 0 <= K < N)")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``K/N`` (shard K of N, counted from 0)."""
        index, slash, count = text.partition("/")
        try:
            if not slash:
                raise ValueError
            return cls(int(index), int(count))
        except ValueError:
            raise ConfigError(f"cannot read shard {text!r}; write K/N, e.g. 0/4 for the first "
                              "of four shards") from None

    def owns(self, key: bytes) -> bool:
        return self.count == 1 or shard_of(key, self.count) == self.index

    def foreign(self, keys: Sequence[bytes]) -> int:
        """How many of ``keys`` another shard owns."""
        if self.count == 1:
            return 0
        return sum(1 for key in keys if shard_of(key, self.count) != self.index)

    def first_bytes(self) -> range:
        """The first bytes of the keys this shard owns (a contiguous range)."""
        return range(-(-256 * self.index // self.count),
                     -(-256 * (self.index + 1) // self.count))

    def check_owned(self, keys: Sequence[bytes], what: str) -> None:
        """Raise a ``wrong_shard`` error when another shard owns any of ``keys`` (those of a
        ``what``: a lookup, a batch...)."""
        foreign = self.foreign(keys)
        if foreign:
            span = self.first_bytes()
            raise LMShareError(
                f"this controller is shard {self} and owns the keys whose first byte is "
                f"0x{span.start:02x}-0x{span.stop - 1:02x}; {foreign} of the {len(keys)} keys "
                f"of this {what} belong to other shards: send each key to the shard that owns "
                f"it (check that --controller lists all {self.count} shards in order, "
                "separated by ';', and that each controller runs with its own --shard "
                f"K/{self.count})", code=ErrorCode.WRONG_SHARD)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def split_by_shard(keys: Sequence[bytes], count: int) -> list[list[int]]:
    """For each shard, the positions in ``keys`` of the keys it owns (in order)."""
    positions: list[list[int]] = [[] for _ in range(count)]
    for i, key in enumerate(keys):
        positions[shard_of(key, count)].append(i)
    return positions


def parse_shard_addresses(text: str) -> list[str]:
    """``A[,B...][;C[,D...]...]`` into one ``HOST:PORT[,HOST:PORT...]`` text per shard."""
    groups = [group.strip() for group in text.split(";")]
    if not groups or any(not group for group in groups):
        raise ConfigError(f"cannot read controllers {text!r}: separate shards by ';' and "
                          "the controllers of one shard by ',' (HOST:PORT each)")
    if len(groups) > MAX_SHARDS:
        raise ConfigError(f"{len(groups)} shards named; at most {MAX_SHARDS}")
    return groups
