"""advance's shortcut: the store says "no stage may open" (``Store.stage_may_open``)
only when reading every unit (``next_actions``) would find nothing to do either."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import bindparam, select, update

from db.models import UnitRow
from db.store import Store
from shared.plan import TERMINAL, UnitPlan, UnitState, next_actions

STATES = ("PENDING", "QUEUED", "RUNNING", "SUCCESS", "FAILED", "CANCELLED")

#: a preprocess / model (with a tree-sharded forest) / merge / report plan
KEYS = [
    (0, "c/preprocess/s0"),
    (0, "c/preprocess/s1"),
    (1, "c/svm/a/f0"),
    (1, "c/rf/b/f0/t0"),
    (1, "c/rf/b/f0/t1"),
    (2, "c/rf/b/f0"),
    (3, "c/report"),
]


def campaign_store(url: str, campaign_id: str, units: list[UnitPlan]) -> Store:
    """A new SQLite store holding one campaign of ``units``."""
    store = Store(url)
    store.upgrade()
    store.create_campaign(
        campaign_id,
        name=campaign_id,
        source=f"{campaign_id}.toml",
        digest="d",
        spec={},
        classes=["A"],
        units=units,
    )
    return store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    units = [UnitPlan(key, "svm", stage, None, {}, key) for stage, key in KEYS]
    return campaign_store(f"sqlite:///{tmp_path / 'store.db'}", "c", units)


def may_open(store: Store, units: list[UnitState]) -> bool:
    """``store.stage_may_open`` with the campaign's units in these states."""
    with store.engine.begin() as conn:
        conn.execute(
            update(UnitRow).where(UnitRow.key == bindparam("k")).values(state=bindparam("s")),
            [{"k": u.key, "s": u.state} for u in units],
        )
    return store.stage_may_open("c")


def lowest_unfinished_stage_has_pending(units: list[UnitState]) -> bool:
    """The rule as advance applied it before, from the counts of unfinished units."""
    unfinished = [u for u in units if u.state not in TERMINAL]
    if not unfinished:
        return True
    lowest = min(u.stage for u in unfinished)
    return any(u.state == "PENDING" for u in unfinished if u.stage == lowest)


def test_the_shortcut_agrees_with_next_actions(store: Store) -> None:
    seen = {True: 0, False: 0}
    rng = random.Random(0)
    for _ in range(600):
        units = [UnitState(key, stage, rng.choice(STATES)) for stage, key in KEYS]
        actions = next_actions(units)
        acts = bool(actions.enqueue or actions.fail) or all(u.state in TERMINAL for u in units)
        opens = may_open(store, units)
        assert opens == lowest_unfinished_stage_has_pending(units), units
        if not opens:
            assert not acts, units  # the shortcut never skips real work
        seen[opens] += 1
    assert seen[False] > 50 and seen[True] > 50  # both branches were exercised


def test_a_running_stage_and_the_next_one(store: Store) -> None:
    def states(*per_stage: str) -> list[UnitState]:
        return [UnitState(key, stage, per_stage[stage]) for stage, key in KEYS]

    assert not may_open(store, states("SUCCESS", "RUNNING", "PENDING", "PENDING"))
    assert may_open(store, states("SUCCESS", "SUCCESS", "PENDING", "PENDING"))  # merges open
    assert may_open(store, states("SUCCESS", "FAILED", "CANCELLED", "PENDING"))  # the report
    assert may_open(store, states("SUCCESS", "SUCCESS", "SUCCESS", "SUCCESS"))  # close it
    for a, b in itertools.product(("QUEUED", "RUNNING"), repeat=2):
        units = states("SUCCESS", "SUCCESS", "PENDING", "PENDING")
        units[2:4] = [UnitState(units[2].key, 1, a), UnitState(units[3].key, 1, b)]
        assert not may_open(store, units)
    # a resumed shard PENDING below a model unit still running (live lease): it opens
    units = states("SUCCESS", "RUNNING", "PENDING", "PENDING")
    units[0] = UnitState(units[0].key, 0, "PENDING")
    assert may_open(store, units)


def a_big_stage(tmp_path: Path) -> tuple[Store, Any, list[str]]:
    """Campaign g: a stage of 250 SVM units (more than two send chunks) and a report, in
    a SQLite store; an app on a filesystem broker under ``tmp_path / "broker"``."""
    from shared.settings import Settings
    from workers.app import make_app

    url = f"sqlite:///{tmp_path / 'store.db'}"
    keys = [f"g/svm/p{i:03d}/f0" for i in range(250)]
    units = [UnitPlan(key, "svm", 1, 0, {}, key) for key in keys]
    store = campaign_store(url, "g", [*units, UnitPlan("g/report", "report", 3, None, {}, "r")])
    settings = Settings(
        home=tmp_path,
        broker_url=f"filesystem://{tmp_path / 'broker'}",
        database_url=url,
        artifacts=tmp_path / "artifacts",
    )
    return store, make_app(settings, with_tasks=False), keys


