"""The reaper's pass (``workers.reaper``) with the broker away: what it cannot send is
never made PENDING while an earlier message may still deliver it. The real store; the
broker's send is made to fail."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

import scheduler.canvas as canvas
import workers.reaper as reaper
import workers.tasks.base as base
from db.store import Store
from tests.db.test_store import make_store, seed_campaign


class BrokerDown:
    sends = 0

    def apply_async(self) -> None:
        BrokerDown.sends += 1
        raise ConnectionError("broker down")


def test_units_it_cannot_send_again_stay_queued_for_their_first_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORCHARD_LEASE_SECONDS", "0.05")
    store = make_store(f"sqlite:///{tmp_path / 's.db'}")
    keys = [p.key for p in seed_campaign(store) if p.stage == 0]
    store.claim_for_queue(keys, {k: f"first-{i}" for i, k in enumerate(keys)})
    store.mark_sent([f"first-{i}" for i in range(len(keys))])
    queue = store.get_unit(keys[0]).queue
    monkeypatch.setattr(base, "worker_store", lambda: store)
    monkeypatch.setattr(canvas, "unit_signature", lambda *a, **k: BrokerDown())

    # an outage longer than DROPPED_AFTER_LEASES lease periods: nothing was taken, the
    # idle worker's pass finds the units "dropped", twice (SENT, then unsent QUEUED)
    monkeypatch.setattr(BrokerDown, "sends", 0)
    for tried in (1, 2):
        time.sleep(0.05 * (reaper.DROPPED_AFTER_LEASES + 1))
        assert reaper.requeue_lost_units(object(), [queue]) == []  # none could be sent
        assert BrokerDown.sends >= tried  # ... though it tried
        assert {store.get_unit(k).state for k in keys} == {"QUEUED"}
    # the broker is back and hands out the first messages: they run their units
    starts = [
        store.start_unit(k, worker="w", task_id=f"first-{i}", holder=f"h{i}")
        for i, k in enumerate(keys)
    ]
    assert all(start.run for start in starts)


def test_an_idle_worker_is_one_that_holds_no_message_at_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from celery.worker import state

    from workers.app import app

    monkeypatch.setattr(app.amqp.queues, "_consume_from", {"gpu": None})
    assert reaper.idle_queues(app) == ["gpu"]
    for held in (state.active_requests, state.reserved_requests, state.scheduled_requests):

        class Request:  # a weakly referenced stand-in for a request
            pass

        request = Request()
        held.add(request)
        try:
            assert reaper.idle_queues(app) == []
        finally:
            held.discard(request)


def _a_running_unit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lease: float
) -> tuple[Store, str]:
    """A store (this process's worker's) with a unit sent and started under a lease of
    ``lease`` seconds, the workers' ORCHARD_LEASE_SECONDS too."""
    monkeypatch.setenv("ORCHARD_LEASE_SECONDS", str(lease))
    store = make_store(f"sqlite:///{tmp_path / 's.db'}")
    key = next(p.key for p in seed_campaign(store) if p.stage == 0)
    store.claim_for_queue([key], {key: "first"})
    store.mark_sent(["first"])
    assert store.start_unit(key, worker="w", task_id="first", holder="h", lease_seconds=lease).run
    monkeypatch.setattr(base, "worker_store", lambda: store)
    return store, key


def _sends_recorded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys of the units the passes send, in order (the broker stood in for)."""
    sent: list[str] = []

    class Sent:
        def __init__(self, *args: object) -> None:
            self.key = args[4]

        def apply_async(self) -> None:
            sent.append(self.key)

    monkeypatch.setattr(canvas, "unit_signature", Sent)
    return sent


def test_a_lost_worker_s_unit_the_broker_cannot_take_goes_back_to_pending(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A RUNNING unit whose worker died (its lease long run out) and the broker away as
    the pass sends it again: its own delivery died with the worker, so nothing would
    run it; it goes back to PENDING, for the next stage opening (a stalled campaign's
    advance, `orchard resume`) to send."""
    store, key = _a_running_unit(tmp_path, monkeypatch, 0.05)
    monkeypatch.setattr(canvas, "unit_signature", lambda *a, **k: BrokerDown())
    time.sleep(0.05 * 3)  # its lease ran out over a lease period ago
    assert reaper.requeue_lost_units(object()) == []
    assert store.get_unit(key).state == "PENDING"
    assert f"{key}: not sent again, left to the next stage opening: broker down" in caplog.text


