"""The store at the scale of real campaigns: thousands of units, hundreds of campaigns.

What is counted here are statements, never seconds: the statements an operation sends
must not grow with the number of units it covers (no per-unit round trip), and a lookup
across the whole store must go through an index, not read every unit of every campaign
(checked with SQLite's query plans, which do not depend on table statistics).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import pytest
from sqlalchemy import event, make_url, update

from db.models import CampaignRow, UnitRow, utcnow
from db.store import KEYS_PER_STATEMENT, Artifact, Outcome, Prediction, Store
from shared.plan import UnitPlan
from tests.db.test_store import make_store


def plans(cid: str, models: int, shards: int = 2) -> list[UnitPlan]:
    """A campaign of ``shards`` preprocessing shards, ``models`` SVM grid points (two
    params each) and a report, as ``plan_units`` lays one out."""
    units = [
        UnitPlan(f"{cid}/preprocess/s{i:05d}", "preprocess", 0, None, {"shard": i}, f"s{i}")
        for i in range(shards)
    ]
    units += [
        UnitPlan(f"{cid}/svm/h{i:05d}/f0", "svm", 1, 0, {"C": float(i), "gamma": "scale"}, f"h{i}")
        for i in range(models)
    ]
    units.append(UnitPlan(f"{cid}/report", "report", 3, None, {}, "r"))
    return units


def create(store: Store, cid: str, models: int, manifest: str | None = None) -> list[UnitPlan]:
    units = plans(cid, models)
    artifacts = []
    if manifest is not None:
        artifacts = [Artifact(f"campaigns/{cid}/manifest.json", "manifest", manifest, 1, cid)]
    store.create_campaign(
        cid,
        name="t",
        source="t.toml",
        digest="d",
        spec={"seed": 0},
        classes=["A", "B", "C"],
        units=units,
        artifacts=artifacts,
    )
    return units


@contextmanager
def statements(store: Store) -> Iterator[list[str]]:
    """The statements the store sends inside the block (transaction control left out;
    an executemany counts once: it is one call, pipelined by the driver)."""
    sent: list[str] = []

    def count(conn, cursor, statement, *_rest) -> None:  # noqa: ANN001
        if not statement.lstrip().upper().startswith(("BEGIN", "COMMIT", "ROLLBACK")):
            sent.append(statement)

    event.listen(store.engine, "before_cursor_execute", count)
    try:
        yield sent
    finally:
        event.remove(store.engine, "before_cursor_execute", count)


def count(store: Store, call: Callable[[], object]) -> int:
    with statements(store) as sent:
        call()
    return len(sent)


# ---------------------------------------------------------------- no per-unit round trips


def test_creating_a_campaign_sends_as_many_statements_for_400_units_as_for_20(
    store_url: str,
) -> None:
    """It sent five statements per unit on SQLite (the ORM inserted each unit and each
    param alone, to learn its id): 25,000 for a grid of 5,000 points."""
    store = make_store(store_url)
    small = count(store, lambda: create(store, "small", 20, manifest="a" * 64))
    large = count(store, lambda: create(store, "large", 400, manifest="a" * 64))
    assert small == large
    units = store.units("large")
    assert [u.key for u in units] == [p.key for p in plans("large", 400)]
    assert units[5].params == {"C": 3.0, "gamma": "scale"} and units[-1].params == {}
    assert all(u.state == "PENDING" and u.attempts == 0 for u in units)
    assert store.artifacts("large", kind="manifest")[0].campaign_id == "large"


def test_reading_a_campaigns_units_sends_as_many_statements_for_1200_as_for_20(
    store_url: str,
) -> None:
    """``orchard status ID`` and every poll of ``--watch``/``wait`` read every unit: the
    params came 500 units per extra query, and ORM objects cost ~0.1 ms a unit."""
    store = make_store(store_url)
    create(store, "small", 20)
    create(store, "large", 1200)
    assert count(store, lambda: store.units("small")) == count(store, lambda: store.units("large"))


def test_status_counts_units_of_many_campaigns_in_one_statement(store_url: str) -> None:
    """What ``orchard status`` shows per campaign (done/total, failed, running): the
    command read every unit of each listed campaign, a query (or more) per campaign."""
    store = make_store(store_url)
    for c in range(6):
        create(store, f"c-{c}", 3 + c)
    store.fail_units([("c-1/svm/h00000/f0", "x")])
    store.claim_for_queue(["c-2/preprocess/s00000"])
    few = count(store, lambda: store.unit_counts(["c-0", "c-1"]))
    assert count(store, lambda: store.unit_counts([f"c-{c}" for c in range(6)])) == few == 1
    counts = store.unit_counts(["c-1", "c-2", "c-5", "none"])
    assert counts == {
        "c-1": {"PENDING": 6, "FAILED": 1},
        "c-2": {"PENDING": 7, "QUEUED": 1},
        "c-5": {"PENDING": 11},
    }


def test_failing_units_sends_as_many_statements_for_300_as_for_3(store_url: str) -> None:
    """A failed preprocessing shard fails every model unit of the campaign: it was one
    UPDATE per unit (and on PostgreSQL a clock read per unit as well)."""
    store = make_store(store_url)
    few = [(p.key, "preprocessing failed: s0") for p in create(store, "few", 3) if p.stage == 1]
    many = [(p.key, f"tree shard failed: {p.key}") for p in create(store, "many", 300)]
    many = [(key, why) for key, why in many if "/svm/" in key]
    assert count(store, lambda: store.fail_units(few)) == count(
        store, lambda: store.fail_units(many)
    )
    units = {u.key: u for u in store.units("many")}
    assert all(units[key].state == "FAILED" and units[key].error == why for key, why in many)
    assert all(units[key].finished_at is not None for key, _ in many)
    assert units["many/report"].state == "PENDING"
    store.claim_for_queue(["few/report"])
    store.fail_units([("few/report", "not pending: left alone")])  # QUEUED stays QUEUED
    assert store.get_unit("few/report").state == "QUEUED"
    store.fail_units([])


def finish_models(store: Store, units: list[UnitPlan]) -> None:
    """Every model unit SUCCESS with a result, two predictions and a metric."""
    for unit in units:
        if unit.stage != 1:
            continue
        store.claim_for_queue([unit.key])
        store.start_unit(unit.key, worker="cpu@h", task_id=None)
        store.record_metrics(unit.key, 0, {"val_acc": 0.5})
        store.finish_unit(
            unit.key,
            Outcome(
                fit_seconds=2.0,
                val_acc=0.5,
                extra={"n": 1},
                predictions={"val": [Prediction("a.jpg", 0, 1, [0.1, 0.9]), Prediction("b", 1, 1)]},
            ),
        )


def test_reuse_sends_as_many_statements_for_60_units_as_for_3(store_url: str) -> None:
    """``--reuse`` copied each unit's result, predictions and metrics with a few queries
    per unit: ~5 statements a unit, 25,000 for a grid of 5,000 points."""
    store = make_store(store_url)
    finish_models(store, create(store, "old-few", 3, manifest="a" * 64))
    finish_models(store, create(store, "old-many", 60, manifest="b" * 64))
    create(store, "new-few", 3, manifest="a" * 64)
    create(store, "new-many", 60, manifest="b" * 64)
    with statements(store) as few:
        reused_few = store.reuse_finished("new-few")
    with statements(store) as many:
        reused_many = store.reuse_finished("new-many")
    assert len(reused_few) == 3 and len(reused_many) == 60
    assert len(few) == len(many)
    key = "new-many/svm/h00059/f0"
    assert reused_many[key] == "old-many/svm/h00059/f0"
    unit = store.get_unit(key)
    assert unit.state == "SUCCESS" and unit.worker == "cpu@h" and unit.finished_at is not None
    result = store.results("new-many")[key]
    assert result.val_acc == 0.5 and result.fit_seconds == 2.0
    assert result.extra == {"n": 1, "reused_from": "old-many/svm/h00059/f0"}
    assert store.predictions(key, "val") == [
        Prediction("a.jpg", 0, 1, [0.1, 0.9]),
        Prediction("b", 1, 1, None),
    ]
    assert store.metrics(key) == {"val_acc": [(0, 0.5)]}
    assert store.count_rows("new-many") == {"results": 60, "predictions": 120, "metrics": 60}
    assert store.get_unit("new-many/report").state == "PENDING"


def test_a_stage_of_thousands_is_claimed_and_marked_sent_in_bounded_statements(
    store_url: str,
) -> None:
    """A claim of a whole stage was one UPDATE with a CASE over every key (evaluated for
    each row: O(units²), 4.5 s for 12,000 units on SQLite) and three parameters per
    unit, past PostgreSQL's 65,535 beyond ~21,800 units."""
    store = make_store(store_url)
    models = 2 * KEYS_PER_STATEMENT + 7
    keys = [p.key for p in create(store, "c", models) if p.stage == 1]
    task_ids = {key: f"task-{i}" for i, key in enumerate(keys)}
    with statements(store) as sent:
        assert store.claim_for_queue(keys[::-1], task_ids) == keys[::-1]
    updates = [s for s in sent if s.lstrip().upper().startswith("UPDATE")]
    assert len(updates) == 3  # KEYS_PER_STATEMENT at a time
    assert store.claim_for_queue(keys, task_ids) == []  # won once
    with statements(store) as sent:
        store.mark_sent(list(task_ids.values()))
    assert len([s for s in sent if s.lstrip().upper().startswith("UPDATE")]) == 3
    units = {u.key: u for u in store.units("c")}
    assert all(units[k].task_id == task_ids[k] and units[k].state == "QUEUED" for k in keys)
    assert store.requeue_lost(0.0, lambda: "new") == []  # every claim was marked sent
    store.unclaim(keys)
    assert {u.state for u in store.units("c")} == {"PENDING"}


