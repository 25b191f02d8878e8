"""Key-range shards: every key has exactly one owner, ranges are even, bad specs are refused."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmshare.errors import ConfigError
from lmshare.shards import Shard, parse_shard_addresses, shard_of, split_by_shard

keys16 = st.binary(min_size=16, max_size=16)


@given(keys=st.lists(keys16, max_size=64), count=st.integers(1, 256))
def test_each_key_has_exactly_one_owning_shard(keys, count):
    shards = [Shard(i, count) for i in range(count)]
    for key in keys:
        assert [s.index for s in shards if s.owns(key)] == [shard_of(key, count)]
    positions = split_by_shard(keys, count)
    assert sorted(p for part in positions for p in part) == list(range(len(keys)))
    for index, part in enumerate(positions):
        assert all(shard_of(keys[p], count) == index for p in part)
        assert part == sorted(part)  # a shard's keys keep the lookup's order
        assert Shard(index, count).foreign([keys[p] for p in part]) == 0


def test_hash_keys_spread_evenly_over_shards():
    keys = [os.urandom(16) for _ in range(40_000)]
    sizes = [len(part) for part in split_by_shard(keys, 4)]
    assert all(9_000 < size < 11_000 for size in sizes), sizes


@pytest.mark.parametrize("text", ["", "1", "4/4", "-1/4", "0/0", "a/b", "0/257"])
def test_a_bad_shard_is_refused_with_what_to_write(text):
    with pytest.raises(ConfigError, match="shard"):
        Shard.parse(text)


def test_shard_addresses_are_groups_of_failover_lists():
    assert parse_shard_addresses("a:1,a:2;b:1") == ["a:1,a:2", "b:1"]
    for bad in ("a:1;;b:1", ";", "a:1;"):
        with pytest.raises(ConfigError, match="separate shards"):
            parse_shard_addresses(bad)
