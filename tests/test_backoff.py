"""Registration retries back off exponentially with full jitter, capped (no sleeps: the clock,
the random source and the link's waits are the test's)."""

from __future__ import annotations

import random

import pytest

from lmshare.backoff import Backoff
from lmshare.errors import ControllerUnavailable, RemoteError
from lmshare.protocol import ErrorCode
from lmshare.worker import control_link
from lmshare.worker.control_link import ControlLink


def test_windows_double_up_to_the_cap():
    b = Backoff(base_s=0.5, cap_s=8.0, rand=lambda: 0.999999)
    waits = [b.next_wait() for _ in range(8)]
    assert waits == pytest.approx([0.5, 1, 2, 4, 8, 8, 8, 8], rel=1e-5)
    b.reset()
    assert b.next_wait() == pytest.approx(0.5, rel=1e-5)


def test_full_jitter_spreads_a_fleet_over_the_whole_window():
    rng = random.Random(7)
    fleet = [Backoff(base_s=0.5, cap_s=8.0, rand=rng.random) for _ in range(10_000)]
    for attempt, ceiling in enumerate([0.5, 1, 2, 4, 8, 8]):
        waits = [b.next_wait() for b in fleet]
        assert all(0 <= w <= ceiling for w in waits)
        # full jitter: the waits fill [0, ceiling] evenly, none of ten slices holds much more
        # than a tenth of the fleet (in step, they would all land in one)
        slices = [0] * 10
        for w in waits:
            slices[min(9, int(w / ceiling * 10))] += 1
        assert max(slices) < 1_150 and min(slices) > 850, (attempt, slices)


def test_deadline_bounds_the_waits_then_gives_up():
    now = [100.0]
    b = Backoff(base_s=1.0, cap_s=4.0, deadline_s=6.0, rand=lambda: 0.999999,
                clock=lambda: now[0])
    waits = []
    while (w := b.next_wait()) is not None:
        waits.append(w)
        now[0] += w
    assert waits == pytest.approx([1, 2, 3], rel=1e-5)  # the last one cut at the deadline
    assert now[0] == pytest.approx(106.0)


def test_a_bad_window_is_refused():
    with pytest.raises(ValueError, match="base"):
        Backoff(base_s=0, cap_s=1)
    with pytest.raises(ValueError, match="cap"):
        Backoff(base_s=2, cap_s=1)


class _Pool:
    def add_listener(self, listener):
        pass

    def entries_by_namespace(self):
        return {}


class _Controller:
    """Refuses ``failures`` calls (no answer, or an unknown worker), then answers."""

    def __init__(self, failures: list[Exception]) -> None:
        self.failures = list(failures)
        self.calls: list[str] = []

    def call(self, type_, timeout_s=None, **fields):
        self.calls.append(type_)
        if self.failures:
            raise self.failures.pop(0)
        if type_ == "register":
            return {"epoch": 1, "controller_id": "c", "heartbeat_interval_s": 1.0}
        return {"resync": False}

    def close(self):
        pass


class _Stop:
    """The link's stop event: records each wait instead of waiting; set after ``waits``."""

    def __init__(self, waits: int) -> None:
        self.left, self.waited = waits, []

    def is_set(self):
        return self.left <= 0

    def wait(self, seconds):
        self.waited.append(seconds)
        self.left -= 1

    def set(self):
        self.left = 0


def _link(controller, waits, monkeypatch, rand) -> tuple[ControlLink, _Stop]:
    monkeypatch.setattr(control_link, "retry_backoff",
                        lambda: Backoff(control_link.RETRY_BASE_S, control_link.RETRY_CAP_S,
                                        rand=rand))
    link = ControlLink(controller, _Pool(), {"worker_id": "w1"}, counters=dict)
    stop = _Stop(waits)
    link._stop = stop
    return link, stop


def test_a_worker_retries_registration_with_growing_capped_jittered_waits(monkeypatch):
    down = ControllerUnavailable("no answer")
    controller = _Controller([down] * 7)
    link, stop = _link(controller, 7, monkeypatch, rand=lambda: 0.999999)
    link._run()
    assert controller.calls == ["register"] * 7
    assert stop.waited == pytest.approx([0.5, 1, 2, 4, 8, 8, 8], rel=1e-5)


def test_a_restarted_controller_is_not_met_in_step(monkeypatch):
    # every worker hears unknown_worker within a heartbeat of the restart: each waits its own
    # jittered time before registering again, then backs off further if that fails too
    rng = random.Random(3)
    first_waits = []
    for _ in range(200):
        unknown = RemoteError(ErrorCode.UNKNOWN_WORKER, "not registered here")
        controller = _Controller([unknown, ControllerUnavailable("busy")])
        link, stop = _link(controller, 2, monkeypatch, rand=rng.random)
        link.registered.set()
        link._need_sync = False
        link._run()
        assert controller.calls == ["heartbeat", "register"]
        assert 0 <= stop.waited[0] <= 0.5 and 0 <= stop.waited[1] <= 1.0
        first_waits.append(stop.waited[0])
    assert max(first_waits) - min(first_waits) > 0.4  # spread over the window, not in step


