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

from sqlalchemy import event, make_url, update

from db.models import CampaignRow, UnitRow, utcnow
from db.store import Artifact, Store
from shared.plan import UnitPlan


def make_store(url: str) -> Store:
    store = Store(url)
    store.upgrade()
    return store


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
    }
    scans = {name: full_scans(store, sent, call) for name, call in calls.items()}
    assert scans == {name: [] for name in calls}
    assert store.untaken_queues("c", 60).keys() == {"preprocess"}  # still finds them
    lost = store.requeue_lost(60, lambda: "new", idle_consumer_of=["preprocess"], dropped_after=0)
    assert sorted(u.key for u in lost) == sorted(keys[:2])
