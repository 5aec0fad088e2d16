"""The lease heartbeat's thread: a takeover stops the body; the body's own finish does not.

The store is a stand-in whose renewals the test steps one at a time, so the race the
integration tests can only meet by chance (a renewal that reads the unit after the
body recorded its result) happens every time here.
"""

from __future__ import annotations

import logging
import threading

import pytest

from db.store import LEASE_HELD, LEASE_LOST
from workers.config import Reliability
from workers.lease import Heartbeat, UnitAborted

RULES = Reliability(lease_seconds=0.03, max_attempts=3, visibility_timeout=3600)


class SteppedStore:
    """``renew_lease`` answers ``answer``; ``during`` runs inside the renewal."""

    def __init__(self, answer: str, during=lambda: None) -> None:
        self.answer, self.during = answer, during
        self.renewed = threading.Event()

    def renew_lease(self, key: str, holder: str, lease_seconds: float) -> str:
        self.during()
        self.renewed.set()
        return self.answer


KEY = "c/cnn/abc/f0"


def heartbeat_on(store: SteppedStore) -> Heartbeat:
    return Heartbeat(store, KEY, "d1", RULES)  # type: ignore[arg-type]


def renewed_once(heartbeat: Heartbeat, store: SteppedStore) -> Heartbeat:
    """Start ``heartbeat`` and wait until its thread has renewed and ended."""
    heartbeat.start()
    assert store.renewed.wait(5)
    heartbeat._thread.join(5)
    assert not heartbeat._thread.is_alive()
    return heartbeat


def test_a_takeover_is_remembered_and_raised_at_the_next_check(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    store = SteppedStore(LEASE_LOST)
    heartbeat = renewed_once(heartbeat_on(store), store)
    assert heartbeat.lost == LEASE_LOST
    with pytest.raises(UnitAborted) as stopped:
        heartbeat.check()
    assert stopped.value.reason == LEASE_LOST
    (record,) = [r for r in caplog.records if "stopping at the next checkpoint" in r.message]
    # not a task logger's record: from this thread it would print "???[???]"
    assert not record.name.startswith(("celery", "orchard"))
    assert record.getMessage() == f"{KEY}: lease lost; stopping at the next checkpoint"


def test_a_renewal_that_finds_the_bodys_own_result_stops_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    store = SteppedStore(LEASE_LOST)
    heartbeat = heartbeat_on(store)
    store.during = heartbeat.stop  # the task stops the heartbeat, then records its result
    renewed_once(heartbeat, store)
    assert heartbeat.lost is None
    heartbeat.check()
    assert not [r for r in caplog.records if "lease" in r.getMessage()]


def test_a_held_lease_keeps_renewing_until_stopped() -> None:
    count = 0
    enough = threading.Event()

    def counting() -> None:
        nonlocal count
        count += 1
        if count >= 3:
            enough.set()

    store = SteppedStore(LEASE_HELD, during=counting)
    heartbeat = heartbeat_on(store).start()
    assert enough.wait(5)
    heartbeat.stop()
    heartbeat._thread.join(5)
    assert not heartbeat._thread.is_alive() and heartbeat.lost is None
