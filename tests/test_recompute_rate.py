"""The connector measures its engine's recompute rate (tokens/s of plain prefill steps) and the
scheduler side learns it from the model workers' metadata."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from lmshare.integrations.vllm.metadata import LMShareWorkerMetadata
from lmshare.integrations.vllm.recompute import RecomputeRate


class Clock:
    """Markers on a timeline the test moves; ``pending`` markers are not done yet."""

    def __init__(self):
        self.now = 0.0
        self.pending = set()

    def marker(self):
        clock = self

        class Marker:
            def record(self):
                self.at = clock.now

            def done(self):
                return self not in clock.pending

            def seconds_since(self, other):
                return self.at - other.at

        return Marker()


def test_prefill_steps_are_timed_and_others_are_not():
    clock = Clock()
    rate = RecomputeRate(clock.marker, min_tokens=1024)
    rate.step_started(16384, loads=False)
    clock.now += 0.5
    rate.step_ended()
    assert rate.poll() == pytest.approx(32768)
    rate.step_started(16, loads=False)  # a decode step says nothing about prefill
    clock.now += 0.1
    rate.step_ended()
    rate.step_started(8192, loads=True)  # a step that loads KV waits for copies
    clock.now += 1.0
    rate.step_ended()
    assert rate.poll() == pytest.approx(32768)


def test_a_step_still_running_on_the_device_is_folded_in_later():
    clock = Clock()
    rate = RecomputeRate(clock.marker, min_tokens=1024, smoothing=0.5)
    rate.step_started(8192, loads=False)
    clock.now += 1.0
    rate.step_ended()
    end = rate._ended[-1][1]
    clock.pending.add(end)
    assert rate.poll() is None
    clock.pending.clear()
    assert rate.poll() == pytest.approx(8192)
    rate.step_started(8192, loads=False)
    clock.now += 0.5
    rate.step_ended()
    assert rate.poll() == pytest.approx(8192 + 0.5 * (16384 - 8192))


def test_ranks_report_the_slowest_rate_and_the_scheduler_learns_it():
    from lmshare.integrations.kv_copy import KVGeometry
    from lmshare.integrations.vllm.scheduler import LMShareConnectorScheduler
    from lmshare.integrations.vllm.settings import ConnectorSettings
    from lmshare.keys import ModelSignature
    from lmshare.testing.fake_vllm import BLOCK, fake_config

    merged = LMShareWorkerMetadata({}, False, 30_000.0).aggregate(
        LMShareWorkerMetadata({}, False, 20_000.0))
    assert merged.recompute_tokens_per_s == 20_000.0
    assert LMShareWorkerMetadata().aggregate(LMShareWorkerMetadata()).recompute_tokens_per_s \
        is None
    settings = ConnectorSettings.from_extra_config({"worker": "w", "chunk_tokens": 256}, BLOCK)
    scheduler = LMShareConnectorScheduler(
        settings, KVGeometry.from_kv_cache_config(fake_config()),
        [ModelSignature(model="m", kv_layout="l", chunk_tokens=256)])
    assert scheduler.recompute_tokens_per_s is None
    scheduler.update_connector_output(SimpleNamespace(kv_connector_worker_meta=merged))
    assert scheduler.recompute_tokens_per_s == 20_000.0
