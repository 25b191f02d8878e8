"""The controller's chunk index agrees with a plain dict model under any sequence of admits,
evictions, full syncs and departures, absorbed in any slices, through table growth and sweeps."""

from __future__ import annotations

import random
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmshare.controller import index as index_module
from lmshare.controller.index import ChunkIndex

WORKERS = ["a", "b", "c", "d"]
NAMESPACES = [b"n" * 16, b"m" * 16]
# sequential keys (as tests use) and random ones (as chained hashes are)
POOL = [i.to_bytes(16, "big") for i in range(30)] + [random.Random(i).randbytes(16)
                                                     for i in range(50)]
CAP = 30

keys = st.lists(st.sampled_from(POOL), max_size=40)
operation = st.one_of(
    st.tuples(st.just("add"), st.sampled_from(WORKERS), st.sampled_from(NAMESPACES), keys),
    st.tuples(st.just("remove"), st.sampled_from(WORKERS), keys),
    st.tuples(st.just("sync"), st.sampled_from(WORKERS), st.sampled_from(NAMESPACES), keys),
    st.tuples(st.just("drop"), st.sampled_from(WORKERS)),
    st.tuples(st.just("absorb"), st.integers(1, 64)),
)


class Model:
    """What the index means: key → {worker: namespace}, applied at once."""

    def __init__(self) -> None:
        self.holders: dict[bytes, dict[str, bytes]] = {}
        self.dropped: dict[str, int] = {}
        self.capped: list[str] = []
        self.orphaned: set[bytes] = set()  # keys whose last holder let them go, ever

    def held(self, worker: str) -> int:
        return sum(worker in h for h in self.holders.values())

    def add(self, worker: str, namespace: bytes, keys: list[bytes]) -> None:
        room = CAP - self.held(worker)
        for key in dict.fromkeys(keys):
            if worker in self.holders.get(key, {}):
                continue
            if room <= 0:
                if worker not in self.dropped:
                    self.capped.append(worker)
                self.dropped[worker] = self.dropped.get(worker, 0) + 1
                continue
            room -= 1
            self.holders.setdefault(key, {})[worker] = namespace

    def remove(self, worker: str, keys: list[bytes]) -> None:
        for key in keys:
            held = self.holders.get(key, {})
            if held.pop(worker, None) is not None and not held:
                self.orphaned.add(key)
            if not held:
                self.holders.pop(key, None)

    def drop(self, worker: str) -> None:
        self.remove(worker, list(self.holders))
        self.dropped.pop(worker, None)

    def namespace_counts(self) -> dict[bytes, int]:
        counts: dict[bytes, int] = {}
        for held in self.holders.values():
            for namespace in held.values():
                counts[namespace] = counts.get(namespace, 0) + 1
        return counts


def check(index: ChunkIndex, model: Model) -> None:
    while index.pending:
        index.absorb()
    assert len(index) == len(model.holders)
    for worker in WORKERS:
        assert index.worker_chunks(worker) == model.held(worker), worker
    counts = model.namespace_counts()
    for namespace in NAMESPACES:
        assert index.knows_namespace(namespace) == (namespace in counts)
    assert index.namespaces == len(counts)
    assert index.multi_holder_chunks() == sum(len(h) > 1 for h in model.holders.values())
    for key in POOL:
        expected = [sorted(model.holders[key])] if key in model.holders else []
        assert index.longest_prefix([key]) == expected
    prefix = []
    for key in POOL[:20]:
        if key not in model.holders:
            break
        prefix.append(sorted(model.holders[key]))
    assert index.longest_prefix(POOL[:20]) == prefix  # probed key by key
    with mock.patch.object(index_module, "SCALAR_KEYS", 0):  # and in arrays
        assert index.longest_prefix(POOL[:20]) == prefix
    assert index.dropped == model.dropped
    assert index.longest_prefix([b"short"]) == []


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operation, max_size=30), st.integers(1, 3))
def test_the_index_agrees_with_a_dict_model(operations, initial_bits):
    # small steps, so growth, sweeps and queued work interleave with the changes
    # a table filled nearly full, so keys overflow their buckets
    with mock.patch.multiple(index_module, SLICE_KEYS=7, MIGRATE_BUCKETS=1, SWEEP_SLOTS=5,
                             TOUCH_SLOTS=8, PREPARE_LOAD=0.9, MAX_LOAD=0.97):
        index = ChunkIndex(max_keys_per_worker=CAP, initial_bits=initial_bits)
        capped: list[str] = []
        index.on_capped = capped.append
        orphaned: dict[bytes, tuple[str, bool]] = {}
        index.on_orphaned = lambda keys, workers, gone: orphaned.update(
            (key, (worker, gone)) for key, worker in zip(keys, workers, strict=True))
        model = Model()
        dropped_since: set[str] = set()
        for op in operations:
            kind = op[0]
            if kind == "add":
                index.add(op[1], op[2], op[3])
                model.add(op[1], op[2], op[3])
                dropped_since.discard(op[1])
            elif kind == "remove":
                index.remove(op[1], op[2])
                model.remove(op[1], op[2])
            elif kind == "sync":  # what a full sync's first part does
                index.drop_worker(op[1])
                index.add(op[1], op[2], op[3])
                model.drop(op[1])
                model.add(op[1], op[2], op[3])
                dropped_since.discard(op[1])
            elif kind == "drop":
                queued = index.pending
                assert index.drop_worker(op[1]) == model.held(op[1]) or queued
                model.drop(op[1])
                dropped_since.add(op[1])
                assert index.worker_chunks(op[1]) == 0
            else:
                index.absorb(op[1])
            # a departed worker is never offered as a holder, even before its keys are swept
            for holders in index.longest_prefix(POOL):
                assert not dropped_since & set(holders)
        check(index, model)
        assert set(capped) <= set(model.capped)  # (an add dropped while queued never counts)
        # a key not held is reported only if its last holder let it go
        assert set(orphaned) - set(model.holders) <= model.orphaned
        for key in model.holders:
            assert index.holders(key) == sorted(model.holders[key])
            for worker, namespace in model.holders[key].items():
                assert index.namespace_of(worker, key) == namespace


def test_a_growing_index_keeps_every_key_and_answers_during_the_move():
    index = ChunkIndex(initial_bits=1)
    keys = [i.to_bytes(16, "little") for i in range(50_000)]
    for start in range(0, len(keys), 1000):
        index.add("w", b"n" * 16, keys[start:start + 1000])
        assert index.longest_prefix(keys[:16]) == [["w"]] * 16
    while index.pending:
        index.absorb()
    assert len(index) == index.worker_chunks("w") == 50_000
    assert index.longest_prefix(keys[-16:]) == [["w"]] * 16
    index.remove("w", keys[::2])
    while index.pending:
        index.absorb()
    assert len(index) == 25_000
    assert index.longest_prefix(keys[1:2]) == [["w"]]
    assert index.longest_prefix(keys[:1]) == []
