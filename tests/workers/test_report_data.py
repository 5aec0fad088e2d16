"""The report task's reading of the store: best point per family, the vote, confusions."""

from __future__ import annotations

import pytest

from db.store import Outcome, Prediction, Store
from shared.plan import plan_units
from shared.spec import parse_campaign
from workers.tasks.report import build_report_data

SPEC = {
    "name": "r",
    "folds": 3,
    "dataset": {"kind": "synthetic"},
    "cnn": {"folds": 3, "lr": [0.01, 0.02]},
    "svm": {"C": 1.0},
}
TEST_IDS = ["t1.jpg", "t2.jpg", "t3.jpg", "t4.jpg"]


@pytest.fixture
def store(sqlite_url: str) -> Store:
    store = Store(sqlite_url)
    store.upgrade()
    campaign = parse_campaign(SPEC, source="test")
    store.create_campaign(
        "r-1",
        name="r",
        source="r.toml",
        digest=campaign.digest(),
        spec=campaign.model_dump(mode="json"),
        classes=["A", "B", "C"],
        units=plan_units("r-1", campaign, [(0, 4)]),
    )
    return store


def finish(
    store: Store, key: str, val_acc: float, test_preds: list[int], labels: list[int]
) -> None:
    store.start_unit(key, worker="w@h", task_id=None)
    store.finish_unit(
        key,
        Outcome(
            fit_seconds=2.0,
            train_acc=1.0,
            val_acc=val_acc,
            val_confusion=[[1, 0, 0], [0, 1, 0], [0, 0, 1]],
            predictions={
                "test": [
                    Prediction(i, lab, p)
                    for i, lab, p in zip(TEST_IDS, labels, test_preds, strict=True)
                ]
            },
        ),
    )


def test_vote_of_the_best_point(store: Store) -> None:
    units = {u.key: u for u in store.units("r-1")}
    cnn = [u for u in units.values() if u.family == "cnn"]
    first, second = sorted(
        {u.params_hash for u in cnn}, key=lambda h: [u.params_hash for u in cnn].index(h)
    )
    labels = [0, 1, 2, 1]
    # point 1: mean val 0.5; point 2: mean val 0.8 -> the blend uses point 2's three folds
    for u in cnn:
        if u.params_hash == first:
            finish(store, u.key, 0.5, [0, 0, 0, 0], labels)
    votes = {0: [0, 1, 2, 0], 1: [0, 1, 1, 0], 2: [1, 1, 2, 2]}  # column votes -> [0, 1, 2, 0]
    for u in cnn:
        if u.params_hash == second:
            finish(store, u.key, 0.8, votes[u.fold], labels)
    (svm,) = [u for u in units.values() if u.family == "svm"]
    store.start_unit(svm.key, worker="w@h", task_id=None)
    store.fail_unit(svm.key, "ValueError: n_components too large")

    data = build_report_data(store, "r-1")

    rows = {row.family: row for row in data.families}
    assert rows["cnn"].params["lr"] == 0.02 and rows["cnn"].val_acc == pytest.approx(0.8)
    assert rows["cnn"].succeeded == 6 and rows["cnn"].units == 6
    assert rows["svm"].succeeded == 0 and rows["svm"].best_key == ""
    (blend,) = data.blends
    assert blend.members == 3 and blend.method == "vote"
    assert blend.test_acc == pytest.approx(3 / 4)  # [0, 1, 2, 0] against [0, 1, 2, 1]
    assert data.confusions["cnn"].matrix == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert "svm" not in data.confusions
    failed = [u for u in data.units if u.state == "FAILED"]
    assert [u.error for u in failed] == ["ValueError: n_components too large"]


def test_without_test_labels_the_confusion_pools_validation(store: Store) -> None:
    for u in store.units("r-1"):
        if u.family in ("cnn", "svm"):
            finish(store, u.key, 0.6, [0, 1, 2, 0], [-1, -1, -1, -1])
    data = build_report_data(store, "r-1")
    assert data.blends[0].test_acc is None
    cnn = data.confusions["cnn"]
    assert cnn.split == "val" and cnn.matrix == [[3, 0, 0], [0, 3, 0], [0, 0, 3]]