def test_a_stalled_campaign_the_pass_cannot_advance_waits_for_the_next_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing moved a running campaign for two lease periods; advancing it fails (the
    broker away): logged, and the pass goes on; the next one tries again."""
    monkeypatch.setenv("ORCHARD_LEASE_SECONDS", "0.05")
    store = make_store(f"sqlite:///{tmp_path / 's.db'}")
    seed_campaign(store)  # its first stage never sent
    monkeypatch.setattr(base, "worker_store", lambda: store)

    def broker_away(*_args: object) -> list[str]:
        raise ConnectionError("broker down")

    monkeypatch.setattr(canvas, "advance", broker_away)
    time.sleep(0.05 * 3)
    assert reaper.requeue_lost_units(object()) == []
    assert "t-1: stalled, and could not advance it: broker down" in caplog.text
    assert {u.state for u in store.units("t-1")} == {"PENDING"}


def test_a_step_of_the_store_s_clock_takes_no_live_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The store's clock steps three minutes ahead (an NTP step, a resumed virtual
    machine): every live lease looks run out for over a lease period, though its worker
    renews it on time. The pass that sees the step takes none; the next one, a lease
    period later by this host's clock, takes a lease its holder did not renew."""
    import db.store as store_module

    store, key = _a_running_unit(tmp_path, monkeypatch, 60)
    sent = _sends_recorded(monkeypatch)
    clock = reaper.StoreClock()
    assert reaper.requeue_lost_units(object(), (), clock) == []  # the lease is live
    host_clock = store_module.utcnow
    monkeypatch.setattr(store_module, "utcnow", lambda: host_clock() + timedelta(minutes=3))
    assert reaper.requeue_lost_units(object(), (), clock) == []
    assert store.get_unit(key).state == "RUNNING" and sent == []
    assert "the store's clock ran 180 s ahead of this host's" in caplog.text
    # its worker renews by the new clock: live; had it not, the next pass takes it
    assert store.renew_lease(key, "h", 60) == "held"
    assert reaper.requeue_lost_units(object(), (), clock) == []
    monkeypatch.setattr(store_module, "utcnow", lambda: host_clock() + timedelta(minutes=6))
    monkeypatch.setattr(time, "monotonic", lambda real=time.monotonic: real() + 180)
    assert reaper.requeue_lost_units(object(), (), clock) == [key]
    assert sent == [key] and store.get_unit(key).state == "QUEUED"


