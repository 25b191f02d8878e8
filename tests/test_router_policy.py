"""Routing policies and the prefix arithmetic, alone (no processes)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmshare.errors import ConfigError
from lmshare.router import RouterConfig, parse_backend
from lmshare.router import policy as p
from lmshare.router.backends import Backend
from lmshare.router.prefix import held_by_worker


def backends(*loads: int) -> list[Backend]:
    out = []
    for i, load in enumerate(loads):
        b = Backend(parse_backend(f"http://127.0.0.1:{8001 + i}=w{i}"))
        b.in_flight = load
        out.append(b)
    return out


@given(st.lists(st.lists(st.sampled_from(["w0", "w1", "w2"]), max_size=3), max_size=12))
def test_each_worker_holds_exactly_its_leading_run_of_chunks(holders):
    held = held_by_worker(holders)
    for worker in ("w0", "w1", "w2"):
        run = 0
        while run < len(holders) and worker in holders[run]:
            run += 1
        assert held.get(worker, 0) == run


def test_prefix_prefers_the_longest_holder_and_prefix_load_the_idle_one():
    b = backends(3, 0, 1)
    held = {"w0": 5, "w2": 2}
    assert p.by_prefix(b, held, 16, p.Rotation(), None) == p.Decision(b[0], p.HIT, 80)
    decision = p.by_prefix(b, held, 16, p.Rotation(), 2)  # 3 - 0 > 2: go elsewhere
    assert (decision.backend, decision.reason) == (b[1], p.OVERLOADED)
    assert p.by_prefix(b, held, 16, p.Rotation(), 3).backend is b[0]
    assert p.by_prefix(b, {}, 16, p.Rotation(), 2) == p.Decision(b[1], p.MISS)


def test_least_loaded_rotates_among_equals():
    b = backends(0, 0, 5)
    rotation = p.Rotation()
    chosen = [p.least_loaded(b, rotation).backend.name for _ in range(4)]
    assert sorted(set(chosen)) == ["w0", "w1"]


@pytest.mark.parametrize("kwargs, message", [
    ({"backends": []}, "at least one --backend"),
    ({"policy": "random"}, "unknown --policy"),
    ({"policy": "prefix"}, "needs --controller"),
    ({"policy": "least-loaded", "lookup_timeout_s": 0}, "must be positive"),
])
def test_misconfiguration_says_what_to_do(kwargs, message):
    settings = {"backends": [parse_backend("http://127.0.0.1:1=a")], **kwargs}
    with pytest.raises(ConfigError, match=message):
        RouterConfig(**settings)
    with pytest.raises(ConfigError, match="without a path"):
        parse_backend("http://127.0.0.1:1/v1")
