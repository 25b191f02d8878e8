"""Merging the shards' answers to one lookup: the same prefix, holders, digests and miss codes
one controller holding every key would give; a shard that fails ends the prefix at its first
key; malformed answers are refused, never trusted."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lmshare import misses
from lmshare.errors import ControllerUnavailable, ErrorCode, RemoteError
from lmshare.shard_lookup import merge_lookups
from lmshare.shards import split_by_shard

WORKERS = ["w0", "w1", "w2"]


def info(worker: str) -> dict:
    return {"worker_id": worker, "host": "127.0.0.1", "data_port": 9000, "transports": ["tcp"]}


def one_controller(keys, held, codes, digests) -> dict:
    """What a controller whose index is ``held`` (key → holders) answers to a lookup of
    ``keys``: the held prefix's holders and digests, one code per key past it."""
    holders = []
    for key in keys:
        if not held.get(key):
            break
        holders.append(held[key])
    matched = len(holders)
    return {"matched": matched, "holders": holders,
            "workers": {w: info(w) for chunk in holders for w in chunk},
            "digests": [digests.get(key) for key in keys[:matched]],
            "misses": bytes(misses.HELD if held.get(key) else codes[key]
                            for key in keys[matched:matched + misses.LOOKUP_CODES])}


def key(first: int, i: int) -> bytes:
    return bytes([first]) + i.to_bytes(15, "big")


@st.composite
def cluster(draw, max_keys=48):
    """A lookup's keys, and what the cluster knows of each."""
    firsts = draw(st.lists(st.integers(0, 255), min_size=0, max_size=max_keys))
    keys = [key(first, i) for i, first in enumerate(firsts)]
    held = {k: draw(st.lists(st.sampled_from(WORKERS), max_size=3, unique=True)) for k in keys}
    # mostly held, so that prefixes are long enough to span shards
    for k in keys:
        if draw(st.integers(0, 9)) < 8 and not held[k]:
            held[k] = ["w0"]
    codes = {k: draw(st.sampled_from([misses.NEW, misses.GONE, misses.EVICTED_CODE]))
             for k in keys}
    digests = {k: draw(st.one_of(st.none(), st.binary(min_size=16, max_size=16))) for k in keys}
    return keys, held, codes, digests


def shard_answers(keys, positions, held, codes, digests):
    return [one_controller([keys[i] for i in where], held, codes, digests) if where else None
            for where in positions]


@given(cluster(), st.integers(1, 8))
def test_merged_answer_is_what_one_controller_holding_every_key_gives(world, count):
    keys, held, codes, digests = world
    positions = split_by_shard(keys, count)
    merged = merge_lookups(keys, positions, shard_answers(keys, positions, held, codes, digests))
    assert merged.reply() == one_controller(keys, held, codes, digests)
    assert not merged.unreachable and not merged.unknown_namespace


@given(cluster(), st.integers(2, 8), st.data())
def test_a_failed_shard_ends_the_prefix_at_its_first_key(world, count, data):
    keys, held, codes, digests = world
    positions = split_by_shard(keys, count)
    answers = shard_answers(keys, positions, held, codes, digests)
    failed = data.draw(st.integers(0, count - 1))
    answers[failed] = data.draw(st.sampled_from([
        ControllerUnavailable("no answer"), RemoteError(ErrorCode.WRONG_SHARD, "not mine"),
        {"holders": "hostile"}, {"holders": [[1]], "workers": {}}, "junk"]))
    merged = merge_lookups(keys, positions, answers)
    whole = one_controller(keys, held, codes, digests)
    stop = positions[failed][0] if positions[failed] else len(keys)
    assert merged.holders == whole["holders"][:stop]
    assert merged.unreachable == frozenset(positions[failed])
    assert merged.digests == whole["digests"][:stop]
    assert len(merged.codes) == min(len(keys) - merged.matched, misses.LOOKUP_CODES)


def test_every_shard_that_never_saw_the_namespace_makes_it_unknown():
    keys = [key(0x00, 0), key(0x90, 1)]
    positions = split_by_shard(keys, 2)
    unknown = RemoteError(ErrorCode.UNKNOWN_NAMESPACE, "never seen")
    assert merge_lookups(keys, positions, [unknown, unknown]).unknown_namespace
    # one shard knows it: the other's keys are only new
    known = {"holders": [["w0"]], "workers": {"w0": info("w0")}, "digests": [None],
             "misses": b""}
    merged = merge_lookups(keys, positions, [known, unknown])
    assert not merged.unknown_namespace and merged.holders == [["w0"]]
    assert merged.codes == bytes([misses.NEW]) and not merged.unreachable


def test_codes_stop_where_one_controllers_would():
    keys = [key(i % 256, i) for i in range(3 * misses.LOOKUP_CODES)]
    held = {k: [] for k in keys}
    codes = {k: misses.GONE if i % 3 else misses.NEW for i, k in enumerate(keys)}
    positions = split_by_shard(keys, 4)
    merged = merge_lookups(keys, positions, shard_answers(keys, positions, held, codes, {}))
    assert merged.reply() == one_controller(keys, held, codes, {})


def test_hostile_worker_entries_are_dropped_and_long_lists_refused():
    keys = [key(0x00, 0), key(0x01, 1)]
    positions = split_by_shard(keys, 2)  # both on shard 0
    answer = {"holders": [["w0", "bad"], ["w0"]],
              "workers": {"w0": info("w0"), "bad": {"worker_id": 7}, 3: info("w0")},
              "digests": [b"x" * 16, 5], "misses": b""}
    merged = merge_lookups(keys, positions, [answer, None])
    assert merged.workers == {"w0": info("w0")} and merged.digests == [b"x" * 16, None]
    too_many = {**answer, "holders": [["w0"]] * 3}
    assert merge_lookups(keys, positions, [too_many, None]).unreachable == {0, 1}