@contextmanager
def executions(store: Store) -> Iterator[list[int]]:
    """Like :func:`statements`, but an executemany counts once per parameter set: the
    work a statement per row costs, however the driver pipelines it."""
    sent: list[int] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        if not statement.lstrip().upper().startswith(("BEGIN", "COMMIT", "ROLLBACK")):
            sent.append(len(parameters) if executemany else 1)

    event.listen(store.engine, "before_cursor_execute", count)
    try:
        yield sent
    finally:
        event.remove(store.engine, "before_cursor_execute", count)


def test_cancel_and_resume_cost_as_much_for_hundreds_of_units_as_for_a_few(
    store_url: str,
) -> None:
    """Both held the campaign's lock (on SQLite the store's) while they updated unit by
    unit: 2-3 s for 20,000 units on PostgreSQL, where one statement takes 0.4 s."""

    def cancel_then_resume(cid: str, models: int) -> tuple[int, int]:
        keys = [p.key for p in create(store, cid, models)]
        store.claim_for_queue(keys[:3], {k: f"{cid}-t{i}" for i, k in enumerate(keys[:3])})
        with executions(store) as sent:
            cancelled = store.cancel_campaign(cid)
        assert cancelled.units == len(keys)
        assert sorted(cancelled.task_ids) == [f"{cid}-t{i}" for i in range(3)]
        cancelling = sum(sent)
        with executions(store) as sent:
            assert store.resume_campaign(cid) == keys  # plan order
        units = store.units(cid)
        assert {(u.state, u.attempts, u.task_id, u.error) for u in units} == {
            ("PENDING", 0, None, None)
        }
        return cancelling, sum(sent)

    store = make_store(store_url)
    assert cancel_then_resume("few", 3) == cancel_then_resume("many", KEYS_PER_STATEMENT - 10)


