"""The store on SQLite and on the real PostgreSQL: migrations, idempotent writes, races."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, inspect, text, update
from sqlalchemy.exc import IntegrityError

from db import migrate
from db.engine import _connect_args
from db.models import CampaignRow, UnitRow, utcnow
from db.store import (
    LEASE_CANCELLED,
    LEASE_GONE,
    LEASE_HELD,
    LEASE_LOST,
    Artifact,
    BeingDeletedError,
    CampaignDeletedError,
    DeleteRefusedError,
    LeaseLostError,
    NotFoundError,
    Outcome,
    Prediction,
    Start,
    Store,
    StoreError,
    UnitCancelledError,
)
from shared.plan import UnitPlan, plan_units
from shared.settings import mask_url
from shared.spec import parse_campaign
from tests.conftest import record_begins
from tests.tcpproxy import TcpProxy

CAMPAIGN = {
    "name": "t",
    "folds": 2,
    "dataset": {"kind": "synthetic"},
    "cnn": {"folds": 2, "epochs": 1},
    "svm": {"C": [1.0, 2.0]},
}


def make_store(url: str) -> Store:
    store = Store(url)
    store.upgrade()
    return store


def seed_campaign(
    store: Store, cid: str = "t-1", *, data_digest: str | None = None
) -> list[UnitPlan]:
    campaign = parse_campaign(CAMPAIGN, source="test")
    units = plan_units(cid, campaign, [(0, 10), (10, 20)])
    store.create_campaign(
        cid,
        name="t",
        source="test.toml",
        digest=campaign.digest(),
        spec=campaign.model_dump(mode="json"),
        classes=["A", "B", "C"],
        units=units,
        data_digest=data_digest,
    )
    return units


def bare_campaign(store: Store, cid: str, units: list[UnitPlan], **fields: Any) -> None:
    """Campaign ``cid`` of ``units``, with little else (``fields`` overrides it)."""
    store.create_campaign(
        cid,
        **{
            "name": cid.split("-")[0],
            "source": f"{cid}.toml",
            "digest": "d",
            "spec": {},
            "classes": ["A"],
            "units": units,
            **fields,
        },
    )


def deliver(store: Store, key: str, **kwargs: Any) -> Start:
    """A delivery of a unit's message: sent only after the unit's claim (PENDING ->
    QUEUED; a no-op for a unit claimed or started before)."""
    store.claim_for_queue([key])
    return store.start_unit(key, **kwargs)


def outcome(val_acc: float = 0.5) -> Outcome:
    return Outcome(
        fit_seconds=1.0,
        train_acc=0.9,
        val_acc=val_acc,
        test_acc=None,
        extra={"note": "x"},
        predictions={
            "val": [Prediction("a.jpg", 0, 1, [0.2, 0.7, 0.1]), Prediction("b.jpg", 2, 2)]
        },
        artifacts=[Artifact("models/m.pt", "model", "0" * 64, 10, "t-1", None)],
    )


def test_migrations_create_every_table_and_round_trip(store_url: str) -> None:
    store = make_store(store_url)
    store.check_schema()
    tables = set(inspect(store.engine).get_table_names())
    assert {
        "campaigns",
        "units",
        "unit_params",
        "metrics",
        "results",
        "predictions",
        "artifacts",
    } <= tables
    migrate.downgrade(store.engine, "base")
    assert "units" not in inspect(store.engine).get_table_names()
    store.upgrade()
    store.upgrade()  # a second upgrade is a no-op
    assert migrate.current_revision(store.engine) == migrate.head_revision()


def test_the_migrations_build_exactly_the_tables_the_models_declare(store_url: str) -> None:
    """What `orchard db upgrade` builds is what the code reads and writes: every table,
    column, type, nullability, index and foreign key of ``db.models``, nothing else."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from db.models import Base

    store = make_store(store_url)
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_unmigrated_database_is_reported_clearly(store_url: str) -> None:
    store = Store(store_url)
    with pytest.raises(StoreError) as info:
        store.check_schema()
    assert str(info.value) == (
        f"database {mask_url(store_url)} has no orchard tables yet: run `orchard db upgrade`"
    )


def test_a_database_a_newer_orchard_upgraded_is_not_upgraded_from_here(store_url: str) -> None:
    """A rolling update gone wrong: the schema is at a revision these migrations do not
    know. `orchard db upgrade` must not try (Alembic cannot) nor advise it."""
    store = make_store(store_url)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0999'"))
    expected = (
        f"database {mask_url(store_url)} is at schema 0999, newer than this orchard knows "
        f"(its newest is {migrate.head_revision()}): run the orchard that upgraded it, on "
        "every host"
    )
    for call in (store.check_schema, store.upgrade):
        with pytest.raises(StoreError) as info:
            call()
        assert str(info.value) == expected
    assert migrate.current_revision(store.engine) == "0999"  # left as it was


def test_an_older_schema_is_told_to_upgrade(store_url: str) -> None:
    store = Store(store_url)
    migrate.upgrade(store.engine, "0001")
    with pytest.raises(StoreError) as info:
        store.check_schema()
    assert str(info.value) == (
        f"database {mask_url(store_url)} is at schema 0001, expected "
        f"{migrate.head_revision()}: run `orchard db upgrade`"
    )


def test_of_upgrades_at_once_one_creates_the_schema_and_the_others_find_it(
    postgres_url: str,
) -> None:
    """Several `orchard db upgrade` on an empty database together: the migration lock
    serialises them, and each reads what it found under that lock, so exactly one says
    it created the schema."""
    stores = [Store(postgres_url) for _ in range(4)]
    barrier = threading.Barrier(len(stores))

    def upgrade(store: Store) -> tuple[str | None, str]:
        barrier.wait()
        return store.upgrade()

    try:
        with ThreadPoolExecutor(len(stores)) as pool:
            found = [before for before, _ in pool.map(upgrade, stores)]
    finally:
        for store in stores:
            store.dispose()
    head = migrate.head_revision()
    assert found.count(None) == 1 and found.count(head) == 3


def test_campaign_and_units_round_trip(store_url: str) -> None:
    store = make_store(store_url)
    plans = seed_campaign(store)
    units = store.units("t-1")
    assert [u.key for u in units] == [p.key for p in plans]
    svm = [u for u in units if u.family == "svm"]
    assert sorted(u.params["C"] for u in svm) == [1.0, 2.0]
    assert all(u.state == "PENDING" and u.attempts == 0 for u in units)
    assert store.get_campaign("t-1").classes == ("A", "B", "C")
    with pytest.raises(StoreError, match="no campaign"):
        store.get_campaign("nope")


def test_units_never_come_back_without_the_params_committed_with_them(store_url: str) -> None:
    """units() reads the units and their params in two statements; on PostgreSQL (read
    committed) each sees what was committed when it began. A campaign committed between
    the two must come back whole or not at all, never as units without their params:
    the params are read for the units already read, not before them."""
    reader = make_store(store_url)
    writer = Store(store_url)
    plans: list[UnitPlan] = []
    selects = 0

    def commit_the_campaign_between(conn, cursor, statement, *_rest) -> None:  # noqa: ANN001
        nonlocal selects, plans
        if statement.lstrip().upper().startswith("SELECT"):
            selects += 1
            if selects == 2:  # after the first of units()'s two reads, before the second
                plans = seed_campaign(writer)

    event.listen(reader.engine, "before_cursor_execute", commit_the_campaign_between)
    try:
        units = reader.units("t-1")
    finally:
        event.remove(reader.engine, "before_cursor_execute", commit_the_campaign_between)
        writer.dispose()
    assert selects == 2 and plans  # the campaign was committed between the two reads
    assert [u.params for u in units] in ([], [p.params for p in plans])
    assert [u.params for u in reader.units("t-1")] == [p.params for p in plans]


def test_claim_for_queue_is_won_once(store_url: str) -> None:
    store = make_store(store_url)
    plans = seed_campaign(store)
    keys = [p.key for p in plans[:2]]
    assert store.claim_for_queue(keys) == keys
    assert store.claim_for_queue(keys) == []
    assert {u.state for u in store.units("t-1")[:2]} == {"QUEUED"}


def test_result_written_twice_stays_one_row(store_url: str) -> None:
    store = make_store(store_url)
    key = seed_campaign(store)[2].key
    assert deliver(store, key, worker="w1", task_id="a").run
    assert store.finish_unit(key, outcome(0.5)) is True
    # a second delivery of the same task: it may not even start, nor write again
    again = deliver(store, key, worker="w2", task_id="b")
    assert not again.run and again.state == "SUCCESS"
    assert store.finish_unit(key, outcome(0.9)) is False
    assert store.results("t-1")[key].val_acc == 0.5  # first write wins
    assert store.count_rows("t-1") == {"results": 1, "predictions": 2, "metrics": 0}
    preds = store.predictions(key, "val")
    assert [(p.image_id, p.label, p.pred) for p in preds] == [("a.jpg", 0, 1), ("b.jpg", 2, 2)]
    assert preds[0].probs == [0.2, 0.7, 0.1]
    assert store.find_artifact("models/m.pt").sha256 == "0" * 64


def test_a_recorded_result_forgets_its_units_scratch_artifacts(store_url: str) -> None:
    store = make_store(store_url)
    key = seed_campaign(store)[2].key
    scratch = ["campaigns/t-1/checkpoints/c-s0.pt", "campaigns/t-1/checkpoints/c-s1.pt"]
    for path in [*scratch, "campaigns/t-1/keep.pt"]:
        store.record_artifact(Artifact(path, "checkpoint", "1" * 64, 1, "t-1", key))
    assert deliver(store, key, worker="w1", task_id="a").run
    done = replace(outcome(), scratch=scratch)
    assert store.finish_unit(key, done) is True
    assert [a.path for a in store.artifacts("t-1", kind="checkpoint")] == ["campaigns/t-1/keep.pt"]
    assert store.find_artifact("models/m.pt") is not None  # the outcome's own artifact
    # a second delivery writes nothing, and forgets nothing either
    store.record_artifact(Artifact(scratch[0], "checkpoint", "2" * 64, 1, "t-1", key))
    assert store.finish_unit(key, done) is False
    assert store.find_artifact(scratch[0]) is not None


def test_metrics_upsert_per_step(store_url: str) -> None:
    store = make_store(store_url)
    key = seed_campaign(store)[2].key
    store.record_metrics(key, 0, {"val_acc": 0.3, "train_loss": 1.0})
    store.record_metrics(key, 1, {"val_acc": 0.4})
    store.record_metrics(key, 1, {"val_acc": 0.6})  # the epoch ran again after a retry
    assert store.metrics(key)["val_acc"] == [(0, 0.3), (1, 0.6)]
    assert store.count_rows("t-1")["metrics"] == 3


def test_failure_never_overrides_success(store_url: str) -> None:
    store = make_store(store_url)
    plans = seed_campaign(store)
    done, broken = plans[2].key, plans[3].key
    deliver(store, done, worker="w", task_id=None)
    store.finish_unit(done, outcome())
    assert store.fail_unit(done, "late duplicate crashed") is False
    assert store.get_unit(done).state == "SUCCESS"
    assert store.fail_unit(broken, "ValueError: bad") is True
    assert store.get_unit(broken).error == "ValueError: bad"


def test_complete_campaign_done_or_partial(store_url: str) -> None:
    store = make_store(store_url)
    plans = seed_campaign(store)
    assert store.complete_campaign("t-1") is None  # units still pending
    for plan in plans[:-1]:
        deliver(store, plan.key, worker="w", task_id=None)
        store.finish_unit(plan.key, outcome())
    store.fail_unit(plans[-1].key, "boom")
    assert store.complete_campaign("t-1") == "PARTIAL"
    assert store.complete_campaign("t-1") is None  # closed once
    assert store.get_campaign("t-1").state == "PARTIAL"