def test_the_pass_after_an_outage_leaves_run_out_leases_a_lease_period(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The database was away longer than two lease periods: every running unit's lease
    ran out, none could be renewed. Its workers renew them once it answers (a finished
    unit offers its result every 5 s); the reapers, each looking once a lease period,
    took the units over first about half the time with ten workers, and the finished
    results were lost. The first pass that reaches the store again takes no lease; the
    next one takes a lease its holder did not renew."""
    import logging

    from db.store import StoreUnreachableError

    # a lease of 0.5 s: the clock skips a pass it finds half a lease late, so a shorter
    # one made a test process preempted for 25 ms (a loaded machine) fail
    store, key = _a_running_unit(tmp_path, monkeypatch, 0.5)
    sent = _sends_recorded(monkeypatch)
    clock = reaper.StoreClock()

    def away() -> Store:
        raise StoreUnreachableError("database x unreachable: gone (gave up after 5 s)")

    monkeypatch.setattr(base, "worker_store", away)
    assert reaper.requeue_lost_units(object(), (), clock) == []
    monkeypatch.setattr(base, "worker_store", lambda: store)
    time.sleep(0.5 * 3)  # the lease ran out over a lease period ago
    caplog.set_level(logging.INFO, logger=reaper.log.name)
    assert reaper.requeue_lost_units(object(), (), clock) == []
    assert store.get_unit(key).state == "RUNNING" and sent == []
    assert "the store answers again" in caplog.text
    assert reaper.requeue_lost_units(object(), (), clock) == [key]  # not renewed since


def test_idleness_counts_only_time_without_any_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reaper sends a worker's queues' units again only once it has held nothing for
    five lease periods. Its looks, once a second, would miss units of milliseconds run
    between two of them: a message received says so (Celery's task_received, in the
    worker's main process). A change of the queues it consumes starts the count over."""
    from celery.signals import task_received

    clock = [100.0]
    monkeypatch.setattr(reaper.time, "monotonic", lambda: clock[0])
    idle = reaper.Idleness()
    assert idle.sample(["gpu"]) == 0.0  # idle from now on
    clock[0] += 30
    assert idle.sample(["gpu"]) == 30.0
    task_received.connect(idle.received, weak=False)
    try:
        task_received.send(sender=None, request=None)  # a unit of milliseconds, unseen
    finally:
        task_received.disconnect(idle.received)
    clock[0] += 5
    assert idle.sample(["gpu"]) == 5.0
    clock[0] += 5
    assert idle.sample([]) == 0.0  # holds a message
    clock[0] += 5
    assert idle.sample(["gpu"]) == 0.0  # idle again, from now
    clock[0] += 20
    assert idle.sample(["gpu"]) == 20.0
    assert idle.sample(["cpu", "gpu"]) == 0.0  # another set of queues: counted anew
    clock[0] += 1
    assert idle.sample(["cpu", "gpu"]) == 1.0


class _Stopping:
    """The reaper thread's wait, on a clock of the test's: each wait moves it on."""

    def __init__(self, clock: list[float], passes: int) -> None:
        self.clock, self.left = clock, passes

    def wait(self, seconds: float) -> bool:
        self.clock[0] += seconds
        return self.left <= 0


def _reaper_passes(
    monkeypatch: pytest.MonkeyPatch, connected: Callable[[float], bool], passes: int = 12
) -> list[tuple[float, list[str]]]:
    """The queues each pass of a worker that holds no message is given, on a clock of
    the test's (lease 1 s); ``connected(t)``: whether its consumer is connected then."""
    from types import SimpleNamespace

    from celery import bootsteps

    monkeypatch.setenv("ORCHARD_LEASE_SECONDS", "1")
    clock = [0.0]
    monkeypatch.setattr(reaper.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(reaper, "idle_queues", lambda app: ["gpu"])
    step = reaper.LostUnitReaper.__new__(reaper.LostUnitReaper)
    step.stopping, step.idleness = _Stopping(clock, passes), reaper.Idleness()
    seen: list[tuple[float, list[str]]] = []

    def one_pass(app: object, queues: list[str], store_clock: object) -> list[str]:
        seen.append((clock[0], list(queues)))
        step.stopping.left -= 1
        return []

    monkeypatch.setattr(reaper, "requeue_lost_units", one_pass)

    class Connection:
        @property
        def connected(self) -> bool:
            return connected(clock[0])

    consumer = SimpleNamespace(
        blueprint=SimpleNamespace(state=bootsteps.RUN), connection=Connection()
    )
    step.run(SimpleNamespace(), SimpleNamespace(consumer=consumer))
    return seen


def test_a_worker_idle_for_long_enough_names_its_queues_to_the_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each pass, once a lease period: the queues only after DROPPED_AFTER_LEASES lease
    periods of idleness, connected to the broker."""
    passes = _reaper_passes(monkeypatch, lambda t: True)
    named = [at for at, queues in passes if queues]
    assert named and min(named) >= reaper.DROPPED_AFTER_LEASES
    assert all(queues == ["gpu"] for at, queues in passes if at >= 6), passes


def test_time_cut_off_from_the_broker_is_no_idleness(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker whose broker is away (Redis restarting for minutes) holds no message,
    but could take none: counted as idle, it sent every queued unit again after five
    lease periods, next to their messages, which came back with the broker. Idle again
    from its reconnection only."""
    passes = _reaper_passes(monkeypatch, lambda t: not 2 <= t < 9, passes=20)
    named = [at for at, queues in passes if queues]
    assert named and min(named) >= 9 + reaper.DROPPED_AFTER_LEASES, passes