def test_finding_the_records_of_many_files_is_a_query_per_500(store_url: str) -> None:
    """What `orchard resume` asks to check a campaign's shards: it asked once per shard."""
    store = make_store(store_url)
    create(store, "c", 1)
    paths = [f"cache/k/shard-{i:05d}.npy" for i in range(KEYS_PER_STATEMENT + 7)]
    for i, path in enumerate(paths[::2]):
        store.record_artifact(Artifact(path, "shard", f"{i:064x}", i, "c"))
    with statements(store) as sent:
        found = store.find_artifacts([*paths, "cache/k/none.npy", paths[0]])
    assert len([s for s in sent if s.lstrip().upper().startswith("SELECT")]) == 2
    assert sorted(found) == sorted(paths[::2])
    assert found[paths[2]] == store.find_artifact(paths[2])


@pytest.mark.parametrize("many", [22_000])
def test_a_claim_beyond_the_postgres_parameter_limit(postgres_url: str, many: int) -> None:
    store = make_store(postgres_url)
    keys = [p.key for p in create(store, "c", many) if p.stage == 1]
    task_ids = {key: str(i) for i, key in enumerate(keys)}
    assert len(store.claim_for_queue(keys, task_ids)) == many  # 66,000 parameters in one
    store.mark_sent(list(task_ids.values()))
    assert sum(u.state == "QUEUED" for u in store.units("c")) == many