def test_the_link_resets_its_backoff_once_it_is_up(monkeypatch):
    down = ControllerUnavailable("no answer")
    controller = _Controller([down, down, down])
    link, stop = _link(controller, 4, monkeypatch, rand=lambda: 0.999999)
    link._run()  # three failed registrations, then register, sync, heartbeat: up
    assert controller.calls[:6] == ["register"] * 4 + ["sync", "heartbeat"]
    assert link.backoff.attempts == 0
    assert stop.waited[:3] == pytest.approx([0.5, 1, 2], rel=1e-5)


def test_a_worker_the_controller_was_too_busy_for_keeps_its_registration(monkeypatch):
    # heartbeats without answer (a saturated controller): the worker waits its backoff and
    # heartbeats again; no new registration, no full sync of its chunks
    # heartbeat and, since it may still be known, waits at most a heartbeat interval: a longer
    # silence would outlast the controller's liveness timeout
    down = ControllerUnavailable("no answer")
    controller = _Controller([down] * 4)
    link, stop = _link(controller, 5, monkeypatch, rand=lambda: 0.999999)
    link.registered.set()
    link._known = True
    link._need_sync = False
    link._run()
    assert controller.calls == ["heartbeat"] * 5
    assert link.registered.is_set()
    assert stop.waited[:4] == pytest.approx([0.5, 1, 1, 1], rel=1e-5)


class _Batches(_Controller):
    """Leaves the first batch unanswered; ``applied``: whether it had applied it anyway."""

    def __init__(self, applied: bool) -> None:
        super().__init__([])
        self.applied, self.seq, self.dropped = applied, 0, False

    def call(self, type_, timeout_s=None, **fields):
        self.calls.append(type_)
        if type_ == "batch" and not self.dropped:
            self.dropped = True
            if self.applied:
                self.seq = fields["seq"]
            raise ControllerUnavailable("no answer in time")
        if type_ == "batch":
            self.seq = fields["seq"]
        if type_ == "heartbeat":
            return {"resync": fields["seq"] != self.seq}
        return {"resync": False}


@pytest.mark.parametrize("applied", [True, False])
def test_an_unanswered_batch_costs_a_full_sync_only_if_the_controller_lost_it(monkeypatch,
                                                                             applied):
    controller = _Batches(applied)
    link, stop = _link(controller, 2, monkeypatch, rand=lambda: 0.5)
    link.registered.set()
    link._known = True
    link._need_sync = False
    link._on_pool_event("admit", b"n" * 16, b"k" * 16)
    link._run()
    assert controller.calls[:2] == ["batch", "heartbeat"]
    assert ("sync" in controller.calls) is not applied


def test_lookups_keep_asking_a_busy_controller_that_still_knows_the_worker(monkeypatch):
    # a heartbeat that times out on a busy controller clears `registered` until the retry;
    # the controller still knows the worker, so lookups keep asking it (within their own
    # deadline) for a few heartbeat intervals, then treat it as gone
    now = [1000.0]
    monkeypatch.setattr(control_link.time, "monotonic", lambda: now[0])
    link, stop = _link(_Controller([]), 1, monkeypatch, rand=lambda: 0.5)
    assert not link.may_answer()  # never registered: nothing to ask
    link.register(timeout_s=1.0)
    link._need_sync = False
    link._client.failures = [ControllerUnavailable("heartbeat timed out")]
    link._run()
    assert not link.registered.is_set()
    grace = control_link.UNHEARD_GRACE_INTERVALS * link.heartbeat_interval_s
    now[0] += grace - 0.01
    assert link.may_answer()
    link.heard()  # a lookup was answered: the controller is alive, only slow
    now[0] += grace - 0.01
    assert link.may_answer()
    now[0] += 0.02
    assert not link.may_answer()  # unheard for the whole grace: lookups answer locally


def test_lookups_stop_asking_a_controller_that_forgot_the_worker(monkeypatch):
    unknown = RemoteError(ErrorCode.UNKNOWN_WORKER, "not registered here")
    link, stop = _link(_Controller([]), 1, monkeypatch, rand=lambda: 0.5)
    link.register(timeout_s=1.0)
    link._need_sync = False
    link._client.failures = [unknown]
    link._run()
    assert not link.may_answer()  # a restarted controller: no holders to learn until re-synced
