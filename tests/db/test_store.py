"""The store on SQLite and on the real PostgreSQL: migrations, idempotent writes, races."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import inspect

from db import migrate
from db.store import Artifact, Outcome, Prediction, Store, StoreError
from shared.plan import UnitPlan, plan_units
from shared.spec import parse_campaign

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


def seed_campaign(store: Store, cid: str = "t-1") -> list[UnitPlan]:
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
    )
    return units


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


def test_unmigrated_database_is_reported_clearly(sqlite_url: str) -> None:
    with pytest.raises(StoreError, match="orchard db upgrade"):
        Store(sqlite_url).check_schema()


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
    assert store.start_unit(key, worker="w1", task_id="a").run
    assert store.finish_unit(key, outcome(0.5)) is True
    # a second delivery of the same task: it may not even start, nor write again
    again = store.start_unit(key, worker="w2", task_id="b")
    assert not again.run and again.state == "SUCCESS"
    assert store.finish_unit(key, outcome(0.9)) is False
    assert store.results("t-1")[key].val_acc == 0.5  # first write wins
    assert store.count_rows("t-1") == {"results": 1, "predictions": 2, "metrics": 0}
    preds = store.predictions(key, "val")
    assert [(p.image_id, p.label, p.pred) for p in preds] == [("a.jpg", 0, 1), ("b.jpg", 2, 2)]
    assert preds[0].probs == [0.2, 0.7, 0.1]
    assert store.find_artifact("models/m.pt").sha256 == "0" * 64


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
    store.start_unit(done, worker="w", task_id=None)
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
        store.start_unit(plan.key, worker="w", task_id=None)
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


def test_unreachable_database_fails_fast_with_masked_url() -> None:
    store = Store("postgresql+psycopg://orchard:s3cret@127.0.0.1:1/orchard")
    started = time.monotonic()
    with pytest.raises(StoreError) as err:
        store.check_schema()
    assert time.monotonic() - started < 10
    message = str(err.value)
    assert "s3cret" not in message and "***" in message and "\n" not in message