# ---------------------------------------------------------------- what each unit costs


def test_finishing_a_unit_sends_as_many_statements_for_3000_predictions_as_for_2(
    store_url: str,
) -> None:
    """Every grid point records its validation and test predictions: they went in as one
    multi-row VALUES per split (per 2,000 rows), which SQLAlchemy compiled anew for each
    unit, row by row (~5 ms a unit for 45 rows, longer than a tiny point's SVC fit)."""
    store = make_store(store_url)
    keys = [p.key for p in create(store, "c", 2) if p.stage == 1]

    def finish(key: str, n: int) -> None:
        store.claim_for_queue([key])
        store.start_unit(key, worker="w", task_id=None)
        predictions = {
            "val": [Prediction(f"v{i:04d}", i % 3, 0, [0.5, 0.5, 0.0]) for i in range(n)],
            "test": [Prediction(f"t{i:04d}", -1, 1) for i in range(n)],
        }
        assert store.finish_unit(key, Outcome(1.0, val_acc=0.5, predictions=predictions))

    few = count(store, lambda: finish(keys[0], 1))
    many = count(store, lambda: finish(keys[1], 3000))
    assert few == many
    assert store.predictions(keys[0], "val") == [Prediction("v0000", 0, 0, [0.5, 0.5, 0.0])]
    assert store.predictions(keys[0], "test") == [Prediction("t0000", -1, 1, None)]
    val = store.predictions(keys[1], "val")
    assert len(val) == 3000 and val[-1] == Prediction("v2999", 2, 0, [0.5, 0.5, 0.0])
    assert store.count_rows("c")["predictions"] == 2 + 6000


def sqlite_steps(store: Store, call: Callable[[], object]) -> int:
    """How many SQLite virtual machine instructions ``call``'s statements ran (in
    thousands): the work a query does, whatever the machine's speed."""
    steps = [0]

    def tick() -> int:
        steps[0] += 1
        return 0  # go on

    def handler(conn, *_rest) -> None:  # noqa: ANN001
        conn.connection.dbapi_connection.set_progress_handler(tick, 1000)

    event.listen(store.engine, "before_cursor_execute", handler)
    try:
        call()
    finally:
        event.remove(store.engine, "before_cursor_execute", handler)
    return steps[0]


def test_after_each_unit_whether_a_stage_may_open_costs_the_same_for_3000_units_as_for_30(
    sqlite_url: str,
) -> None:
    """``advance`` asks after every unit. It counted the unfinished units by stage, a
    row per unit still queued: O(units) per unit, O(units²) over a grid."""
    store = make_store(sqlite_url)
    steps = {}
    for models in (30, 3000):
        cid = f"c{models}"
        units = create(store, cid, models)
        shards = [u.key for u in units if u.stage == 0]
        store.claim_for_queue(shards)
        for key in shards:
            store.start_unit(key, worker="w", task_id=None)
            store.finish_unit(key, Outcome(1.0))
        store.claim_for_queue([u.key for u in units if u.stage == 1])
        assert not store.stage_may_open(cid)  # the model stage runs; the report waits
        steps[models] = sqlite_steps(store, lambda cid=cid: store.stage_may_open(cid))
    assert steps[3000] <= steps[30] + 1, steps


