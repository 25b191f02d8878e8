"""Fetch only when it wins: the decision from measured peer throughput and recompute rate."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lmshare.worker.fetch_policy import FetchPolicy

CHUNK_BYTES, CHUNK_TOKENS = 32 << 20, 256  # an 8B model's 256-token chunk


def test_a_slow_peer_is_not_worth_fetching_and_a_fast_one_is():
    policy = FetchPolicy()
    # recompute: 34k tokens/s, i.e. one 32 MiB chunk in 7.5 ms (about 4.4 GB/s of KV)
    policy.observe("slow", 1 << 30, 1.0)  # 1 GiB/s
    policy.observe("fast", 10 << 30, 1.0)  # 10 GiB/s
    assert not policy.worth_fetching({"slow": 64}, CHUNK_BYTES, CHUNK_TOKENS, 34_000)
    assert policy.skipped_chunks == 64
    assert policy.worth_fetching({"fast": 64}, CHUNK_BYTES, CHUNK_TOKENS, 34_000)
    # two holders fetched in parallel: the slower one sets the time
    assert not policy.worth_fetching({"fast": 32, "slow": 32}, CHUNK_BYTES, CHUNK_TOKENS,
                                     34_000)


def test_unknown_peers_and_unknown_recompute_rates_are_tried():
    policy = FetchPolicy()
    assert policy.worth_fetching({"new": 10}, CHUNK_BYTES, CHUNK_TOKENS, 34_000)
    policy.observe("slow", 1 << 30, 1.0)
    assert policy.worth_fetching({"slow": 10}, CHUNK_BYTES, CHUNK_TOKENS, None)
    policy.forget("slow")
    assert policy.rate("slow") is None


def test_one_slow_fetch_weighs_what_it_cost_and_old_estimates_expire():
    now = [0.0]
    policy = FetchPolicy(clock=lambda: now[0], expire_s=30)
    for _ in range(5):
        policy.observe("p", 10 << 30, 1.0)  # 10 GiB/s
    policy.observe("p", 1 << 30, 10.0)  # then the link slows to 0.1 GiB/s
    assert policy.rate("p") < 1 << 30  # already judged slow: below 1 GiB/s
    assert not policy.worth_fetching({"p": 64}, CHUNK_BYTES, CHUNK_TOKENS, 34_000)
    now[0] += 31  # no fetch since: measured again before being skipped for good
    assert policy.rate("p") is None and "p" not in policy.rates()
    assert policy.worth_fetching({"p": 64}, CHUNK_BYTES, CHUNK_TOKENS, 34_000)


def test_tiny_or_broken_samples_do_not_move_the_estimate():
    policy = FetchPolicy()
    policy.observe("p", 100, 1.0)  # too small to say anything about throughput
    policy.observe("p", 1 << 30, float("nan"))
    policy.observe("p", 1 << 30, 0.0)
    assert policy.rate("p") is None


@given(st.lists(st.floats(min_value=1e6, max_value=1e11), min_size=1, max_size=20))
def test_the_estimate_stays_within_what_was_measured(rates):
    policy = FetchPolicy()
    for rate in rates:
        policy.observe("p", 1 << 30, (1 << 30) / rate)
    estimate = policy.rate("p")
    assert min(rates) * 0.999 <= estimate <= max(rates) * 1.001


@given(st.floats(min_value=1e6, max_value=1e11), st.floats(min_value=100, max_value=1e6),
       st.integers(min_value=1, max_value=512))
def test_the_decision_is_fetch_time_against_recompute_time(rate, tokens_per_s, chunks):
    policy = FetchPolicy()
    policy.observe("p", 1 << 30, (1 << 30) / rate)
    fetch_s = chunks * CHUNK_BYTES / policy.rate("p")
    recompute_s = chunks * CHUNK_TOKENS / tokens_per_s
    decided = policy.worth_fetching({"p": chunks}, CHUNK_BYTES, CHUNK_TOKENS, tokens_per_s)
    assert decided == (fetch_s < recompute_s)