def test_concurrent_finishers_record_exactly_one_result(store_url: str) -> None:
    """Several workers finishing the same unit at once: one row, one winner."""
    make_store(store_url)
    seed_campaign(Store(store_url))
    key = f"t-1/svm/{Store(store_url).units('t-1')[-2].params_hash}/f0"
    barrier = threading.Barrier(6)
    wins: list[bool] = []

    def finish() -> None:
        store = Store(store_url)  # its own engine, like a separate worker process
        barrier.wait()
        wins.append(store.finish_unit(key, outcome()))
        store.dispose()

    threads = [threading.Thread(target=finish) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 5 + [True]
    assert Store(store_url).count_rows("t-1")["results"] == 1


def test_unreachable_database_fails_with_masked_url() -> None:
    store = Store("postgresql+psycopg://orchard:s3cret@127.0.0.1:1/orchard")
    # a server that never answers is given seconds, not the driver's default of none
    assert _connect_args(store.url)["connect_timeout"] == 5
    with pytest.raises(StoreError) as err:
        store.check_schema()
    message = str(err.value)
    assert "s3cret" not in message and "***" in message and "\n" not in message


# ---------------------------------------------------------------- leases, attempts, cancel


def test_a_start_that_runs_hands_over_the_unit_and_its_campaign(store_url: str) -> None:
    """What the delivery then runs: it read both again, two more transactions a unit."""
    store = make_store(store_url)
    plan = seed_campaign(store)[2]
    start = deliver(store, plan.key, worker="w1", task_id="t", holder="d1", lease_seconds=30)
    assert start.run and start.campaign == store.get_campaign("t-1")
    unit, stored = start.unit, store.get_unit(plan.key)
    assert unit is not None and unit.params == plan.params == stored.params
    assert list(unit.params) == list(stored.params)  # in the same order
    for name in ("key", "family", "stage", "fold", "params_hash", "task", "queue", "state"):
        assert getattr(unit, name) == getattr(stored, name), name
    assert (unit.state, unit.attempts, unit.worker, unit.task_id) == ("RUNNING", 1, "w1", "t")
    assert unit.lease_holder == "d1" and unit.lease_expires_at == stored.lease_expires_at
    again = deliver(store, plan.key, worker="w2", task_id="t", holder="d2", lease_seconds=30)
    assert not again.run and again.unit is None and again.campaign is None


def test_a_live_lease_turns_a_second_delivery_away(store_url: str) -> None:
    store = make_store(store_url)
    key = seed_campaign(store)[2].key
    first = deliver(store, key, worker="w1", task_id="t", holder="d1", lease_seconds=30)
    assert first.run and first.attempts == 1
    # the same message delivered again (visibility timeout, second worker): it must wait
    second = deliver(store, key, worker="w2", task_id="t", holder="d2", lease_seconds=30)
    assert not second.run and second.reason == "leased" and 25 < second.retry_in <= 30
    assert store.get_unit(key).lease_holder == "d1"
    assert store.renew_lease(key, "d1", 30) == "held"
    assert store.renew_lease(key, "d2", 30) == "lost"  # never held it


def test_a_unit_of_a_campaign_of_a_newer_format_is_left_queued(store_url: str) -> None:
    """A worker of an older orchard (format 1) meets a campaign a newer one submitted
    (format 2): its start leaves the unit as it was, with no lease and no attempt, and
    says the campaign's format; a worker of format 2 (or one that does not say) runs it."""
    from shared.spec import CAMPAIGN_FORMAT

    store = make_store(store_url)
    campaign = parse_campaign(CAMPAIGN, source="test")
    [*_, unit] = plan_units("n-1", campaign, [(0, 10), (10, 20)])
    bare_campaign(store, "n-1", [unit], format_version=CAMPAIGN_FORMAT + 1)
    assert store.get_campaign("n-1").format_version == CAMPAIGN_FORMAT + 1
    newer = CAMPAIGN_FORMAT + 1
    old = deliver(
        store, unit.key, worker="w1", task_id="t", holder="d1", newest_format=CAMPAIGN_FORMAT
    )
    assert (old.run, old.reason, old.format_version) == (False, "newer format", newer)
    left = store.get_unit(unit.key)
    assert (left.state, left.attempts, left.lease_holder) == ("QUEUED", 0, None)
    new = store.start_unit(unit.key, worker="w2", task_id="t", holder="d2", newest_format=newer)
    assert new.run and new.attempts == 1 and new.campaign.format_version == newer
    # this orchard's own submits are of its format
    seed_campaign(store)
    assert store.get_campaign("t-1").format_version == CAMPAIGN_FORMAT


def test_a_start_made_again_by_its_own_delivery_counts_once(store_url: str) -> None:
    """The store retries a start whose commit's answer was lost (the connection dropped
    after COMMIT): the same delivery, so neither a second attempt nor "gave up" at the
    last one; another delivery is still turned away."""
    store = make_store(store_url)
    key = seed_campaign(store)[2].key
    first = deliver(store, key, worker="w1", task_id="t", holder="d1", max_attempts=1)
    again = store.start_unit(key, worker="w1", task_id="t", holder="d1", max_attempts=1)
    assert (first.run, first.attempts) == (again.run, again.attempts) == (True, 1)
    other = store.start_unit(key, worker="w2", task_id="t", holder="d2", max_attempts=1)
    assert not other.run and other.reason == "leased"


def test_an_expired_lease_is_taken_over_and_the_old_holder_finds_out(store_url: str) -> None:
    store = make_store(store_url)
    key = seed_campaign(store)[2].key
    assert deliver(store, key, worker="w1", task_id="t", holder="d1", lease_seconds=0.2).run
    time.sleep(0.4)  # d1 stopped renewing (killed)
    takeover = deliver(store, key, worker="w2", task_id="t", holder="d2", lease_seconds=30)
    assert takeover.run and takeover.attempts == 2
    assert store.renew_lease(key, "d1", 30) == "lost"
    assert store.fail_unit(key, "d1 crashed late", holder="d1") is False  # not d1's to fail
    assert store.get_unit(key).state == "RUNNING"
    assert store.finish_unit(key, outcome()) is True
    assert store.get_unit(key).lease_holder is None


def test_a_delivery_that_lost_its_unit_to_the_queue_cannot_fail_it(store_url: str) -> None:
    """The reaper sent an expired unit again (QUEUED, no lease) before its first delivery,
    only slow, raised: that failure must not end the unit the new message will run."""
    store = make_store(store_url)
    key = seed_campaign(store)[2].key
    assert deliver(store, key, worker="w1", task_id="t", holder="d1", lease_seconds=0.2).run
    time.sleep(0.4)
    (lost,) = store.requeue_lost(0.0, lambda: "t2")
    assert lost.key == key and store.get_unit(key).state == "QUEUED"
    assert store.fail_unit(key, "d1 raised late", holder="d1") is False
    assert store.get_unit(key).state == "QUEUED" and store.get_unit(key).error is None
    again = store.start_unit(key, worker="w2", task_id="t2", holder="d2", lease_seconds=30)
    assert again.run and again.attempts == 2
    assert store.fail_unit(key, "d2 raised", holder="d2") is True  # its own, still held
    assert store.get_unit(key).state == "FAILED"


def test_leases_follow_the_postgres_server_clock_not_the_hosts(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers on two hosts whose clocks disagree by ten minutes still agree on a lease:
    on PostgreSQL every lease is written and compared in the server's time."""
    import db.store as store_module

    store = make_store(postgres_url)
    units = seed_campaign(store)
    running, other = units[2].key, units[3].key
    host_clock = store_module.utcnow
    # a host whose clock is ten minutes slow takes a lease of 30 s
    monkeypatch.setattr(store_module, "utcnow", lambda: host_clock() - timedelta(minutes=10))
    assert deliver(store, running, worker="slow", task_id="t", holder="d1", lease_seconds=30).run
    # a host ten minutes fast finds it live: by its own clock it ran out 9.5 minutes ago
    monkeypatch.setattr(store_module, "utcnow", lambda: host_clock() + timedelta(minutes=10))
    second = deliver(store, running, worker="fast", task_id="t", holder="d2", lease_seconds=30)
    assert not second.run and second.reason == "leased" and 25 < second.retry_in <= 30
    assert store.renew_lease(running, "d1", 30) == "held"
    assert running not in store.resume_campaign("t-1")  # still running, not reset
    # and every timestamp is the server's: none is ten minutes off
    assert deliver(store, other, worker="fast", task_id="t", holder="d3", lease_seconds=30).run
    for key in (running, other):
        unit = store.get_unit(key)
        assert abs(unit.started_at - host_clock()) < timedelta(minutes=1)
        assert abs(unit.lease_expires_at - host_clock() - timedelta(seconds=30)) < timedelta(
            minutes=1
        )


def test_a_store_clock_stepped_back_puts_a_second_delivery_off_a_lease_period_at_most(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lease taken before the store's clock stepped back an hour ends, by the new
    clock, an hour and a minute from now: a second delivery that waited for it held a
    worker slot for an hour. It comes back within a lease period; the holder renews on
    time or is dead by then."""
    import db.store as store_module

    store = make_store(sqlite_url)
    units = seed_campaign(store)
    live = units[2].key
    assert deliver(store, live, worker="w", task_id="t", holder="d1", lease_seconds=60).run
    host_clock = store_module.utcnow
    monkeypatch.setattr(store_module, "utcnow", lambda: host_clock() - timedelta(hours=1))
    second = deliver(store, live, worker="w2", task_id="t", holder="d2", lease_seconds=60)
    assert not second.run and second.reason == "leased" and 59 < second.retry_in <= 60


def test_units_whose_worker_died_are_requeued_once(store_url: str) -> None:
    store = make_store(store_url)
    units = seed_campaign(store)
    dead, alive, done = units[2].key, units[3].key, units[4].key
    store.claim_for_queue([dead, alive, done], {dead: "t1", alive: "t2", done: "t3"})
    deliver(store, dead, worker="w1", task_id="t1", holder="d1", lease_seconds=0.1)
    deliver(store, alive, worker="w2", task_id="t2", holder="d2", lease_seconds=30)
    deliver(store, done, worker="w3", task_id="t3", holder="d3", lease_seconds=0.1)
    store.finish_unit(done, outcome())
    ids = iter(["new-1", "new-2"])
    assert store.requeue_lost(5.0, lambda: next(ids)) == []  # not yet past the grace
    time.sleep(0.3)
    lost = store.requeue_lost(0.1, lambda: next(ids))
    assert [(u.key, u.task_id) for u in lost] == [(dead, "new-1")]
    store.mark_sent(["new-1"])  # as the reaper does once it sent it
    assert (lost[0].campaign_id, lost[0].task, lost[0].queue) == ("t-1", units[2].task, "gpu")
    assert (lost[0].lost_in, lost[0].worker) == ("RUNNING", "w1")  # for the reaper's line
    unit = store.get_unit(dead)
    assert (unit.state, unit.task_id, unit.lease_holder) == ("QUEUED", "new-1", None)
    assert store.requeue_lost(0.1, lambda: next(ids)) == []  # once only
    # the requeued message starts it as a new attempt; the old delivery finds out
    restart = deliver(store, dead, worker="w4", task_id="new-1", holder="d4", lease_seconds=30)
    assert restart.run and restart.attempts == 2
    assert store.renew_lease(dead, "d1", 30) == "lost"
    # nothing is requeued from a cancelled campaign
    deliver(store, alive, worker="w2", task_id="t2", holder="d2", lease_seconds=0.1)
    store.cancel_campaign("t-1")
    time.sleep(0.3)
    assert store.requeue_lost(0.1, lambda: next(ids)) == []


def test_a_unit_handed_back_is_queued_for_the_next_delivery_without_an_attempt(
    store_url: str,
) -> None:
    store = make_store(store_url)
    key = seed_campaign(store)[2].key
    store.claim_for_queue([key], {key: "t1"})
    for round_ in range(3):  # stopped on request again and again: never "gave up"
        start = deliver(
            store,
            key,
            worker="w",
            task_id="t1",
            holder=f"d{round_}",
            lease_seconds=60,
            max_attempts=1,
        )
        assert start.run and start.attempts == 1
        assert not store.hand_back(key, "someone-else")  # only the lease holder may
        assert store.hand_back(key, f"d{round_}")
        unit = store.get_unit(key)
        assert (unit.state, unit.attempts, unit.lease_holder) == ("QUEUED", 0, None)
        assert unit.task_id == "t1"  # the same message comes back from its queue
        assert store.renew_lease(key, f"d{round_}", 60) == "lost"
    deliver(store, key, worker="w", task_id="t1", holder="last", lease_seconds=60)
    store.finish_unit(key, outcome())
    assert not store.hand_back(key, "last")  # a finished unit stays finished
    assert store.get_unit(key).state == "SUCCESS"


def _sent_at(store: Store, key: str) -> Any:  # noqa: ANN401
    with store.engine.connect() as conn:
        return conn.execute(text("SELECT sent_at FROM units WHERE key = :k"), {"k": key}).scalar()


@pytest.mark.parametrize("sent", ["before the start", "after the start"])
def test_a_unit_handed_back_is_not_taken_for_a_claim_never_sent(store_url: str, sent: str) -> None:
    """A worker may start a unit before its sender records the send. Handed back (its
    worker stopped) and not taken again within a lease period (no worker of its queue
    running), it is a sent message back on its queue, never a claim whose sender died:
    nothing sends it a second time."""
    store = make_store(store_url)
    key = seed_campaign(store)[2].key
    store.claim_for_queue([key], {key: "t1"})
    if sent == "before the start":
        store.mark_sent(["t1"])
    assert store.start_unit(key, worker="w", task_id="t1", holder="d1", lease_seconds=60).run
    if sent == "after the start":
        store.mark_sent(["t1"])
    assert _sent_at(store, key) is not None
    assert store.hand_back(key, "d1")
    unit = store.get_unit(key)
    assert (unit.state, unit.task_id) == ("QUEUED", "t1") and _sent_at(store, key) is not None
    time.sleep(0.2)
    assert store.requeue_lost(0.1, lambda: "t2") == []


def test_attempts_are_capped(store_url: str) -> None:
    store = make_store(store_url)
    key = seed_campaign(store)[2].key
    for attempt in (1, 2, 3):
        start = deliver(
            store,
            key,
            worker="w",
            task_id="t",
            holder=f"d{attempt}",
            lease_seconds=0,
            max_attempts=3,
        )
        assert start.run and start.attempts == attempt
    # (the same lease setting as the attempts': the last one's grace is over at once)
    fourth = deliver(
        store, key, worker="w", task_id="t", holder="d4", lease_seconds=0, max_attempts=3
    )
    assert not fourth.run and fourth.reason == "gave up" and fourth.state == "FAILED"
    unit = store.get_unit(key)
    assert unit.state == "FAILED" and unit.error.startswith("gave up after 3 attempts")


def test_the_last_attempt_s_holder_has_a_lease_period_to_come_back_before_it_is_failed(
    store_url: str,
) -> None:
    """A worker cut off from the database for a lease (its heartbeats failed) is alive,
    and a late renewal takes its lease back: a delivery that finds its last attempt's
    lease only just run out waits a lease period, instead of failing the unit under a
    run that may yet finish."""
    store = make_store(store_url)
    key = seed_campaign(store)[2].key
    first = deliver(store, key, worker="w1", task_id="t", holder="d1", lease_seconds=0.3,
                    max_attempts=1)  # fmt: skip
    assert first.run
    time.sleep(0.5)  # its lease has run out; the grace of a (30 s) lease has not
    other = store.start_unit(key, worker="w2", task_id="t", holder="d2", lease_seconds=30,
                             max_attempts=1)  # fmt: skip
    assert (other.run, other.reason, other.state) == (False, "grace", "RUNNING")
    assert 25 < other.retry_in < 30
    assert store.renew_lease(key, "d1", 30) == LEASE_HELD  # back in time: still its unit
    store.finish_unit(key, outcome(), holder="d1")
    assert store.get_unit(key).state == "SUCCESS"


def test_the_last_attempt_s_holder_gone_for_longer_than_its_grace_fails_the_unit(
    store_url: str,
) -> None:
    store = make_store(store_url)
    key = seed_campaign(store)[2].key
    deliver(store, key, worker="w1", task_id="t", holder="d1", lease_seconds=0.1, max_attempts=1)
    time.sleep(0.4)  # lease and grace (0.1 s each) both past
    other = store.start_unit(key, worker="w2", task_id="t", holder="d2", lease_seconds=0.1,
                             max_attempts=1)  # fmt: skip
    assert (other.run, other.reason, other.state) == (False, "gave up", "FAILED")
    assert store.renew_lease(key, "d1", 30) == LEASE_LOST


def test_resume_runs_again_the_succeeded_units_it_is_told_to_and_the_report(
    store_url: str,
) -> None:
    """A shard whose file is gone (``redo``): run again, its result dropped, and the
    report with it (it must blend anew); the other succeeded units are kept."""
    store = make_store(store_url)
    plans = seed_campaign(store)
    for plan in plans:
        deliver(store, plan.key, worker="w", task_id="t")
        store.finish_unit(plan.key, outcome())
    assert store.complete_campaign("t-1") == "DONE"
    shard = next(p.key for p in plans if p.family == "preprocess")
    report = next(p.key for p in plans if p.family == "report")
    assert store.resume_campaign("t-1", redo=[shard]) == [shard, report]
    states = {u.key: u.state for u in store.units("t-1")}
    assert states[shard] == states[report] == "PENDING"
    assert {k for k, v in states.items() if v == "SUCCESS"} == {p.key for p in plans} - {
        shard,
        report,
    }
    assert set(store.results("t-1")) == {p.key for p in plans} - {shard, report}
    assert store.get_campaign("t-1").state == "RUNNING"


def test_cancel_marks_unfinished_units_and_returns_task_ids(store_url: str) -> None:
    store = make_store(store_url)
    plans = seed_campaign(store)
    done, running, queued = plans[2].key, plans[3].key, plans[4].key
    deliver(store, done, worker="w", task_id="t0")
    store.finish_unit(done, outcome())
    store.claim_for_queue([running, queued], {running: "t1", queued: "t2"})
    deliver(store, running, worker="w", task_id="t1", holder="d1")
    cancelled = store.cancel_campaign("t-1")
    assert cancelled.state == "CANCELLED" and sorted(cancelled.task_ids) == ["t1", "t2"]
    assert cancelled.units == len(plans) - 1
    states = {u.key: u.state for u in store.units("t-1")}
    assert states[done] == "SUCCESS"
    assert {s for k, s in states.items() if k != done} == {"CANCELLED"}
    assert store.get_campaign("t-1").state == "CANCELLED"
    assert store.renew_lease(running, "d1", 30) == "cancelled"  # the running one stops
    with pytest.raises(UnitCancelledError):  # and what it still finishes is not recorded
        store.finish_unit(running, outcome())
    assert store.get_unit(running).state == "CANCELLED" and running not in store.results("t-1")
    late = deliver(store, queued, worker="w", task_id="t2", holder="d2")
    assert not late.run and late.state == "CANCELLED"
    again = store.cancel_campaign("t-1")
    assert again.already_finished and again.task_ids == []  # once
    # a cancel retried soon (the one before stopped between its commit and its revokes)
    # gets the ones to revoke again; after the window, none
    again = store.cancel_campaign("t-1", revoke_again_within=60)
    assert again.already_finished and sorted(again.task_ids) == ["t1", "t2"]
    time.sleep(0.3)
    assert store.cancel_campaign("t-1", revoke_again_within=0.2).task_ids == []


def test_resume_resets_what_did_not_succeed_and_the_report(store_url: str) -> None:
    store = make_store(store_url)
    plans = seed_campaign(store)
    ok, broken, alive, report = plans[2].key, plans[3].key, plans[4].key, plans[-1].key
    for key in (ok, report):
        deliver(store, key, worker="w", task_id=None)
        store.finish_unit(key, outcome())
    deliver(store, broken, worker="w", task_id=None)
    store.fail_unit(broken, "boom")
    deliver(store, alive, worker="w", task_id=None, holder="d", lease_seconds=60)
    reset = store.resume_campaign("t-1")
    assert ok not in reset and alive not in reset  # done, or running with a live lease
    assert broken in reset and report in reset  # the report must blend the new results
    units = {u.key: u for u in store.units("t-1")}
    assert units[broken].state == "PENDING" and units[broken].attempts == 0
    assert units[broken].error is None
    assert units[report].state == "PENDING" and report not in store.results("t-1")
    assert units[ok].state == "SUCCESS" and units[alive].state == "RUNNING"
    assert store.get_campaign("t-1").state == "RUNNING"


def test_a_stale_message_for_a_pending_unit_runs_nothing(store_url: str) -> None:
    """Every message is sent after its unit's claim: one that finds the unit PENDING
    was sent before `orchard resume` reset it (or by a send that failed)."""
    store = make_store(store_url)
    key = seed_campaign(store)[2].key
    stale = store.start_unit(key, worker="w", task_id="old", holder="d1")
    assert (stale.run, stale.state, stale.reason) == (False, "PENDING", "not queued")
    unit = store.get_unit(key)
    assert (unit.state, unit.attempts, unit.lease_holder) == ("PENDING", 0, None)
    assert deliver(store, key, worker="w", task_id="new", holder="d2").run  # once claimed


@pytest.mark.parametrize("campaign_state", ["CANCELLED", "DELETING"])
def test_a_message_of_a_campaign_cancelled_or_being_deleted_runs_nothing(
    store_url: str, campaign_state: str
) -> None:
    """A unit still QUEUED under a campaign that a cancel (or a delete) has just marked:
    its delivery runs nothing, and the unit ends CANCELLED rather than RUNNING."""
    store = make_store(store_url)
    key = seed_campaign(store)[0].key
    store.claim_for_queue([key])
    with store.engine.begin() as conn:
        conn.execute(
            update(CampaignRow).where(CampaignRow.id == "t-1").values(state=campaign_state)
        )
    start = store.start_unit(key, worker="w", task_id="t", holder="d1")
    assert (start.run, start.state, start.reason) == (False, "CANCELLED", "cancelled")
    unit = store.get_unit(key)
    assert (unit.state, unit.attempts, unit.lease_holder) == ("CANCELLED", 0, None)


def test_resume_takes_a_running_report_away_and_its_result_is_not_recorded(
    store_url: str,
) -> None:
    store = make_store(store_url)
    plans = seed_campaign(store)
    broken, report = plans[3].key, plans[-1].key
    deliver(store, broken, worker="w", task_id=None)
    store.fail_unit(broken, "boom")
    assert deliver(store, report, worker="w", task_id="r1", holder="d1", lease_seconds=60).run
    reset = store.resume_campaign("t-1")
    assert broken in reset and report in reset  # live lease or not: it must wait for broken
    assert store.renew_lease(report, "d1", 60) == "lost"
    with pytest.raises(LeaseLostError):  # what it still finishes is not recorded
        store.finish_unit(report, outcome(), holder="d1")
    assert store.get_unit(report).state == "PENDING" and report not in store.results("t-1")
    # its message, retried, finds the unit PENDING: nothing runs before `broken` again
    assert store.start_unit(report, worker="w", task_id="r1", holder="d2").reason == "not queued"


def test_a_result_is_recorded_only_by_the_delivery_holding_the_lease(store_url: str) -> None:
    store = make_store(store_url)
    key = seed_campaign(store)[2].key
    assert deliver(store, key, worker="w", task_id="t", holder="d1", lease_seconds=0.1).run
    time.sleep(0.3)
    assert deliver(store, key, worker="w2", task_id="t", holder="d2", lease_seconds=30).run
    with pytest.raises(LeaseLostError):
        store.finish_unit(key, outcome(0.1), holder="d1")
    assert store.finish_unit(key, outcome(0.2), holder="d2")
    assert not store.finish_unit(key, outcome(0.3), holder="d1")  # done: first write won
    assert store.results("t-1")[key].val_acc == 0.2


def test_a_claim_never_marked_sent_is_requeued_once_its_grace_is_over(store_url: str) -> None:
    store = make_store(store_url)
    units = seed_campaign(store)
    sent, unsent = units[0].key, units[1].key
    store.claim_for_queue([sent, unsent], {sent: "t1", unsent: "t2"})
    store.mark_sent(["t1"])
    ids = iter(["new-1", "new-2"])
    assert store.requeue_lost(5.0, lambda: next(ids)) == []  # a sender may still be at it
    time.sleep(0.3)
    lost = store.requeue_lost(0.1, lambda: next(ids))
    assert [(u.key, u.task_id, u.lost_in) for u in lost] == [(unsent, "new-1", "QUEUED")]
    assert store.get_unit(unsent).task_id == "new-1"
    time.sleep(0.3)
    assert [u.key for u in store.requeue_lost(0.1, lambda: next(ids))] == [unsent]  # unmarked
    store.mark_sent(["new-2"])
    time.sleep(0.3)
    assert store.requeue_lost(0.1, lambda: next(ids)) == []
    store.mark_sent(["t2"])  # a mark for an earlier task id changes nothing
    assert store.get_unit(unsent).task_id == "new-2"


def test_stalled_campaigns_are_the_running_ones_nothing_moves(store_url: str) -> None:
    store = make_store(store_url)
    units = seed_campaign(store)
    first = [u.key for u in units if u.stage == units[0].stage]
    assert store.stalled_campaigns(5.0) == []  # just created
    time.sleep(0.3)
    assert store.stalled_campaigns(0.1) == ["t-1"]  # nothing sent its first stage
    store.claim_for_queue(first)
    time.sleep(0.3)
    assert store.stalled_campaigns(0.1) == []  # queued, however long ago
    for key in first:
        deliver(store, key, worker="w", task_id=None)
        store.finish_unit(key, outcome())
    # a unit finished within the window (a long one: a loaded machine may take a while
    # between the commit and the query); the campaign itself older than the window, so
    # that only the finish keeps it from stalled
    with store.engine.begin() as conn:
        conn.execute(
            update(CampaignRow)
            .where(CampaignRow.id == "t-1")
            .values(created_at=utcnow() - timedelta(hours=1))
        )
    assert store.stalled_campaigns(60.0) == []
    time.sleep(0.3)
    assert store.stalled_campaigns(0.1) == ["t-1"]  # and no one opened the next stage
    store.cancel_campaign("t-1")
    assert store.stalled_campaigns(0.1) == []


def test_predictions_of_a_large_split_fit_postgres_parameter_limit(store_url: str) -> None:
    """PostgreSQL takes at most 65,535 parameters per statement, six per prediction."""
    store = make_store(store_url)
    key = seed_campaign(store)[2].key
    deliver(store, key, worker="w", task_id=None)
    many = [Prediction(f"{i:05d}.jpg", i % 3, (i + 1) % 3, [0.2, 0.3, 0.5]) for i in range(12_000)]
    assert store.finish_unit(key, replace(outcome(), predictions={"test": many}))
    assert len(store.predictions(key, "test")) == 12_000


def test_completing_waits_for_a_resume_that_reopens_the_campaign(postgres_url: str) -> None:
    """A late `advance` that saw every unit terminal must not close a campaign that
    `orchard resume` reopened meanwhile (READ COMMITTED re-checks only the UPDATE)."""
    store = make_store(postgres_url)
    plans = seed_campaign(store)
    for plan in plans:
        deliver(store, plan.key, worker="w", task_id=None)
        store.fail_unit(plan.key, "boom")
    with store.engine.connect() as resumer:  # a resume, caught between its two writes
        resumer.execute(text("BEGIN"))
        resumer.execute(text("SELECT state FROM campaigns WHERE id = 't-1' FOR UPDATE"))
        resumer.execute(text("UPDATE units SET state = 'PENDING' WHERE campaign_id = 't-1'"))
        result: list[str | None] = []
        completer = threading.Thread(target=lambda: result.append(store.complete_campaign("t-1")))
        completer.start()
        wait_for_a_lock_wait(store, completer)  # the completer waits: the race is on
        resumer.execute(text("COMMIT"))
    completer.join(10)
    assert result == [None]
    assert store.get_campaign("t-1").state == "RUNNING"


def test_reuse_copies_identical_finished_units(store_url: str) -> None:
    store = make_store(store_url)
    plans = seed_campaign(store)
    store.record_artifact(Artifact("campaigns/t-1/manifest.json", "manifest", "a" * 64, 1, "t-1"))
    svm = [p for p in plans if p.family == "svm"]
    deliver(store, svm[0].key, worker="cpu@h", task_id=None)
    store.finish_unit(svm[0].key, outcome(0.7))
    store.record_metrics(svm[0].key, 0, {"val_acc": 0.7})
    # a second campaign over the same manifest bytes, and a third over other data
    seed_campaign(store, "t-2")
    store.record_artifact(Artifact("campaigns/t-2/manifest.json", "manifest", "a" * 64, 1, "t-2"))
    seed_campaign(store, "t-3")
    store.record_artifact(Artifact("campaigns/t-3/manifest.json", "manifest", "b" * 64, 1, "t-3"))
    new_key = svm[0].key.replace("t-1/", "t-2/", 1)
    statements: list[str] = []
    event.listen(
        store.engine,
        "before_cursor_execute",
        lambda conn, cursor, statement, *rest: statements.append(statement),
    )
    assert store.reuse_finished("t-2") == {new_key: svm[0].key}
    # the copies are stamped with the store's time: on PostgreSQL, the server's
    server_clock = store.engine.dialect.name == "postgresql"
    assert any("clock_timestamp" in statement for statement in statements) == server_clock
    statements.clear()
    assert store.reuse_finished("t-3") == {}
    assert statements and not any("clock_timestamp" in statement for statement in statements)
    unit = store.get_unit(new_key)
    assert unit.state == "SUCCESS" and unit.attempts == 0
    result = store.results("t-2")[new_key]
    assert result.val_acc == 0.7 and result.extra["reused_from"] == svm[0].key
    assert len(store.predictions(new_key, "val")) == 2
    assert store.metrics(new_key) == {"val_acc": [(0, 0.7)]}
    assert store.get_unit(svm[1].key.replace("t-1/", "t-2/", 1)).state == "PENDING"
    # t-3's manifest is the same data as t-1's written in an earlier format
    reused = store.reuse_finished("t-3", equivalent_manifests=["a" * 64])
    third = svm[0].key.replace("t-1/", "t-3/", 1)
    # copied from the newest copy, t-2's; both name the unit that ran, whose model
    # files they read
    assert reused == {third: svm[0].key}
    assert store.results("t-3")[third].extra["reused_from"] == svm[0].key
    assert store.get_unit(third).worker == "cpu@h"


def test_reuse_copies_only_from_a_twin_whose_files_are_there(store_url: str) -> None:
    """A store restored from a backup newer than the artifact folder records campaigns
    whose files are gone: a reuse takes the newest twin whose model files and manifest
    are there, and copies nothing when none's are."""
    store = make_store(store_url)
    svm_key = None
    for cid in ("t-1", "t-2"):  # t-1 ran first, t-2 later (the newest)
        plans = seed_campaign(store, cid)
        store.record_artifact(
            Artifact(f"campaigns/{cid}/manifest.json", "manifest", "a" * 64, 10, cid)
        )
        unit = next(p for p in plans if p.family == "svm")
        deliver(store, unit.key, worker="cpu@h", task_id=None)
        model = Artifact(f"campaigns/{cid}/models/svm.joblib", "model", "c" * 64, 99, cid, unit.key)
        store.finish_unit(unit.key, replace(outcome(0.7), artifacts=[model]))
        svm_key = unit.key.split("/", 1)[1]
    seed_campaign(store, "t-3")
    store.record_artifact(Artifact("campaigns/t-3/manifest.json", "manifest", "a" * 64, 10, "t-3"))
    asked: list[str] = []

    def present_but(*gone: str):  # noqa: ANN202
        def present(path: str, size: int) -> bool:
            asked.append(path)
            return path.split("/")[1] not in gone and size in (10, 99)

        return present

    new_key = f"t-3/{svm_key}"
    # t-2's folder is gone (a restore): t-1's copy is taken
    assert store.reuse_finished("t-3", present=present_but("t-2")) == {new_key: f"t-1/{svm_key}"}
    assert store.results("t-3")[new_key].extra["reused_from"] == f"t-1/{svm_key}"
    assert len(asked) == len(set(asked))  # each file looked at once
    # a fourth: t-3's copy names t-1's unit, whose files it reads; with t-1's gone too,
    # nothing is copied, from t-3's copy either
    seed_campaign(store, "t-4")
    store.record_artifact(Artifact("campaigns/t-4/manifest.json", "manifest", "a" * 64, 10, "t-4"))
    assert store.reuse_finished("t-4", present=present_but("t-1", "t-2")) == {}
    assert store.get_unit(f"t-4/{svm_key}").state == "PENDING"
    # a file of another size than recorded is no file of the unit's either
    assert store.reuse_finished("t-4", present=lambda path, size: size == 10) == {}
    assert store.reuse_finished("t-4", present=lambda path, size: True) == {
        f"t-4/{svm_key}": f"t-1/{svm_key}"
    }


def test_reuse_finds_the_same_data_mounted_at_another_root(store_url: str) -> None:
    """Manifests that differ only in where the dataset lies (other bytes, one data
    digest) are twins; campaigns without a data digest are not each other's."""
    store = make_store(store_url)
    plans = seed_campaign(store, data_digest="d" * 64)
    store.record_artifact(Artifact("campaigns/t-1/manifest.json", "manifest", "a" * 64, 1, "t-1"))
    svm = next(p for p in plans if p.family == "svm")
    deliver(store, svm.key, worker="cpu@h", task_id=None)
    store.finish_unit(svm.key, outcome(0.7))
    seed_campaign(store, "t-2", data_digest="d" * 64)
    store.record_artifact(Artifact("campaigns/t-2/manifest.json", "manifest", "b" * 64, 1, "t-2"))
    seed_campaign(store, "t-3", data_digest="e" * 64)
    store.record_artifact(Artifact("campaigns/t-3/manifest.json", "manifest", "c" * 64, 1, "t-3"))
    assert store.reuse_finished("t-2") == {svm.key.replace("t-1/", "t-2/", 1): svm.key}
    assert store.reuse_finished("t-3") == {}
    # before 0007 (or a manifest without its images' sha256): no digest, no twin by it
    plans = seed_campaign(store, "u-1")
    store.record_artifact(Artifact("campaigns/u-1/manifest.json", "manifest", "f" * 64, 1, "u-1"))
    svm = next(p for p in plans if p.family == "svm")
    deliver(store, svm.key, worker="cpu@h", task_id=None)
    store.finish_unit(svm.key, outcome(0.7))
    seed_campaign(store, "u-2")
    store.record_artifact(Artifact("campaigns/u-2/manifest.json", "manifest", "9" * 64, 1, "u-2"))
    assert store.reuse_finished("u-2") == {}


def test_reuse_copies_nothing_from_a_campaign_of_another_format(store_url: str) -> None:
    """A campaign format raised means a unit computes otherwise now: an identical unit
    of a campaign of another format is not this one's result, unless the formats'
    units compute alike."""
    store = make_store(store_url)
    svm = next(p for p in seed_campaign(store) if p.family == "svm")
    store.record_artifact(Artifact("campaigns/t-1/manifest.json", "manifest", "a" * 64, 1, "t-1"))
    deliver(store, svm.key, worker="cpu@h", task_id=None)
    store.finish_unit(svm.key, outcome(0.7))
    seed_campaign(store, "t-2")
    store.record_artifact(Artifact("campaigns/t-2/manifest.json", "manifest", "a" * 64, 1, "t-2"))

    def t1_of_format(version: int) -> None:
        with store.engine.begin() as conn:
            conn.execute(
                text("UPDATE campaigns SET format_version = :v WHERE id = 't-1'"), {"v": version}
            )

    t1_of_format(store.get_campaign("t-2").format_version + 1)
    assert store.reuse_finished("t-2") == {}
    # format 2 only added what the report reads ([report] published): its units compute
    # as format 1's, whose finished units are still twins
    assert store.get_campaign("t-2").format_version == 2
    t1_of_format(1)
    assert store.reuse_finished("t-2") == {svm.key.replace("t-1/", "t-2/", 1): svm.key}


def test_reuse_copies_an_svm_point_only_from_a_grid_of_the_same_largest_width(
    store_url: str,
) -> None:
    """Each fold's PCA is fitted once with the grid's largest n_components, and every
    point slices it; a randomized fit's first components depend on how many it finds,
    so the same point in a grid reaching further has other numbers (a helper measured
    0.8254533894 against 0.8254537620)."""
    from shared.plan import largest_n_components

    store = make_store(store_url)
    svm = next(p for p in seed_campaign(store) if p.family == "svm")
    store.record_artifact(Artifact("campaigns/t-1/manifest.json", "manifest", "a" * 64, 1, "t-1"))
    deliver(store, svm.key, worker="cpu@h", task_id=None)
    store.finish_unit(svm.key, outcome(0.7))
    campaign = parse_campaign(CAMPAIGN, source="test")
    spec = campaign.model_dump(mode="json")
    wider = {**spec, "svm": {**spec["svm"], "n_components": [*spec["svm"]["n_components"], 900]}}
    assert largest_n_components(wider) > largest_n_components(spec)
    for cid, its_spec in (("t-2", wider), ("t-3", spec)):
        units = plan_units(cid, campaign, [(0, 10), (10, 20)])
        bare_campaign(store, cid, units, spec=its_spec, classes=["A", "B", "C"])
        manifest = Artifact(f"campaigns/{cid}/manifest.json", "manifest", "a" * 64, 1, cid)
        store.record_artifact(manifest)
    assert store.reuse_finished("t-2") == {}
    assert store.reuse_finished("t-3") == {svm.key.replace("t-1/", "t-3/", 1): svm.key}


def test_task_ids_recorded_with_the_claim_and_unclaim(store_url: str) -> None:
    store = make_store(store_url)
    key = seed_campaign(store)[0].key
    assert store.claim_for_queue([key], {key: "abc"}) == [key]
    assert store.get_unit(key).task_id == "abc"
    store.unclaim([key])
    assert store.get_unit(key).state == "PENDING"
    assert store.claim_for_queue([key]) == [key]


# ---------------------------------------------------------------- database briefly away


def test_store_rides_out_a_database_that_comes_back(postgres_url: str) -> None:
    make_store(postgres_url).dispose()
    proxy = TcpProxy()
    url = postgres_url.replace("postgres@127.0.0.1:5432", f"postgres:s3cret@127.0.0.1:{proxy.port}")
    store = Store(url, retry_seconds=10)
    timer = threading.Timer(0.3, proxy.up)  # refused for a while, then up
    timer.start()
    try:
        assert store.list_campaigns() == []  # retried with backoff until it answered
        proxy.down()  # and once more, cutting the pooled connection this time
        threading.Timer(0.3, proxy.up).start()
        assert store.list_campaigns() == []
    finally:
        timer.cancel()
        store.dispose()
        proxy.down()


def test_store_that_stays_away_fails_within_its_budget_naming_the_masked_url(
    postgres_url: str,
) -> None:
    proxy = TcpProxy()  # never comes up
    url = postgres_url.replace("postgres@127.0.0.1:5432", f"postgres:s3cret@127.0.0.1:{proxy.port}")
    store = Store(url, retry_seconds=0.5)
    with pytest.raises(StoreError) as err:
        store.list_campaigns()
    message = str(err.value)
    assert "s3cret" not in message and "postgres:***@127.0.0.1" in message
    assert "gave up after 0.5 s of retries" in message and "\n" not in message


def test_integrity_errors_are_not_retried(sqlite_url: str) -> None:
    store = make_store(sqlite_url)
    units = seed_campaign(store)
    store.retry_seconds = 30
    with pytest.raises(IntegrityError):  # at once: not a StoreError after 30 s of retries
        store.create_campaign(
            "t-2", name="t", source="t.toml", digest="d", spec={}, classes=["A"],
            units=[units[0], units[0]],  # one unit key twice
        )  # fmt: skip


def insert_old_campaign(conn: Any) -> None:
    """Campaign t-1 as an older schema holds it, written with plain SQL."""
    conn.execute(
        text(
            "INSERT INTO campaigns (id, name, source, digest, spec, classes, state, "
            "created_at) VALUES ('t-1', 't', 'x.toml', 'd', '{}', '[]', 'RUNNING', "
            "'2026-01-01 00:00:00')"
        )
    )


def store_at(store_url: str, revision: str) -> Store:
    """A store at schema ``revision`` holding campaign t-1, as that schema holds it."""
    store = Store(store_url)
    migrate.upgrade(store.engine, revision)
    with store.engine.begin() as conn:
        insert_old_campaign(conn)
    return store


def insert_old_queued_unit(conn: Any, **columns: str) -> None:
    """Unit t-1/svm/h/f0 of campaign t-1, QUEUED, as an older schema holds it; ``columns``
    that schema had too (``task_id`` from 0003)."""
    row = {
        "key": "t-1/svm/h/f0",
        "campaign_id": "t-1",
        "family": "svm",
        "stage": 1,
        "params_hash": "h",
        "task": "orchard.fit_svm",
        "queue": "cpu",
        "position": 0,
        "state": "QUEUED",
        "attempts": 0,
        "queued_at": "2026-01-01 00:00:00",
        **columns,
    }
    names = ", ".join(row)
    conn.execute(text(f"INSERT INTO units ({names}) VALUES (:{', :'.join(row)})"), row)


def test_upgrade_from_0001_keeps_the_rows_and_adds_leases(store_url: str) -> None:
    store = Store(store_url)
    migrate.upgrade(store.engine, "0001")
    assert "lease_holder" not in {c["name"] for c in inspect(store.engine).get_columns("units")}
    with store.engine.begin() as conn:  # an old database with a campaign in it
        insert_old_campaign(conn)
        conn.execute(
            text(
                "INSERT INTO units (key, campaign_id, family, stage, params_hash, task, queue, "
                "position, state, attempts) VALUES ('t-1/report', 't-1', 'report', 2, 'h', "
                "'orchard.report', 'report', 0, 'PENDING', 0)"
            )
        )
    assert store.upgrade() == ("0001", migrate.head_revision())
    assert {"lease_holder", "lease_expires_at"} <= {
        c["name"] for c in inspect(store.engine).get_columns("units")
    }
    units = store.units("t-1")
    assert units and all(u.lease_holder is None for u in units)
    assert deliver(store, units[0].key, worker="w", task_id="t", holder="d").run


def test_upgrade_to_0003_counts_units_queued_before_it_as_sent(store_url: str) -> None:
    """Units queued by an older orchard were sent with their claim: the workers must
    not send them again as claims left unsent."""
    store = store_at(store_url, "0002")
    with store.engine.begin() as conn:
        insert_old_queued_unit(conn)
    assert store.upgrade() == ("0002", migrate.head_revision())
    assert store.requeue_lost(1.0, lambda: "new") == []
    assert store.get_unit("t-1/svm/h/f0").task_id is None


def test_upgrade_to_0004_indexes_the_lookups_across_campaigns_and_keeps_the_rows(
    store_url: str,
) -> None:
    store = store_at(store_url, "0003")
    with store.engine.begin() as conn:
        insert_old_queued_unit(conn, task_id="task-1")
        conn.execute(
            text(
                "INSERT INTO artifacts (path, kind, campaign_id, sha256, size, created_at) "
                "VALUES ('campaigns/t-1/manifest.json', 'manifest', 't-1', 'a', 1, "
                "'2026-01-01 00:00:00')"
            )
        )
    assert store.upgrade() == ("0003", migrate.head_revision())
    inspector = inspect(store.engine)
    assert {i["name"]: i["column_names"] for i in inspector.get_indexes("units")}.items() >= {
        "ix_units_task_id": ["task_id"],
        "ix_units_queue_state": ["queue", "state"],
        "ix_units_queue_started_at": ["queue", "started_at"],
        "ix_units_queue_finished_at": ["queue", "finished_at"],
    }.items()
    assert {i["name"]: i["column_names"] for i in inspector.get_indexes("artifacts")}.items() >= {
        "ix_artifacts_campaign_kind": ["campaign_id", "kind"],
        "ix_artifacts_kind_sha256": ["kind", "sha256"],
    }.items()
    store.mark_sent(["task-1"])
    assert store.requeue_lost(1.0, lambda: "new") == []  # marked sent: not lost
    assert store.artifacts("t-1", kind="manifest")[0].path == "campaigns/t-1/manifest.json"
    migrate.downgrade(store.engine, "0003")
    assert "ix_units_task_id" not in {i["name"] for i in inspect(store.engine).get_indexes("units")}
    assert store.upgrade() == ("0003", migrate.head_revision())


def test_upgrade_to_0007_adds_the_data_digest_and_keeps_the_campaigns(store_url: str) -> None:
    store = store_at(store_url, "0006")
    assert store.upgrade() == ("0006", migrate.head_revision())
    indexes = inspect(store.engine).get_indexes("campaigns")
    assert {"ix_campaigns_data_digest": ["data_digest"]}.items() <= {
        i["name"]: i["column_names"] for i in indexes
    }.items()
    assert store.get_campaign("t-1").name == "t"
    with store.engine.connect() as conn:
        assert conn.scalar(text("SELECT data_digest FROM campaigns")) is None
    migrate.downgrade(store.engine, "0006")
    assert "data_digest" not in {c["name"] for c in inspect(store.engine).get_columns("campaigns")}
    assert store.upgrade() == ("0006", migrate.head_revision())
    assert store.get_campaign("t-1").name == "t"


def test_upgrade_to_0008_makes_the_campaigns_format_1(store_url: str) -> None:
    """Campaigns submitted before 0008 were submitted by orchards of format 1."""
    store = store_at(store_url, "0007")
    assert store.upgrade() == ("0007", migrate.head_revision())
    assert store.get_campaign("t-1").format_version == 1
    migrate.downgrade(store.engine, "0007")
    columns = {c["name"] for c in inspect(store.engine).get_columns("campaigns")}
    assert "format_version" not in columns
    assert store.upgrade() == ("0007", migrate.head_revision())
    assert store.get_campaign("t-1").format_version == 1


PARAMS = {
    "max_features": 1.0,  # all features; 1 would be one
    "min_samples_split": 2,
    "C": 1.5,
    "gamma": 1e-6,
    "max_depth": None,
    "kernel": "rbf",
    "whiten": True,
    "sizes": [1.0, 2],
}


def test_a_unit_s_parameters_read_back_as_written(store_url: str) -> None:
    """Every value keeps its JSON type: SQLite gave a column declared JSON numeric
    affinity, which stored ``1.0`` as the integer 1 (for scikit-learn, one feature
    instead of all)."""
    store = make_store(store_url)
    store.create_campaign(
        "p-1", name="p", source="p.toml", digest="d", spec={}, classes=["A"],
        units=[UnitPlan("p-1/rf/h/f0", "rf", 1, 0, PARAMS, "h")],
    )  # fmt: skip
    store.claim_for_queue(["p-1/rf/h/f0"])
    read = store.get_unit("p-1/rf/h/f0").params
    started = deliver(store, "p-1/rf/h/f0", worker="w", task_id="t", holder="d").unit.params
    for params in (read, started, store.units("p-1")[0].params):
        assert params == PARAMS
        assert {k: repr(v) for k, v in params.items()} == {k: repr(v) for k, v in PARAMS.items()}


def test_upgrade_to_0006_keeps_the_parameters_stored_before_it(store_url: str) -> None:
    store = store_at(store_url, "0005")
    with store.engine.begin() as conn:
        insert_old_queued_unit(conn)
        unit_id = conn.scalar(text("SELECT id FROM units WHERE key = 't-1/svm/h/f0'"))
        for name, value in (("C", "2.5"), ("n", "3"), ("kernel", '"rbf"'), ("d", "null")):
            conn.execute(
                text("INSERT INTO unit_params (unit_id, name, value) VALUES (:u, :n, :v)"),
                {"u": unit_id, "n": name, "v": value},
            )
    assert store.upgrade() == ("0005", migrate.head_revision())
    assert store.get_unit("t-1/svm/h/f0").params == {"C": 2.5, "n": 3, "kernel": "rbf", "d": None}
    migrate.downgrade(store.engine, "0005")
    assert store.upgrade() == ("0005", migrate.head_revision())
    assert store.get_unit("t-1/svm/h/f0").params == {"C": 2.5, "n": 3, "kernel": "rbf", "d": None}


def test_times_come_back_in_utc_whatever_the_server_s_time_zone(postgres_url: str) -> None:
    """PostgreSQL hands timestamps back in the session's time zone, the server's unless
    set: on a server in New York `orchard status` printed local times as UTC, and a
    deleted campaign's message was five hours off. SQLite's naive ones are UTC too."""
    from datetime import UTC

    from sqlalchemy import create_engine

    name = postgres_url.rsplit("/", 1)[1]
    with create_engine(postgres_url, isolation_level="AUTOCOMMIT").connect() as conn:
        conn.execute(text(f"ALTER DATABASE \"{name}\" SET timezone = 'America/New_York'"))
    store = make_store(postgres_url)
    with store.engine.connect() as conn:
        assert conn.scalar(text("SHOW TimeZone")) == "America/New_York"
    plans = seed_campaign(store)
    deliver(store, plans[0].key, worker="w", task_id="t", holder="d")
    store.finish_unit(plans[0].key, outcome(), holder="d")
    campaign, unit = store.get_campaign("t-1"), store.get_unit(plans[0].key)
    for moment in (campaign.created_at, unit.started_at, unit.finished_at, unit.heartbeat_at):
        assert moment is not None and moment.tzinfo is not None
        assert moment.utcoffset() == timedelta(0) and abs(utcnow() - moment) < timedelta(minutes=1)
    store.cancel_campaign("t-1")
    store.delete_campaign("t-1", quiet_seconds=0)
    when = store.deleted_at("t-1")
    assert when is not None and when.utcoffset() == timedelta(0)
    with pytest.raises(CampaignDeletedError) as deleted:
        store.get_campaign("t-1")
    assert f"at {datetime.now(UTC):%Y-%m-%d %H}" in str(deleted.value)


def _server_clock_at(postgres_url: str, moment: str) -> None:
    """The database's ``clock_timestamp()`` from now on starts at ``moment`` (and runs
    on), in a session time zone with summer time: a function of that name ahead of
    pg_catalog's on the database's search path, which the store's unqualified calls
    find."""
    from sqlalchemy import create_engine

    name = postgres_url.rsplit("/", 1)[1]
    with create_engine(postgres_url, isolation_level="AUTOCOMMIT").connect() as conn:
        conn.execute(text("CREATE SCHEMA fake"))
        conn.execute(
            text(
                # in seconds: an interval of days would be added in local days
                "CREATE TABLE fake.skew AS SELECT extract(epoch FROM timestamptz "
                f"'{moment}' - pg_catalog.clock_timestamp()) * interval '1 second' AS by"
            )
        )
        conn.execute(
            text(
                "CREATE FUNCTION fake.clock_timestamp() RETURNS timestamptz LANGUAGE sql AS "
                "$$ SELECT pg_catalog.clock_timestamp() + (SELECT by FROM fake.skew) $$"
            )
        )
        conn.execute(text(f'ALTER DATABASE "{name}" SET search_path = fake, pg_catalog, public'))
        conn.execute(text(f"ALTER DATABASE \"{name}\" SET timezone = 'America/New_York'"))


@pytest.mark.parametrize(
    "moment",
    [
        "2026-11-01 06:30:00+00",  # 01:30 EST, the hour New York lives twice
        "2026-11-01 05:59:40+00",  # the last minute of EDT: a lease ends after it
        "2026-03-08 07:00:20+00",  # 03:00:20 EDT, just after the hour that never was
    ],
)
def test_leases_keep_their_length_across_a_summer_time_change(
    postgres_url: str, moment: str
) -> None:
    """The server's clock read in a session time zone with summer time: lease
    arithmetic on that local time was off by the hour the clocks changed. A 60 s lease
    in New York's repeated hour ran out an hour before it began (a second delivery ran
    beside the live one, and status called its worker gone), one taken in EDT's last
    minute lasted an hour, and just after spring forward the reaper took every live
    lease."""
    store = make_store(postgres_url)
    _server_clock_at(postgres_url, moment)
    store.engine.dispose()  # new sessions: the fake clock, New York's time
    units = seed_campaign(store)
    live = units[2].key
    assert deliver(store, live, worker="w", task_id="t", holder="d1", lease_seconds=60).run
    now = store.now()
    assert now.utcoffset() == timedelta(0)
    assert abs(now - datetime.fromisoformat(moment)) < timedelta(minutes=1)
    left = store.get_unit(live).lease_expires_at - now
    assert timedelta(seconds=55) < left <= timedelta(seconds=60), left
    second = deliver(store, live, worker="w2", task_id="t", holder="d2", lease_seconds=60)
    assert not second.run and second.reason == "leased" and 55 < second.retry_in <= 60
    assert store.requeue_lost(60, lambda: "t2") == []
    assert store.renew_lease(live, "d1", 60) == "held"
    assert live not in store.resume_campaign("t-1")


def test_campaign_and_unit_times_are_aware_on_sqlite_too(sqlite_url: str) -> None:
    """A caller may subtract them from ``datetime.now(UTC)`` on either database."""
    store = make_store(sqlite_url)
    plans = seed_campaign(store)
    deliver(store, plans[0].key, worker="w", task_id="t", holder="d")
    store.fail_unit(plans[0].key, "boom")
    campaign, unit = store.get_campaign("t-1"), store.get_unit(plans[0].key)
    for moment in (campaign.created_at, unit.started_at, unit.finished_at):
        assert moment is not None and utcnow() - moment < timedelta(minutes=1)


def test_upgrade_to_0006_mends_the_floats_sqlite_made_integers(sqlite_url: str) -> None:
    """A campaign submitted before 0006: SQLite stored ``max_features = 1.0`` as 1. The
    unit's params hash was taken of what was submitted, so the floats come back; a
    unit whose integers were integers, or whose hash no choice matches, is left alone."""
    import hashlib
    import json

    def digest(params: dict) -> str:
        blob = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    store = Store(sqlite_url)
    migrate.upgrade(store.engine, "0005")
    submitted = {
        "max_features": 1.0,
        "n_estimators": 100,
        "min_samples_leaf": 2.0,
        "C": 0.31622776601683794,  # 17 digits: SQLite's own text of it has 15
    }
    cases = {
        "t-1/rf/a/f0": (submitted, digest({"family": "rf", **submitted})),
        "t-1/rf/b/f0": ({"n_estimators": 100}, digest({"family": "rf", "n_estimators": 100})),
        "t-1/rf/c/f0": ({"max_features": 1.0}, "not-its-hash"),
    }
    with store.engine.begin() as conn:
        insert_old_campaign(conn)
        for position, (key, (params, phash)) in enumerate(cases.items()):
            conn.execute(
                text(
                    "INSERT INTO units (key, campaign_id, family, stage, params_hash, task, "
                    "queue, position, state, attempts) VALUES (:k, 't-1', 'rf', 1, :h, "
                    "'orchard.fit_rf', 'cpu', :p, 'PENDING', 0)"
                ),
                {"k": key, "h": phash, "p": position},
            )
            uid = conn.scalar(text("SELECT id FROM units WHERE key = :k"), {"k": key})
            for name, value in params.items():
                conn.execute(
                    text("INSERT INTO unit_params (unit_id, name, value) VALUES (:u, :n, :v)"),
                    {"u": uid, "n": name, "v": json.dumps(value)},
                )
        # what SQLite made of them: the integers this revision mends
        assert conn.scalar(text("SELECT typeof(value) FROM unit_params LIMIT 1")) == "integer"
    store.upgrade()
    read = {key: store.get_unit(key).params for key in cases}
    assert {k: repr(v) for k, v in read["t-1/rf/a/f0"].items()} == {
        "max_features": "1.0", "n_estimators": "100", "min_samples_leaf": "2.0",
        "C": "0.31622776601683794",
    }  # fmt: skip
    assert repr(read["t-1/rf/b/f0"]["n_estimators"]) == "100"
    assert repr(read["t-1/rf/c/f0"]["max_features"]) == "1"  # nothing tells: left as it is


def test_finishing_releases_the_lease_and_stamps_the_time(store_url: str) -> None:
    store = make_store(store_url)
    key = seed_campaign(store)[2].key
    assert deliver(store, key, worker="w", task_id="a", holder="h", lease_seconds=60).run
    assert store.get_unit(key).lease_holder == "h"
    assert store.finish_unit(key, outcome()) is True
    unit = store.get_unit(key)
    assert unit.state == "SUCCESS" and unit.error is None
    assert unit.lease_holder is None and unit.lease_expires_at is None
    assert unit.finished_at is not None and unit.finished_at >= unit.started_at


def test_a_stage_may_open_only_once_the_stages_before_it_are_terminal(store_url: str) -> None:
    store = make_store(store_url)
    plans = seed_campaign(store)
    assert store.stage_may_open("t-1")  # the first stage, all PENDING
    first = [p.key for p in plans if p.stage == 0]
    store.claim_for_queue(first)
    assert not store.stage_may_open("t-1")  # every shard QUEUED, the models wait
    for key in first[:-1]:
        deliver(store, key, worker="w", task_id=None)
        store.finish_unit(key, outcome())
        assert not store.stage_may_open("t-1")
    deliver(store, first[-1], worker="w", task_id=None)
    assert not store.stage_may_open("t-1")  # the last shard RUNNING
    store.fail_unit(first[-1], "boom")
    assert store.stage_may_open("t-1")  # terminal, failed or not: the models may be failed
    store.fail_units([(p.key, "x") for p in plans if p.stage == 1])
    assert store.stage_may_open("t-1")  # the report may open
    (report,) = [p.key for p in plans if p.stage == 3]
    store.claim_for_queue([report])
    assert not store.stage_may_open("t-1")
    deliver(store, report, worker="w", task_id=None)
    store.finish_unit(report, outcome())
    assert store.stage_may_open("t-1")  # every unit terminal: the campaign may close
    assert store.complete_campaign("t-1") == "PARTIAL"
    # closed: a late message of it (thousands, after a cancel and a resume) finds nothing
    # to open, in this one query, without reading every unit under the campaign's lock
    assert not store.stage_may_open("t-1")
    assert not store.stage_may_open("no-such-campaign")


def test_no_stage_of_a_cancelled_campaign_may_open(store_url: str) -> None:
    store = make_store(store_url)
    seed_campaign(store)
    assert store.stage_may_open("t-1")
    store.cancel_campaign("t-1")
    assert not store.stage_may_open("t-1")


def test_sqlite_reads_do_not_wait_for_another_workers_write(sqlite_url: str) -> None:
    """What a worker reads on the dispatch path begins deferred (WAL snapshot), not
    IMMEDIATE: it neither queues behind another worker's write transaction nor holds
    the write lock itself."""
    import sqlite3

    from sqlalchemy import make_url

    store = make_store(sqlite_url)
    key = seed_campaign(store)[2].key
    begins = record_begins(store.engine)
    writer = sqlite3.connect(make_url(sqlite_url).database, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another worker in the middle of a write
    try:
        assert store.find_unit(key).state == "PENDING"
        assert store.stage_may_open("t-1")
        assert store.find_campaign("t-1") is not None
        # what `orchard status` and the report read: every unit of a campaign, or of
        # fifty campaigns, must not queue behind the workers' writes either
        assert [c.id for c in store.list_campaigns()] == ["t-1"]
        assert store.unit_counts(["t-1"])["t-1"]["PENDING"] == len(store.units("t-1"))
        assert store.results("t-1") == {} and store.artifacts("t-1") == []
        assert store.metrics(key) == {} and store.campaign_metrics("t-1") == {}
        assert store.predictions(key, "val") == []
    finally:
        writer.rollback()
        writer.close()
    assert begins == ["BEGIN"] * 11
    assert deliver(store, key, worker="w", task_id=None).run  # writes still lock up front
    assert begins[-1] == "BEGIN IMMEDIATE"


def test_a_sent_unit_dropped_elsewhere_is_requeued_by_an_idle_consumer_of_its_queue(
    store_url: str,
) -> None:
    """A worker on another database takes the message and drops it, or the broker loses
    it: the unit stays QUEUED and sent. A worker of this store that has consumed the
    queue for ``dropped_after`` without holding a message sends it again, whatever
    other workers of the queue run meanwhile."""
    store = make_store(store_url)
    first = [p.key for p in seed_campaign(store, "t-1") if p.stage == 0]
    assert len(first) >= 2
    queue = store.get_unit(first[0]).queue
    store.claim_for_queue(first, {k: f"t{i}" for i, k in enumerate(first)})
    store.mark_sent([f"t{i}" for i in range(len(first))])
    ids = (f"new-{i}" for i in range(100))

    def requeue(queues: list[str], after: float) -> list[tuple[str, str]]:
        lost = store.requeue_lost(
            0.1, lambda: next(ids), idle_consumer_of=queues, dropped_after=after
        )
        return [(u.key, u.lost_in) for u in lost]

    time.sleep(0.3)
    assert requeue([], 0.1) == []  # the caller holds a message, or consumes nothing
    assert requeue(["elsewhere"], 0.1) == []  # not its queue
    assert requeue([queue], 5.0) == []  # not sent that long ago
    # one unit of the queue runs under a live lease, on another worker (a fold of
    # hours): it held back the others, lost, until it ended
    deliver(store, first[0], worker="w", task_id=None, holder="d1", lease_seconds=30)
    assert requeue([queue], 0.1) == [(k, "SENT") for k in first[1:]]
    again = [f"new-{i}" for i in range(len(first) - 1)]
    assert sorted(store.get_unit(k).task_id for k in first[1:]) == again
    store.mark_sent(again)
    assert requeue([queue], 0.1) == []  # sent again just now: the window starts over
    assert store.get_unit(first[0]).state == "RUNNING"  # not another's running unit


def test_untaken_queues_name_a_queue_no_worker_of_this_store_takes_from(store_url: str) -> None:
    store = make_store(store_url)
    first = [p.key for p in seed_campaign(store, "t-1") if p.stage == 0]
    queue = store.get_unit(first[0]).queue
    store.claim_for_queue(first)  # sent: QUEUED, nothing started yet
    waited = store.untaken_queues("t-1", after=0)
    assert list(waited) == [queue] and 0 <= waited[queue] < 60
    assert store.untaken_queues("t-1", after=3600) == {}  # not waited that long
    assert store.untaken_queues("no-such-campaign", after=0) == {}

    # a worker runs one unit under a live lease: the queue is being consumed
    deliver(store, first[0], worker="w", task_id=None, holder="d1", lease_seconds=60)
    assert store.untaken_queues("t-1", after=0) == {}
    # ... until that worker dies: its lease runs out and no one takes the rest
    assert store.renew_lease(first[0], "d1", lease_seconds=0.01) == "held"
    time.sleep(0.1)
    assert list(store.untaken_queues("t-1", after=0)) == [queue]

    # another campaign's units, sent while a unit of the queue runs: workers busy with
    # other units are not missing
    second = [p.key for p in seed_campaign(store, "t-2") if p.stage == 0]
    store.claim_for_queue(second)
    deliver(store, second[0], worker="w2", task_id=None, holder="d2", lease_seconds=30)
    assert store.untaken_queues("t-1", after=0) == {}
    store.finish_unit(second[0], outcome())
    assert list(store.untaken_queues("t-1", after=0)) == [queue]


def test_untaken_queues_count_units_started_or_finished_within_the_window(
    store_url: str,
) -> None:
    store = make_store(store_url)
    first = [p.key for p in seed_campaign(store, "t-1") if p.stage == 0]
    store.claim_for_queue(first)
    with store._transaction() as s:  # sent an hour ago
        s.execute(update(UnitRow).values(queued_at=utcnow() - timedelta(hours=1)))
    queue = store.get_unit(first[0]).queue
    assert list(store.untaken_queues("t-1", after=60)) == [queue]
    deliver(store, first[0], worker="w", task_id=None, holder="d1", lease_seconds=30)
    store.finish_unit(first[0], outcome())  # a unit taken and finished a moment ago
    assert store.untaken_queues("t-1", after=60) == {}
    # a minute from now, without another unit taken, the queue counts as idle again
    assert list(store.untaken_queues("t-1", after=0)) == [queue]


# ---------------------------------------------------------------- bad settings


def test_a_sqlite_uri_database_creates_no_folder(tmp_path, monkeypatch) -> None:
    """``file:`` is SQLite's URI syntax, not a folder: nothing is made in the working
    directory, and SQLite's own refusal (read-only, no such file) is one line."""
    from scheduler.cli import main

    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///file:{tmp_path / 'x.db'}?mode=ro&uri=true"
    store = Store(url)
    with pytest.raises(StoreError) as caught:
        store.check_schema()
    assert list(tmp_path.iterdir()) == []
    assert str(caught.value) == f"database {url} refused: unable to open database file"
    monkeypatch.setenv("ORCHARD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ORCHARD_DATABASE_URL", url)
    assert main(["db", "upgrade"]) == 2
    assert list(tmp_path.iterdir()) == []


def test_a_sqlite_uri_database_that_exists_is_opened(tmp_path) -> None:
    make_store(f"sqlite:///{tmp_path / 'x.db'}")
    Store(f"sqlite:///file:{tmp_path / 'x.db'}?mode=ro&uri=true").check_schema()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", "ORCHARD_DB_RETRY_SECONDS='abc': expected a number of seconds of 0 or more"),
        ("-1", "ORCHARD_DB_RETRY_SECONDS='-1': expected a number of seconds of 0 or more"),
        ("nan", "ORCHARD_DB_RETRY_SECONDS='nan': expected a number of seconds of 0 or more"),
        ("inf", "ORCHARD_DB_RETRY_SECONDS='inf': expected a number of seconds of 0 or more"),
        (
            "1e12",
            "ORCHARD_DB_RETRY_SECONDS='1e12': expected a number of seconds of 0 or more "
            "and at most 86400 (1 day)",
        ),
    ],
)
def test_a_bad_db_retry_setting_is_one_line(sqlite_url, monkeypatch, value, message) -> None:
    monkeypatch.setenv("ORCHARD_DB_RETRY_SECONDS", value)
    with pytest.raises(StoreError) as caught:
        Store(sqlite_url)
    assert str(caught.value) == message


def test_db_retry_seconds_of_0_to_a_day_are_taken(sqlite_url, monkeypatch) -> None:
    for value in ("0", "2.5", "86400"):
        monkeypatch.setenv("ORCHARD_DB_RETRY_SECONDS", value)
        assert Store(sqlite_url).retry_seconds == float(value)
    monkeypatch.setenv("ORCHARD_DB_RETRY_SECONDS", " ")
    assert Store(sqlite_url).retry_seconds == 5.0


def test_creating_a_campaign_again_after_a_lost_reply_is_done_already(store_url: str) -> None:
    """The connection drops after the server committed: the store retries the whole
    call, which must find its own campaign rather than fail (submit would then remove
    the manifest of a campaign that is recorded)."""
    store = make_store(store_url)
    units = seed_campaign(store, "t-1")
    seed_campaign(store, "t-1")  # the retry
    assert [u.key for u in store.units("t-1")] == [u.key for u in units]
    with pytest.raises(StoreError, match="^campaign t-1 already exists$"):
        store.create_campaign(
            "t-1", name="t", source="other.toml", digest="d", spec={}, classes=["A"], units=[]
        )


# -- deleting a campaign


def _finish(store: Store, key: str, **extra: Any) -> None:
    deliver(store, key, worker="w", task_id=key, holder=key)
    done = replace(outcome(), extra={"note": "x", **extra}, artifacts=[])
    assert store.finish_unit(key, done, holder=key)


def _rows_of(store: Store, unit_ids: list[int]) -> dict[str, int]:
    """Rows left in each table under these units (by id: the units themselves may be gone)."""
    listed = ",".join(map(str, unit_ids))
    with store.engine.connect() as conn:
        counts = {
            table: conn.execute(
                text(f"SELECT count(*) FROM {table} WHERE {column} IN ({listed})")
            ).scalar_one()
            for table, column in (
                ("units", "id"),
                ("unit_params", "unit_id"),
                ("results", "unit_id"),
                ("predictions", "unit_id"),
                ("metrics", "unit_id"),
            )
        }
    return counts


def _unit_ids(store: Store, campaign_id: str) -> list[int]:
    with store.engine.connect() as conn:
        return list(
            conn.execute(
                text("SELECT id FROM units WHERE campaign_id = :c"), {"c": campaign_id}
            ).scalars()
        )


def test_migrations_down_and_up_keep_every_row(store_url: str) -> None:
    """SQLite cannot drop a column in place: Alembic rebuilds the table (copy, drop,
    rename), and with foreign keys on, dropping ``units`` deleted every row under it by
    cascade. Each step down to the first schema and back keeps every row."""
    store = make_store(store_url)
    units = seed_campaign(store, "t-1")
    key = units[-2].key
    _finish(store, key)
    store.record_metrics(key, 1, {"loss": 0.5})
    ids = _unit_ids(store, "t-1")
    before = _rows_of(store, ids)
    assert before["results"] == before["metrics"] == 1 and before["predictions"] == 2
    revisions = sorted(migrate.known_revisions())
    for revision in reversed(revisions[:-1]):
        migrate.downgrade(store.engine, revision)
        assert _rows_of(store, ids) == before, revision
    store.upgrade()
    assert _rows_of(store, ids) == before
    assert store.results("t-1")[key].val_acc == outcome().val_acc
    if store.engine.dialect.name == "sqlite":  # the store's connections check references again
        with store.engine.connect() as conn, pytest.raises(IntegrityError):
            conn.execute(
                text(
                    "INSERT INTO results (unit_id, fit_seconds, extra, created_at) "
                    "VALUES (999999, 1.0, '{}', '2026-01-01 00:00:00')"
                )
            )


def test_a_sqlite_migration_that_leaves_broken_references_changes_nothing(
    sqlite_url: str,
) -> None:
    store = Store(sqlite_url)
    migrate.upgrade(store.engine, "0004")
    with store.engine.connect() as conn:  # a row whose unit is gone, as a bad rebuild leaves
        conn.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")
        conn.exec_driver_sql(
            "INSERT INTO metrics (unit_id, name, step, value) VALUES (999, 'loss', 0, 0.5)"
        )
        conn.commit()
        conn.connection.dbapi_connection.execute("PRAGMA foreign_keys=ON")
    with pytest.raises(StoreError) as info:
        store.upgrade()
    assert str(info.value) == (
        f"database {mask_url(sqlite_url)}: 1 row(s) refer to rows no longer there (the "
        "first: metrics row 1, in units): nothing was changed"
    )
    assert migrate.current_revision(store.engine) == "0004"


def test_numbers_that_are_not_finite_are_kept_alike_by_both_stores(store_url: str) -> None:
    """NaN (an empty validation set's loss, a model that predicts nothing sensible):
    SQLite would keep it as NULL, which a metric's column refuses, and PostgreSQL's JSON
    refuses it outright. Both leave such a metric out, keep None in a result, and keep a
    prediction's label without probabilities that hold one."""
    store = make_store(store_url)
    key = seed_campaign(store)[-2].key
    deliver(store, key, worker="w", task_id="t", holder="h")
    nan, inf = float("nan"), float("inf")
    store.record_metrics(key, 0, {"train_loss": 0.5, "val_loss": nan, "val_acc": inf})
    store.record_metrics(key, 1, {"val_loss": nan})
    assert store.metrics(key) == {"train_loss": [(0, 0.5)]}
    done = Outcome(
        fit_seconds=1.0,
        train_acc=0.5,
        val_acc=nan,
        extra={"scores": [0.5, nan], "loss": {"last": inf}},
        predictions={"val": [Prediction("a.jpg", 0, 1, [nan, 0.5, 0.5])]},
    )
    assert store.finish_unit(key, done, holder="h")
    result = store.results("t-1")[key]
    assert (result.train_acc, result.val_acc) == (0.5, None)
    assert result.extra == {"scores": [0.5, None], "loss": {"last": None}}
    [prediction] = store.predictions(key, "val")
    assert (prediction.pred, prediction.probs) == (1, None)  # the label, without them


def test_delete_removes_a_campaigns_rows_and_its_folders_records_only(store_url: str) -> None:
    store = make_store(store_url)
    units = seed_campaign(store, "t-1")
    seed_campaign(store, "t-2")  # untouched
    key = units[-2].key
    _finish(store, key)
    store.record_metrics(key, 1, {"loss": 0.5})
    own = Artifact("campaigns/t-1/models/m.pt", "model", "1" * 64, 10, "t-1", key)
    shard = Artifact("cache/abc/shard-00000.npy", "shard", "2" * 64, 10, "t-1", None)
    other = Artifact("campaigns/t-10/models/m.pt", "model", "3" * 64, 10, "t-2", None)
    for artifact in (own, shard, other):
        store.record_artifact(artifact)
    store.cancel_campaign("t-1")  # nothing was running
    ids = _unit_ids(store, "t-1")
    before = _rows_of(store, ids)
    assert before["units"] == len(units) and before["predictions"] == 2 and before["metrics"] == 1

    planned = store.delete_campaign("t-1", quiet_seconds=60, dry_run=True)
    assert (planned.state, planned.units, planned.artifacts) == ("CANCELLED", len(units), [own])
    assert _rows_of(store, ids) == before  # a dry run changes nothing
    deleted = store.delete_campaign("t-1", quiet_seconds=60)
    assert deleted == planned

    assert store.find_campaign("t-1") is None
    assert set(_rows_of(store, ids).values()) == {0}
    assert store.find_artifact(own.path) is None
    # the shared cache keeps its record, now of no campaign; another campaign's stays
    assert store.find_artifact(shard.path) == replace(shard, campaign_id=None)
    assert store.find_artifact(other.path) == other
    assert len(store.units("t-2")) == len(units)
    # the store keeps the id: what names it is told it was deleted, not never there
    when = store.deleted_at("t-1")
    assert when is not None and abs((utcnow() - when).total_seconds()) < 60
    assert store.deleted_at("t-2") is None and store.deleted_at("t-3") is None
    gone = rf"^campaign t-1 was deleted \(`orchard delete`\) at {when:%Y-%m-%d %H:%M:%S} UTC$"
    for again in (
        lambda: store.delete_campaign("t-1", quiet_seconds=60),
        lambda: store.get_campaign("t-1"),
        lambda: store.resume_campaign("t-1"),
        lambda: store.cancel_campaign("t-1"),
    ):
        with pytest.raises(CampaignDeletedError, match=gone):
            again()
    with pytest.raises(NotFoundError, match="^no campaign 't-3' in "):
        store.get_campaign("t-3")
    assert [c.id for c in store.list_campaigns()] == ["t-2"]


def test_delete_refuses_a_running_campaign(store_url: str) -> None:
    store = make_store(store_url)
    seed_campaign(store, "t-1")
    with pytest.raises(DeleteRefusedError, match=r"t-1 is RUNNING: cancel it first"):
        store.delete_campaign("t-1", quiet_seconds=0)
    assert store.find_campaign("t-1") is not None


def test_delete_waits_for_units_cancelled_while_they_ran(store_url: str) -> None:
    """A GPU fold stops at its next store call after a cancel, and may write one more
    checkpoint meanwhile: its campaign is not deleted under it."""
    store = make_store(store_url)
    units = seed_campaign(store, "t-1")
    deliver(store, units[-2].key, worker="gpu-1", task_id="x", holder="x", lease_seconds=60)
    deliver(store, units[-3].key, worker="cpu-1", task_id="y", holder="y", lease_seconds=60)
    store.cancel_campaign("t-1")
    with pytest.raises(DeleteRefusedError) as refused:
        store.delete_campaign("t-1", quiet_seconds=120)
    # in plan order
    named = f"{units[-3].key} on cpu-1, {units[-2].key} on gpu-1"
    assert f"while 2 of its units ran ({named})" in str(refused.value)  # each named
    assert re.search(r"try again in 1[12]\d s$", str(refused.value))  # 120 s less the time since
    assert store.find_campaign("t-1") is not None
    # once two lease periods have passed (here: none are asked for), it goes
    assert store.delete_campaign("t-1", quiet_seconds=0).units == len(units)


def test_delete_refuses_a_campaign_whose_results_another_reuses(store_url: str) -> None:
    store = make_store(store_url)
    source = seed_campaign(store, "t-1")
    seed_campaign(store, "t-10")  # its keys start with "t-1" too, and mention it
    copy = seed_campaign(store, "t-2")
    _finish(store, copy[-2].key, reused_from=source[-2].key)
    _finish(store, f"t-10/{copy[-3].key.split('/', 1)[1]}", note_on="t-1", reused_from="t-10/x")
    for cid in ("t-1", "t-10", "t-2"):
        store.cancel_campaign(cid)
    with pytest.raises(DeleteRefusedError) as refused:
        store.delete_campaign("t-1", quiet_seconds=0)
    assert str(refused.value) == (
        "campaign t-1: campaign(s) t-2 reuse its results, whose model files stay in its "
        "folder: delete them first"
    )
    store.delete_campaign("t-2", quiet_seconds=0)
    assert store.delete_campaign("t-1", quiet_seconds=0).units == len(source)
    assert store.find_campaign("t-10") is not None


def _twins_one_cancelled(store: Store) -> list[UnitPlan]:
    """Campaigns t-1 (cancelled, one unit succeeded) and t-2 over the same manifest, so
    that `submit --reuse` of t-2 copies from t-1; t-1's units."""
    source = seed_campaign(store, "t-1")
    _finish(store, source[-2].key)
    seed_campaign(store, "t-2")
    for cid in ("t-1", "t-2"):
        store.record_artifact(
            Artifact(f"campaigns/{cid}/manifest.json", "manifest", "m" * 64, 1, cid, None)
        )
    store.cancel_campaign("t-1")
    return source


def test_a_delete_waits_for_a_reuse_copying_from_the_campaign(store_url: str) -> None:
    """`submit --reuse` copying results (which keep pointing at the source's model
    files) while the source is deleted: the delete waits for the copy, then refuses."""
    copier, deleter = make_store(store_url), Store(store_url)
    source = _twins_one_cancelled(copier)
    copying, go_on = threading.Event(), threading.Event()

    def pause_before_the_copy(conn, cursor, statement: str, *args: Any) -> None:  # noqa: ANN001
        if statement.lstrip().upper().startswith("INSERT INTO RESULTS"):
            copying.set()  # the sources are read, nothing copied yet
            assert go_on.wait(30)

    event.listen(copier.engine, "before_cursor_execute", pause_before_the_copy)
    copied: dict[str, str] = {}
    reuse = threading.Thread(target=lambda: copied.update(copier.reuse_finished("t-2")))
    reuse.start()
    try:
        assert copying.wait(30)
        refused: list[Exception] = []

        def delete_source() -> None:
            try:
                deleter.delete_campaign("t-1", quiet_seconds=0)
            except DeleteRefusedError as exc:
                refused.append(exc)

        deleting = threading.Thread(target=delete_source)
        deleting.start()
        wait_until_it_waits(deleter, deleting)  # for the copy's transaction
    finally:
        go_on.set()
        reuse.join(30)
        event.remove(copier.engine, "before_cursor_execute", pause_before_the_copy)
    deleting.join(30)
    assert copied == {source[-2].key.replace("t-1", "t-2"): source[-2].key}
    assert refused and "campaign(s) t-2 reuse its results" in str(refused[0])
    assert copier.find_campaign("t-1") is not None


def test_a_long_delete_retries_a_late_batch_on_its_own(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each batch has its own retries: a lock busy for a moment late in a delete longer
    than the store's retry time is waited out, not given up at once."""
    import sqlite3

    import db.store

    store = make_store(sqlite_url)
    units = seed_campaign(store, "t-1")
    for plan in units[-4:-1]:
        _finish(store, plan.key)
    store.cancel_campaign("t-1")
    store.retry_seconds = 0.2
    monkeypatch.setattr(db.store, "SQLITE_BATCH_PAUSE", 0.04)  # 0.04 s after each batch
    deletes: list[str] = []

    def busy_once_late(conn, cursor, statement: str, *args: Any) -> None:  # noqa: ANN001
        if statement.lstrip().upper().startswith("DELETE FROM"):
            deletes.append(statement)
            if len(deletes) == 8:  # after 7 pauses: past the first 0.2 s
                raise sqlite3.OperationalError("database is locked")

    event.listen(store.engine, "before_cursor_execute", busy_once_late)
    try:
        deleted = store.delete_campaign("t-1", quiet_seconds=0, batch_rows=3)
    finally:
        event.remove(store.engine, "before_cursor_execute", busy_once_late)
    assert deleted.state == "CANCELLED" and len(deletes) > 8
    assert store.find_campaign("t-1") is None


def test_a_reuse_waiting_while_a_delete_decides_copies_nothing_from_it(store_url: str) -> None:
    """The other order: `submit --reuse` asks while a delete holds the source's row and
    is about to commit DELETING. It waits, then finds no twin to copy from (PostgreSQL
    re-checks the locked row, not the snapshot that still held the source's manifest)."""
    deleter, copier = make_store(store_url), Store(store_url)
    _twins_one_cancelled(deleter)
    copied: list[dict[str, str]] = []
    reuse = threading.Thread(target=lambda: copied.append(copier.reuse_finished("t-2")))

    def start_the_reuse() -> None:  # the delete's checks passed, its commit to come
        reuse.start()
        wait_until_it_waits(copier, reuse)  # for the delete's lock

    deleter.delete_campaign("t-1", quiet_seconds=0, before_commit=start_the_reuse)
    reuse.join(30)
    assert copied == [{}]
    assert deleter.find_campaign("t-1") is None
    assert all(u.state != "SUCCESS" for u in copier.units("t-2"))
    copier.dispose()


def test_a_renewal_after_a_delete_says_the_unit_is_gone(store_url: str) -> None:
    store = make_store(store_url)
    units = seed_campaign(store, "t-1")
    deliver(store, units[-2].key, worker="w", task_id="x", holder="x", lease_seconds=60)
    assert store.renew_lease(units[-2].key, "x", 60) == LEASE_HELD
    store.cancel_campaign("t-1")
    assert store.renew_lease(units[-2].key, "x", 60) == LEASE_CANCELLED
    store.delete_campaign("t-1", quiet_seconds=0)
    assert store.renew_lease(units[-2].key, "x", 60) == LEASE_GONE


def test_a_delete_goes_in_batches_and_a_workers_call_gets_in_between(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite a transaction holds the store's write lock: a large campaign's rows go
    a batch per transaction, so a worker's store call waits for one batch, not for the
    whole delete; meanwhile the campaign is DELETING. (PostgreSQL locks rows: there the
    rows go in one transaction after the one that decides.)"""
    import db.store

    # the worker's calls below come between batches by the commit hook, not by the pause
    monkeypatch.setattr(db.store, "SQLITE_BATCH_PAUSE", 0.005)
    store, worker = make_store(store_url), Store(store_url)
    units = seed_campaign(store, "t-1")
    others = seed_campaign(store, "t-2")
    for plan in units[-4:-1]:
        _finish(store, plan.key)  # 2 predictions, 1 result, parameters each
        store.record_metrics(plan.key, 1, {"loss": 0.5, "acc": 0.5})
    store.cancel_campaign("t-1")
    ids = _unit_ids(store, "t-1")
    rows = sum(_rows_of(store, ids).values())
    commits: list[Any] = []
    seen: list[str] = []

    sqlite = store.engine.dialect.name == "sqlite"
    between = 3 if sqlite else 1

    def a_worker_call(session: Any) -> None:  # noqa: ANN401
        commits.append(session)
        if len(seen) < between:  # between the first batches, on its own connection
            seen.append(worker.get_campaign("t-1").state)
            deliver(worker, others[len(seen) - 1].key, worker="w", task_id="x", holder="x")

    event.listen(store._sessions, "after_commit", a_worker_call)
    try:
        deleted = store.delete_campaign("t-1", quiet_seconds=0, batch_rows=2)
    finally:
        event.remove(store._sessions, "after_commit", a_worker_call)
    assert deleted.state == "CANCELLED" and deleted.units == len(units)
    assert seen == ["DELETING"] * between
    assert [u.state for u in worker.units("t-2")][:between] == ["RUNNING"] * between
    # one transaction decides, one per batch of 2 rows (and an empty one per table), one
    # drops the campaign row
    assert len(commits) >= 1 + rows // 2 + 1 if sqlite else len(commits) == 2
    assert set(_rows_of(store, ids).values()) == {0} and store.find_campaign("t-1") is None
    worker.dispose()


def test_a_delete_stopped_midway_is_finished_by_deleting_again(store_url: str) -> None:
    store = make_store(store_url)
    units = seed_campaign(store, "t-1")
    source = seed_campaign(store, "t-2")
    for plan in units[-3:-1]:
        _finish(store, plan.key)
    _finish(store, source[-2].key)
    for cid in ("t-1", "t-2"):
        store.record_artifact(
            Artifact(f"campaigns/{cid}/manifest.json", "manifest", "m" * 64, 1, cid, None)
        )
    store.cancel_campaign("t-1")
    deletes: list[str] = []
    # SQLite: in its second batch; PostgreSQL (no batches): as the campaign's row goes
    sqlite = store.engine.dialect.name == "sqlite"
    at, nth = ("DELETE FROM PREDICTIONS", 2) if sqlite else ("DELETE FROM CAMPAIGNS", 1)

    def stopped(conn, cursor, statement: str, *args: Any) -> None:  # noqa: ANN001
        if statement.lstrip().upper().startswith(at):
            deletes.append(statement)
            if len(deletes) == nth:
                raise KeyboardInterrupt  # as SIGINT, or a database gone, mid-delete

    event.listen(store.engine, "before_cursor_execute", stopped)
    try:
        with pytest.raises(KeyboardInterrupt):
            store.delete_campaign("t-1", quiet_seconds=0, batch_rows=1)
    finally:
        event.remove(store.engine, "before_cursor_execute", stopped)
    ids = _unit_ids(store, "t-1")
    assert store.get_campaign("t-1").state == "DELETING"
    assert _rows_of(store, ids)["predictions"] == (3 if sqlite else 4)  # a batch of one went
    # nothing brings it back, runs its units or copies its results meanwhile
    finishes = r"^campaign t-1 is being deleted: `orchard delete t-1` finishes a delete that"
    with pytest.raises(BeingDeletedError, match=finishes):
        store.resume_campaign("t-1")
    store.cancel_campaign("t-2")
    store.resume_campaign("t-2")
    assert store.reuse_finished("t-2") == {}  # t-2's own finished unit aside, t-1 is no twin
    late = store.start_unit(units[0].key, worker="w", task_id="y", holder="y")
    assert not late.run and late.state in ("CANCELLED", "SUCCESS")
    assert store.cancel_campaign("t-1").already_finished
    assert store.delete_campaign("t-1", quiet_seconds=0, dry_run=True).state == "DELETING"

    again = store.delete_campaign("t-1", quiet_seconds=0)
    assert (again.state, again.units, again.artifacts) == ("DELETING", len(units), [])
    assert set(_rows_of(store, ids).values()) == {0} and store.find_campaign("t-1") is None
    assert store.deleted_at("t-1") is not None
    assert store.find_campaign("t-2") is not None and len(store.units("t-2")) == len(source)


def test_leases_of_a_dead_process_end_now_and_only_theirs(store_url: str) -> None:
    """A killed prefork child's units (holder ``host/pid/…``) are released for their
    next delivery; another process's, even one whose pid starts alike, are not."""
    store = make_store(store_url)
    first, second, third = (p.key for p in seed_campaign(store)[:3])
    deliver(store, first, worker="w", task_id="a", holder="w_1@h/12/aa", lease_seconds=600)
    deliver(store, second, worker="w", task_id="b", holder="w_1@h/123/bb", lease_seconds=600)
    deliver(store, third, worker="w", task_id="c", holder="wx1@h/12/cc", lease_seconds=600)
    assert store.release_leases_of("w_1@h/12/") == 1  # "_" is no wildcard here
    # at once, not a lease period later, nor, on its last attempt, a grace period later:
    # its holder is known dead
    again = store.start_unit(first, worker="w2", task_id="a", holder="w2@h/7/dd", max_attempts=1)
    assert (again.run, again.reason, again.state) == (False, "gave up", "FAILED")
    store.resume_campaign("t-1")
    deliver(store, first, worker="w", task_id="a", holder="w_1@h/12/aa", lease_seconds=600)
    assert store.release_leases_of("w_1@h/12/") == 1
    again = store.start_unit(first, worker="w2", task_id="a", holder="w2@h/7/dd")
    assert again.run and again.attempts == 2
    for key in (second, third):
        late = store.start_unit(key, worker="w2", task_id="x", holder="w2@h/7/ee")
        assert not late.run and late.reason == "leased"


def test_family_counts_count_each_family_s_states_in_plan_order(store_url: str) -> None:
    """What a poll of `wait` reads instead of every unit: the same counts as the units
    give, families in the order the plan has them."""
    store = make_store(store_url)
    plans = seed_campaign(store)
    deliver(store, plans[0].key, worker="w@h", task_id=None)
    counts = store.family_counts("t-1")
    by_family: dict[str, dict[str, int]] = {}
    for unit in store.units("t-1"):
        states = by_family.setdefault(unit.family, {})
        states[unit.state] = states.get(unit.state, 0) + 1
    assert counts == by_family
    assert list(counts) == list(dict.fromkeys(p.family for p in plans))
    running = store.units("t-1", state="RUNNING")
    assert [u.key for u in running] == [plans[0].key] and running[0].params == plans[0].params
    assert store.units("t-1", state="RUNNING", family="cnn") == []
    store.dispose()


def wait_until_it_waits(store: Store, waiter: threading.Thread) -> None:
    """Until ``waiter`` is blocked on a lock that ``store``'s database holds for another
    transaction: on PostgreSQL as soon as the server shows the wait; SQLite shows none,
    so there ``waiter`` must still be running a second on (it would not be, had it not
    waited)."""
    if store.engine.dialect.name == "postgresql":
        wait_for_a_lock_wait(store, waiter)
        return
    waiter.join(1.0)
    assert waiter.is_alive(), "it finished without waiting for the lock"


def wait_for_a_lock_wait(store: Store, waiter: threading.Thread) -> None:
    """Until a session of ``store``'s PostgreSQL database waits for a lock (``waiter``
    blocked on one), so that a race test runs the race, not one side after the other."""
    deadline = time.monotonic() + 30
    while True:
        with store.engine.connect() as conn:
            waiting = conn.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = "
                    "current_database() AND wait_event_type = 'Lock'"
                )
            )
        if waiting:
            return
        assert waiter.is_alive(), "it finished without waiting for the lock"
        assert time.monotonic() < deadline, "no lock wait within 30 s"
        time.sleep(0.02)


def open_stage_during_a_resume(store: Store, campaign_id: str, reopened: str) -> list[str]:
    """``store.open_stage`` (what ``advance`` asks of the store) started while `orchard
    resume`, in another process, has locked the campaign and reopened ``reopened``
    (BEGIN IMMEDIATE on SQLite) and not yet committed: it must wait for that commit,
    then decide on what the resume left. Returns the keys it claimed."""
    from sqlalchemy import select

    resumer = Store(store.url)
    opened: list[Any] = []
    try:
        with resumer.engine.begin() as conn:
            locked = select(CampaignRow.id).where(CampaignRow.id == campaign_id)
            conn.execute(locked.with_for_update(key_share=True))
            conn.execute(update(UnitRow).where(UnitRow.key == reopened).values(state="PENDING"))
            advancing = threading.Thread(
                target=lambda: opened.append(store.open_stage(campaign_id, lambda: "task"))
            )
            advancing.start()
            wait_until_it_waits(store, advancing)  # for the resume's commit
        advancing.join(30)
    finally:
        resumer.dispose()
    [(_, claimed, task_ids, _)] = opened
    assert task_ids == dict.fromkeys(claimed, "task")
    return claimed


def test_a_stage_is_decided_and_claimed_under_the_campaign_s_lock(store_url: str) -> None:
    """A unit's last model fails and its advance goes to open the report while `orchard
    resume` is reopening that unit: the advance waits for the resume's commit, so the
    report waits for the unit run again. (It read the states before, unlocked, and
    claimed the report the resume was holding back: the campaign ended DONE, its
    report without that unit.)"""
    from shared.plan import PREPROCESS, REPORT, TRAIN

    store = make_store(store_url)
    shard, m0, m1, report = "r-1/preprocess/s0", "r-1/svm/m0/f0", "r-1/svm/m1/f0", "r-1/report"
    store.create_campaign(
        "r-1",
        name="r",
        source="r.toml",
        digest="d",
        spec={},
        classes=["A", "B"],
        units=[
            UnitPlan(shard, "preprocess", PREPROCESS, None, {"shard": 0}, "s0"),
            UnitPlan(m0, "svm", TRAIN, 0, {"C": 1.0}, "m0"),
            UnitPlan(m1, "svm", TRAIN, 0, {"C": 2.0}, "m1"),
            UnitPlan(report, "report", REPORT, None, {}, "r"),
        ],
    )
    for key in (shard, m0, m1):
        deliver(store, key, worker="w", task_id=None)
    store.finish_unit(shard, Outcome(1.0))
    store.finish_unit(m0, Outcome(1.0, val_acc=0.5))
    store.fail_unit(m1, "boom")  # the report may open now
    assert open_stage_during_a_resume(store, "r-1", reopened=m1) == [m1]
    assert {u.key: u.state for u in store.units("r-1")} == {
        shard: "SUCCESS",
        m0: "SUCCESS",
        m1: "QUEUED",
        report: "PENDING",
    }


def test_a_shard_reopened_by_a_resume_does_not_fail_the_models_waiting_on_it(
    store_url: str,
) -> None:
    """The other face of the same race: a failed shard's advance would fail every
    model unit for it, after a resume had reset the shard to run again."""
    store = make_store(store_url)
    shards = [p.key for p in seed_campaign(store) if p.family == "preprocess"]
    for key in shards:
        deliver(store, key, worker="w", task_id=None)
    store.finish_unit(shards[0], outcome())
    store.fail_unit(shards[1], "PreprocessError: bad image")
    assert open_stage_during_a_resume(store, "t-1", reopened=shards[1]) == [shards[1]]
    states = {u.key: u.state for u in store.units("t-1")}
    assert "FAILED" not in states.values(), states


def test_a_finish_and_a_cancel_of_its_campaign_do_not_deadlock(postgres_url: str) -> None:
    """A worker's finish locks its unit, then its file's record takes the campaign row's
    KEY SHARE lock (the foreign key); a cancel locks the campaign row, then the units.
    With FOR UPDATE on the campaign row the two deadlocked (PostgreSQL broke it after a
    second, a retry hid it); FOR NO KEY UPDATE does not stop the record. The cancel
    runs without retries here, so a deadlock would fail one side or the other."""
    from sqlalchemy import select

    from db.models import ArtifactRow

    store = make_store(postgres_url)
    canceller = Store(postgres_url, retry_seconds=0)
    key = seed_campaign(store)[0].key

    cancelled: list[Any] = []
    try:
        with store.engine.begin() as finish:  # a finish under way: its unit locked
            finish.execute(select(UnitRow.id).where(UnitRow.key == key).with_for_update())
            cancelling = threading.Thread(
                target=lambda: cancelled.append(canceller.cancel_campaign("t-1"))
            )
            cancelling.start()
            # it holds the campaign row and waits for the unit
            wait_for_a_lock_wait(store, cancelling)
            finish.execute(  # the finish's file record: waits for nothing now
                ArtifactRow.__table__.insert().values(
                    path="campaigns/t-1/m.pt", kind="model", campaign_id="t-1", unit_key=key,
                    sha256="0" * 64, size=1, created_at=utcnow(),
                )
            )  # fmt: skip
        cancelling.join(30)
    finally:
        canceller.dispose()
    assert cancelled and cancelled[0].state == "CANCELLED"


def test_the_attempts_that_did_not_end_a_unit_are_kept(store_url: str) -> None:
    """The unit's row holds its latest attempt: a worker lost before it, a hand-back,
    a failure a resume reset were forgotten, and `orchard status` showed `tries 2` and
    the last worker only."""
    store = make_store(store_url)
    units = seed_campaign(store)
    key, other = units[2].key, units[3].key
    first = deliver(store, key, worker="gpu-1@a", task_id="t1", holder="d1", lease_seconds=0.2)
    assert first.run and store.earlier_attempts("t-1") == {}
    time.sleep(0.4)
    [lost] = store.requeue_lost(0.0, lambda: "t2")  # its worker was lost
    assert lost.key == key
    # the start retried after its commit's answer was lost counts once
    for _ in range(2):
        assert store.start_unit(key, worker="gpu-2@b", task_id="t2", holder="d2").run
    store.finish_unit(key, outcome(), holder="d2")
    [earlier] = store.earlier_attempts("t-1")[key]
    assert (earlier.worker, earlier.state, earlier.error) == ("gpu-1@a", "QUEUED", None)
    assert earlier.started_at == first.unit.started_at
    assert earlier.last_heard_at is not None and earlier.last_heard_at >= earlier.started_at

    # a failure that a resume resets, then a lease that ran out (its worker cut off),
    # then a process that died (its worker ended the lease)
    deliver(store, other, worker="cpu-1@a", task_id="t3", holder="d3")
    assert store.fail_unit(other, "ValueError: bad", holder="d3")
    assert other in store.resume_campaign("t-1")
    deliver(store, other, worker="cpu-2@b", task_id="t4", holder="d4", lease_seconds=0.2)
    time.sleep(0.4)
    assert store.start_unit(other, worker="cpu-3@c", task_id="t4", holder="w3@c/1/d5").run
    assert store.release_leases_of("w3@c/1/") == 1
    assert store.start_unit(other, worker="cpu-3@c", task_id="t4", holder="d6").run
    attempts = store.earlier_attempts("t-1")[other]
    assert [(a.worker, a.state, a.error) for a in attempts] == [
        ("cpu-1@a", "FAILED", "ValueError: bad"),
        ("cpu-2@b", "RUNNING", None),
        ("cpu-3@c", "LOST", None),
    ]
    assert set(store.earlier_attempts("t-1")) == {key, other}

    store.cancel_campaign("t-1")
    store.delete_campaign("t-1", quiet_seconds=0)
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM unit_attempts")).scalar() == 0