# ---------------------------------------------------------------- lookups across the store


def full_scans(
    store: Store, sent: list[tuple[str, object, bool]], call: Callable[[], object]
) -> list[str]:
    """The SQLite query plan steps of ``call``'s statements that read a whole table of
    units or artifacts (``SCAN units``, with or without an index to walk)."""
    sent.clear()
    call()
    found = []
    db = sqlite3.connect(make_url(store.url).database)
    try:
        for statement, params, executemany in sent:
            if statement.lstrip().upper().startswith(("BEGIN", "COMMIT")):
                continue
            first = params[0] if executemany else params
            for *_ids, detail in db.execute(f"EXPLAIN QUERY PLAN {statement}", first):
                words = detail.split()
                if words[0] == "SCAN" and words[1] in ("units", "artifacts"):
                    found.append(f"{detail} in {statement.split()[0]} …")
    finally:
        db.close()
    return found


def test_what_every_worker_and_status_poll_asks_of_the_whole_store_uses_indexes(
    sqlite_url: str,
) -> None:
    """Asked of every unit of every campaign in the store, each lease period by every
    worker (requeue_lost), by each claim's mark_sent, and by each status poll
    (untaken_queues, the report's artifact): they read every unit (or artifact) ever
    recorded, so they slowed with each finished campaign kept in the store."""
    store = make_store(sqlite_url)
    for c in range(3):  # finished campaigns, kept
        units = create(store, f"old-{c}", 5, manifest="a" * 64)
        store.claim_for_queue([u.key for u in units], {u.key: f"{c}-{u.key}" for u in units})
    keys = [p.key for p in create(store, "c", 5, manifest="a" * 64)]
    store.claim_for_queue(keys[:2], {k: f"t-{k}" for k in keys[:2]})
    long_ago = utcnow() - timedelta(hours=1)
    with store.engine.begin() as conn:
        conn.execute(  # the old ones ran long ago
            update(UnitRow)
            .where(UnitRow.campaign_id.like("old-%"))
            .values(state="SUCCESS", started_at=long_ago, finished_at=long_ago)
        )
        conn.execute(update(CampaignRow).where(CampaignRow.id.like("old-%")).values(state="DONE"))
        conn.execute(  # two of the new one's claimed and sent long ago, never taken
            update(UnitRow).where(UnitRow.key.in_(keys[:2])).values(queued_at=long_ago)
        )
    store.mark_sent([f"t-{k}" for k in keys[:2]])
    sent: list[tuple[str, object, bool]] = []
    event.listen(
        store.engine,
        "before_cursor_execute",
        lambda conn, cursor, statement, params, context, many: sent.append(
            (statement, params, many)
        ),
    )
    calls = {
        "mark_sent": lambda: store.mark_sent([f"t-{keys[0]}"]),
        "claim": lambda: store.claim_for_queue(keys[2:4], {k: f"t-{k}" for k in keys[2:4]}),
        "untaken_queues": lambda: store.untaken_queues("c", 60),
        "requeue_lost": lambda: store.requeue_lost(
            60, lambda: "new", idle_consumer_of=["preprocess", "cpu"], dropped_after=600
        ),
        "report artifact": lambda: store.artifacts("c", kind="report"),
        "manifest": lambda: store.reuse_finished("c"),
        "unit_counts": lambda: store.unit_counts(["c", "old-1"]),
    }
    scans = {name: full_scans(store, sent, call) for name, call in calls.items()}
    assert scans == {name: [] for name in calls}
    assert store.untaken_queues("c", 60).keys() == {"preprocess"}  # still finds them
    lost = store.requeue_lost(60, lambda: "new", idle_consumer_of=["preprocess"], dropped_after=0)
    assert sorted(u.key for u in lost) == sorted(keys[:2])