def test_a_broker_lost_mid_stage_leaves_the_sent_chunks_sent_and_the_rest_to_send(
    tmp_path: Path,
    monkeypatch,  # noqa: ANN001
) -> None:
    """The broker goes away after the first chunk: that chunk stays QUEUED and marked
    sent (its messages are out), the others go back to PENDING, and the next advance
    sends those, once each."""
    from celery import group

    from scheduler import canvas

    store, app, keys = a_big_stage(tmp_path)
    calls: list[int] = []

    def flaky_group(signatures):  # noqa: ANN001, ANN202
        calls.append(len(signatures))
        if len(calls) == 2:
            raise ConnectionError("broker lost")
        return group(signatures)

    monkeypatch.setattr(canvas, "group", flaky_group)
    with pytest.raises(ConnectionError):
        canvas.advance(store, app, "g")
    with store.engine.connect() as conn:
        rows = {r.key: r for r in conn.execute(select(UnitRow).where(UnitRow.key.in_(keys)))}
    assert [k for k in keys if rows[k].state == "QUEUED"] == keys[:100]
    assert all(rows[k].sent_at is not None for k in keys[:100])
    assert all(rows[k].state == "PENDING" and rows[k].task_id is None for k in keys[100:])

    sent = canvas.advance(store, app, "g")  # the broker is back: a redelivery advances
    assert sorted(sent) == keys[100:]
    assert {u.state for u in store.units("g") if u.key in keys} == {"QUEUED"}
    messages = [json.loads(m.read_bytes()) for m in (tmp_path / "broker").rglob("*.msg")]
    # one message per unit, under the task id its claim recorded
    task_ids = sorted(m["headers"]["id"] for m in messages)
    assert task_ids == sorted(u.task_id for u in store.units("g") if u.key in keys)
    assert len(set(task_ids)) == 250


@pytest.mark.parametrize(
    "stop",
    [
        ValueError("cannot build this message"),
        KeyboardInterrupt(),  # Ctrl-C as `orchard submit` sends
        pytest.param("SIGTERM", id="Stopped"),
    ],
    ids=type,
)
def test_a_message_that_cannot_be_built_leaves_its_chunk_and_the_rest_to_send(
    tmp_path: Path,
    monkeypatch,  # noqa: ANN001
    stop: BaseException | str,
) -> None:
    """An error (or the sender stopped: Ctrl-C, SIGTERM) while the second chunk's
    messages are built (before anything of it is published): the first chunk stays
    sent, that chunk and the rest go back to PENDING, not QUEUED and unsent for the
    reaper to find a lease period later, nor for a `submit --id` retried to miss."""
    import signal

    from scheduler import canvas
    from scheduler.stopsignals import Stopped

    if stop == "SIGTERM":
        stop = Stopped(signal.SIGTERM)
    store, app, keys = a_big_stage(tmp_path)
    real = canvas.unit_signature

    def the_150th_fails(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if args[4] == keys[149]:
            raise stop
        return real(*args, **kwargs)

    monkeypatch.setattr(canvas, "unit_signature", the_150th_fails)
    with pytest.raises(type(stop)):
        canvas.advance(store, app, "g")
    states = {u.key: u.state for u in store.units("g")}
    assert [k for k in keys if states[k] == "QUEUED"] == keys[:100]
    assert all(states[k] == "PENDING" for k in keys[100:])
    assert len(list((tmp_path / "broker").rglob("*.msg"))) == 100


def test_a_big_stage_is_marked_sent_chunk_by_chunk(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """Each chunk is marked sent once published: a claim left unmarked for a lease period
    is sent again by the workers, which take its sender for dead."""
    from scheduler import canvas

    store, app, keys = a_big_stage(tmp_path)
    marked: list[int] = []
    real = store.mark_sent
    monkeypatch.setattr(store, "mark_sent", lambda ids: (marked.append(len(ids)), real(ids)))
    sent = canvas.advance(store, app, "g")
    assert sorted(sent) == keys
    assert marked == [100, 100, 50]  # canvas.SEND_CHUNK at a time
    assert sum(u.state == "QUEUED" for u in store.units("g")) == 250
    published = list((tmp_path / "broker").rglob("*.msg"))
    assert len(published) == 250


def test_units_failed_for_a_failed_shard_are_named_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """They never run, so no worker logs them as it does every other failure: advance,
    which fails them, says so in one line per cause."""
    from scheduler.canvas import advance
    from shared.settings import Settings
    from workers.app import make_app

    url = f"sqlite:///{tmp_path / 'store.db'}"
    keys = [f"p/svm/q{i}/f0" for i in range(5)]
    store = campaign_store(
        url,
        "p",
        [
            UnitPlan("p/preprocess/s0", "preprocess", 0, None, {}, "s"),
            *(UnitPlan(key, "svm", 1, 0, {}, key) for key in keys),
            UnitPlan("p/report", "report", 3, None, {}, "r"),
        ],
    )
    settings = Settings(
        home=tmp_path,
        broker_url=f"filesystem://{tmp_path / 'broker'}",
        database_url=url,
        artifacts=tmp_path / "artifacts",
    )
    with make_app(settings, with_tasks=False) as app:
        assert advance(store, app, "p") == ["p/preprocess/s0"]
        assert store.fail_unit("p/preprocess/s0", "…/000.png: not an image")
        with caplog.at_level("WARNING", logger="scheduler.canvas"):
            assert advance(store, app, "p") == ["p/report"]
    store.dispose()
    assert [r.getMessage() for r in caplog.records] == [
        "p/svm/q0/f0, p/svm/q1/f0, p/svm/q2/f0 and 2 more: failed without running "
        "(preprocessing failed: p/preprocess/s0)"
    ]
