"""A controller that cannot keep up asks for fewer heartbeats, and for more again once it can
(controlled clock: each window's idle time is the test's)."""

from __future__ import annotations

import pytest

from lmshare.controller.pacing import HeartbeatPacing


def _window(pacing: HeartbeatPacing, now: list[float], idle_fraction: float) -> bool:
    pacing.idle(pacing.window_s * idle_fraction)
    now[0] += pacing.window_s
    return pacing.tick()


def _pacing() -> tuple[HeartbeatPacing, list[float]]:
    now = [0.0]
    pacing = HeartbeatPacing(1.0, 5.0, clock=lambda: now[0])
    pacing.tick()  # the first window starts
    return pacing, now


def test_a_controller_behind_doubles_the_interval_up_to_its_cap():
    pacing, now = _pacing()
    intervals = []
    for _ in range(5):
        _window(pacing, now, idle_fraction=0.02)
        intervals.append(pacing.interval_s)
    assert intervals == [2, 4, 8, 8, 8]
    assert pacing.timeout_s == 40  # the timeout grows with the interval


def test_a_controller_between_busy_and_spare_holds_the_interval():
    pacing, now = _pacing()
    _window(pacing, now, 0.0)
    assert not _window(pacing, now, 0.3)
    assert pacing.interval_s == 2


def test_a_controller_keeping_up_again_halves_it_and_the_timeout_waits_for_the_workers():
    pacing, now = _pacing()
    for _ in range(3):
        _window(pacing, now, 0.0)
    assert pacing.interval_s == 8
    assert _window(pacing, now, 0.9)
    assert pacing.interval_s == 4
    # a worker told 8 s heartbeats hears of 4 s at its next one: until then 40 s still holds
    assert pacing.timeout_s == 40
    now[0] += 8 + 5
    pacing.idle(13 * 0.3)  # neither busy nor spare: the interval holds
    pacing.tick()
    assert pacing.timeout_s == 20
    for _ in range(3):
        _window(pacing, now, 0.9)
    assert pacing.interval_s == 1
    now[0] += 30
    pacing.idle(30 * 0.3)
    pacing.tick()
    assert pacing.timeout_s == pytest.approx(5)


def test_an_idle_controller_keeps_the_configured_interval():
    pacing, now = _pacing()
    for _ in range(10):
        assert not _window(pacing, now, 0.95)
    assert (pacing.interval_s, pacing.timeout_s) == (1.0, 5.0)


@pytest.mark.parametrize("asked, kept", [(4.0, 4.0), (0.0, 1.0), (1e9, 1.0), ("8", 1.0),
                                         (True, 1.0)])
def test_a_worker_heartbeats_at_the_interval_its_controller_asks_for_within_bounds(asked, kept):
    from lmshare.worker.control_link import ControlLink

    class Pool:
        def add_listener(self, listener):
            pass

    class Controller:
        def call(self, type_, timeout_s=None, **fields):
            return {"resync": False, "heartbeat_interval_s": asked}

    link = ControlLink(Controller(), Pool(), {"worker_id": "w1"}, counters=dict)
    link._heartbeat()
    assert link.heartbeat_interval_s == kept


def test_many_workers_late_at_once_count_as_behind_even_when_the_loop_looks_idle():
    pacing, now = _pacing()
    pacing.idle(pacing.window_s * 0.9)
    now[0] += pacing.window_s
    assert pacing.tick(late=lambda: 0.5)
    assert pacing.interval_s == 2
    pacing.idle(pacing.window_s * 0.9)
    now[0] += pacing.window_s
    assert pacing.tick(late=lambda: 0.5)  # idle but late: behind again, never halved
    assert pacing.interval_s == 4
    pacing.idle(pacing.window_s * 0.9)
    now[0] += pacing.window_s
    assert pacing.tick(late=lambda: 0.05)  # on time and idle: halved
    assert pacing.interval_s == 2


def test_a_dead_worker_is_no_late_heartbeat_and_a_late_arrival_is():
    """In a cluster of three, one worker dying must not read as a controller behind its queue
    (that would slow everyone's heartbeats and stretch the timeout that declares it dead)."""
    from unittest import mock

    from lmshare.controller import ControllerConfig, ControllerService
    from lmshare.testing.in_process import answerer, register_workers

    service = ControllerService(ControllerConfig(port=0, heartbeat_interval_s=0.3,
                                                 heartbeat_timeout_s=1.5))

    answer = answerer(service)
    epochs = register_workers(answer, ("a", "b", "dead"))
    now = [1000.0]
    with mock.patch("time.monotonic", lambda: now[0]):
        for record in service.registry.workers.values():
            record.last_heartbeat = now[0]
        service._late_fraction()
        for _ in range(6):  # two seconds of heartbeats from a and b; none from "dead"
            now[0] += 0.3
            for w in ("a", "b"):
                answer("heartbeat", worker_id=w, epoch=epochs[w], seq=0, stats={})
        assert service._late_fraction() == 0.0
        now[0] += 1.0  # b stalls for a second, then its heartbeat arrives
        answer("heartbeat", worker_id="b", epoch=epochs["b"], seq=0, stats={})
        assert service._late_fraction() == 1.0
