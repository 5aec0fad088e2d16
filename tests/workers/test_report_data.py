"""The report task's reading of the store: best points, tables, blends, curves, timeline,
submission and the LIME glue, on a real SQLite store."""

from __future__ import annotations

import dataclasses
import io
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from statistics import mean

import numpy as np
import pytest
import torch

from db.store import Artifact, Outcome, Prediction, Store
from shared.artifacts import atomic_write_bytes
from shared.cnn import build_model
from shared.manifest import NO_FOLD, Entry, Manifest
from shared.plan import plan_units
from shared.preprocess import shard_name, write_shard
from shared.report import (
    MAX_POINT_ROWS,
    ReportData,
    render_markdown,
    table_csvs,
    write_report,
)
from shared.settings import Settings
from shared.spec import CnnParams, parse_campaign
from shared.times import utc_iso
from tests.db.test_store import deliver
from workers.reporting.blend import Predicted, blend_members
from workers.reporting.data import build_report_data
from workers.reporting.units import best_fold, in_study_order

SPEC = {
    "name": "r",
    "folds": 3,
    "dataset": {"kind": "synthetic"},
    "cnn": {"folds": 3, "lr": [0.01, 0.02]},
    "svm": {"C": 1.0},
}
TEST_IDS = ["t1.jpg", "t2.jpg", "t3.jpg", "t4.jpg"]
VAL_IDS = {f: [f"v{f}.jpg"] for f in range(5)}


def make_store(url: str, spec: dict, campaign_id: str = "r-1") -> Store:
    store = Store(url)
    store.upgrade()
    campaign = parse_campaign(spec, source="test")
    store.create_campaign(
        campaign_id,
        name=spec["name"],
        source="r.toml",
        digest=campaign.digest(),
        spec=campaign.model_dump(mode="json"),
        classes=["A", "B", "C"],
        units=plan_units(campaign_id, campaign, [(0, 4)]),
    )
    return store


@pytest.fixture
def store(sqlite_url: str) -> Store:
    return make_store(sqlite_url, SPEC)


def finish(
    store: Store,
    key: str,
    val_acc: float,
    test_preds: list[int],
    labels: list[int],
    *,
    probs: list[list[float]] | None = None,
    fold: int = 0,
    extra: dict | None = None,
    artifacts: list[Artifact] | None = None,
) -> None:
    deliver(store, key, worker="w@h", task_id=None)
    store.finish_unit(
        key,
        Outcome(
            fit_seconds=2.0,
            train_acc=1.0,
            val_acc=val_acc,
            test_acc=None,
            val_confusion=[[1, 0, 0], [0, 1, 0], [0, 0, 1]],
            extra=extra or {},
            predictions={
                "test": [
                    Prediction(i, lab, p, None if probs is None else probs[j])
                    for j, (i, lab, p) in enumerate(zip(TEST_IDS, labels, test_preds, strict=True))
                ],
                "val": [Prediction(VAL_IDS[fold][0], fold, test_preds[0])],
            },
            artifacts=artifacts or [],
        ),
    )


def cnn_points(store: Store) -> tuple[list, str, str]:
    cnn = [u for u in store.units("r-1") if u.family == "cnn"]
    order = list(dict.fromkeys(u.params_hash for u in cnn))
    return cnn, order[0], order[1]


def test_vote_of_the_best_point(store: Store) -> None:
    cnn, first, second = cnn_points(store)
    labels = [0, 1, 2, 1]
    # point 1: mean val 0.5; point 2: mean val 0.8 -> the blend uses point 2's three folds
    for u in cnn:
        if u.params_hash == first:
            finish(store, u.key, 0.5, [0, 0, 0, 0], labels, fold=u.fold)
    votes = {0: [0, 1, 2, 0], 1: [0, 1, 1, 0], 2: [1, 1, 2, 2]}  # column votes -> [0, 1, 2, 0]
    for u in cnn:
        if u.params_hash == second:
            finish(store, u.key, 0.8, votes[u.fold], labels, fold=u.fold)
    (svm,) = [u for u in store.units("r-1") if u.family == "svm"]
    deliver(store, svm.key, worker="w@h", task_id=None)
    store.fail_unit(svm.key, "ValueError: n_components too large")

    data = build_report_data(store, "r-1")

    rows = {row.family: row for row in data.families}
    assert rows["cnn"].params["lr"] == 0.02 and rows["cnn"].val_acc == pytest.approx(0.8)
    assert rows["cnn"].succeeded == 6 and rows["cnn"].units == 6
    assert rows["svm"].succeeded == 0 and rows["svm"].best_key == ""
    blends = {b.name: b for b in data.blends}
    assert set(blends) == {"CNN 3-fold vote", "CNN 3-fold mean"}  # [blend] method = "both"
    vote = blends["CNN 3-fold vote"]
    assert vote.members == 3 and vote.method == "vote"
    assert vote.test_acc == pytest.approx(3 / 4)  # [0, 1, 2, 0] against [0, 1, 2, 1]
    # 3 of 4: Wilson's 95 % interval, wide on four images
    assert vote.test_images == 4
    assert vote.test_ci == (pytest.approx(0.3006, abs=1e-4), pytest.approx(0.9544, abs=1e-4))
    # these folds recorded labels only: no probabilities to average
    assert blends["CNN 3-fold mean"].test_acc is None
    assert blends["CNN 3-fold mean"].test_ci is None
    assert "n/a" in blends["CNN 3-fold mean"].note
    assert data.best_blend == "CNN 3-fold vote" and data.test_labelled
    assert data.confusions["cnn"].matrix == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    assert "svm" not in data.confusions
    assert data.submission is None  # labelled test set: nothing to submit
    failed = [u for u in data.units if u.state == "FAILED"]
    assert [u.error for u in failed] == ["ValueError: n_components too large"]

    # the experiment tables: one row per point, lr swept, the best point marked
    exp = {e.family: e for e in data.experiments}
    assert [p.params["lr"] for p in exp["cnn"].points] == [0.01, 0.02]
    assert exp["cnn"].best_key == f"r-1/cnn/{second}"
    assert exp["cnn"].points[1].val_acc == pytest.approx(0.8)
    assert exp["cnn"].points[1].val_spread == pytest.approx(0.0)
    assert exp["svm"].points[0].succeeded == 0 and exp["svm"].best_key is None
    (sweep,) = data.sweeps
    assert sweep.param == "lr" and sweep.xs == [0.01, 0.02]
    assert sweep.series["val acc"] == pytest.approx([0.5, 0.8])
    assert "test acc" not in sweep.series  # these units recorded no test accuracy

    # the timeline: every unit that ran, on its worker; the failed one marked
    assert len(data.timeline) == 7
    assert {b.worker for b in data.timeline} == {"w@h"}
    assert all(b.end >= b.start >= 0 for b in data.timeline)
    assert [b.state for b in data.timeline if b.family == "svm"] == ["FAILED"]

    md = render_markdown(data)
    assert "Ranked on the folds that succeeded" not in md  # the CNN's three folds did
    assert "| CNN 3-fold vote | vote | 3 |" not in md  # the best blend is bold
    assert "| **CNN 3-fold vote** | **vote** | **3** | **75.000%**" in md


def test_without_test_labels_pools_validation_and_writes_a_submission(
    store: Store, tmp_path: Path
) -> None:
    for u in store.units("r-1"):
        if u.family in ("cnn", "svm"):
            finish(store, u.key, 0.6, [0, 1, 2, 0], [-1, -1, -1, -1], fold=u.fold)
    data = build_report_data(store, "r-1")
    assert all(b.test_acc is None and b.test_ci is None for b in data.blends)
    assert not data.test_labelled
    cnn = data.confusions["cnn"]
    assert cnn.split == "val" and cnn.matrix == [[3, 0, 0], [0, 3, 0], [0, 0, 3]]
    # each fold's own model on its held-out images, added up: not a blend
    assert cnn.title == "CNN best point, its 3 folds' models pooled (validation)"
    # out-of-fold: the three folds each predicted class 0 for their one val image
    vote = next(b for b in data.blends if b.name == "CNN 3-fold vote")
    assert vote.val_acc == pytest.approx(1 / 3)
    assert data.best_blend is not None
    assert data.submission is not None
    assert data.submission.rows == [
        ("t1.jpg", "A"),
        ("t2.jpg", "B"),
        ("t3.jpg", "C"),
        ("t4.jpg", "A"),
    ]

    files = write_report(data, tmp_path / "report")
    assert files.submission is not None
    lines = files.submission.path.read_text().splitlines()
    assert lines[0] == "image_id,label" and lines[1:] == [
        "t1.jpg,A",
        "t2.jpg,B",
        "t3.jpg,C",
        "t4.jpg,A",
    ]


def test_unlabelled_images_beside_a_labelled_test_set_are_submitted(store: Store) -> None:
    """Unlabelled images of the train or dev CSVs are predicted with the test split: the
    labelled ones are scored, the unlabelled ones go to submission.csv."""
    for u in store.units("r-1"):
        if u.family in ("cnn", "svm"):
            finish(store, u.key, 0.6, [0, 1, 2, 0], [0, -1, 2, -1], fold=u.fold)
    data = build_report_data(store, "r-1")
    assert data.test_labelled
    vote = next(b for b in data.blends if b.name == "CNN 3-fold vote")
    assert vote.test_acc == pytest.approx(1.0)  # t1 and t3, the labelled ones
    assert data.submission is not None
    assert data.submission.rows == [("t2.jpg", "B"), ("t4.jpg", "A")]


def test_probability_mean_and_cross_family_blend(sqlite_url: str) -> None:
    spec = {
        "name": "x",
        "folds": 2,
        "dataset": {"kind": "synthetic"},
        "cnn": {"folds": 2},
        "svm": {},
        "rf": {},
        "blend": {"families": ["cnn", "svm", "rf"]},
    }
    store = make_store(sqlite_url, spec, "x-1")
    labels = [0, 1, 2, 1]
    units = {
        u.family: [x for x in store.units("x-1") if x.family == u.family]
        for u in store.units("x-1")
    }
    # the CNN folds disagree on t4; their probabilities settle it for class 1
    cnn_probs = {
        0: [[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.45, 0.4, 0.15]],
        1: [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.2, 0.2, 0.6], [0.05, 0.9, 0.05]],
    }
    for u in units["cnn"]:
        preds = np.argmax(cnn_probs[u.fold], axis=1).tolist()
        finish(store, u.key, 0.9, preds, labels, probs=cnn_probs[u.fold], fold=u.fold)
    (svm,) = units["svm"]
    finish(store, svm.key, 0.7, [2, 1, 2, 2], labels)  # labels only
    (rf,) = units["rf"]
    rf_probs = [[0.6, 0.3, 0.1], [0.3, 0.4, 0.3], [0.3, 0.3, 0.4], [0.5, 0.2, 0.3]]
    finish(store, rf.key, 0.6, [0, 1, 2, 0], labels, probs=rf_probs, extra={"oob_score": 0.81})

    data = build_report_data(store, "x-1")
    blends = {b.name: b for b in data.blends}
    # the vote of two folds ties on t4 (0 vs 1): not to the lowest class, 0, but to the
    # tied class of highest mean probability, 1, which is right
    assert blends["CNN 2-fold vote"].test_acc == pytest.approx(1.0)
    assert blends["CNN 2-fold vote"].note == "ties by mean probability"
    assert blends["CNN 2-fold mean"].test_acc == pytest.approx(1.0)
    # one fold, nothing blended: one row each, a single model, whatever [blend] method says
    assert "SVM best point (mean)" not in blends and "RF best point (mean)" not in blends
    assert blends["SVM best point"].method == "single" and blends["SVM best point"].members == 1
    assert blends["SVM best point"].test_acc == pytest.approx(2 / 4)
    assert blends["RF best point"].test_acc == pytest.approx(3 / 4)
    cross = blends["CNN + SVM + RF vote"]
    # per image: CNN vote [0,1,2,1], SVM [2,1,2,2], RF [0,1,2,0] -> t1: 0, t4: three-way tie
    # broken by the CNN (best validation accuracy): 1 -> 4/4 (the lowest class: 3/4)
    assert cross.members == 3 and cross.test_acc == pytest.approx(1.0)
    assert "ties go to CNN" in cross.note
    assert blends["CNN + SVM + RF mean"].test_acc is None
    # chosen on validation. The CNN's two folds held out v0 (right) and v1 (wrong): 1/2;
    # the one-fold SVM and RF, and so the three-family vote, only v0. All are compared on
    # v0, where the CNN vote (the first row), RF and the three-family vote are right (the
    # CNN mean has no validation probabilities here): the CNN's 1/2 over more images
    # does not count against it
    assert data.best_by == "val"
    assert blends["RF best point"].val_acc == pytest.approx(1.0)
    assert blends["RF best point"].val_images == 1
    assert blends["CNN 2-fold vote"].val_acc == pytest.approx(1 / 2)
    assert blends["CNN 2-fold vote"].val_images == 2
    assert data.best_blend == "CNN 2-fold vote" and data.best_compared_on == 1
    assert data.best_compared_acc == pytest.approx(1.0)
    assert data.best_tied_with == ["RF best point", "CNN + SVM + RF vote"]
    md = render_markdown(data)
    assert (
        "- Best model: **CNN 2-fold vote** (a vote of 2, chosen by out-of-fold validation "
        "accuracy on the 1 image that every blend predicted; OOF val acc 100.000% on them, "
        "50.000% on its own 2, test acc 100.000%)" in md
    )
    # every blend's accuracy on the common image, in a column of its own
    common = {b.name: b.common_acc for b in data.blends}
    assert common["CNN 2-fold vote"] == pytest.approx(1.0)
    assert common["SVM best point"] == pytest.approx(0.0)  # v0 held class 0; the SVM said 2
    assert "| OOF val acc on the 1 common image |" in md
    assert data.experiments[2].note is None  # no augmented siblings: no OOB note
    assert data.experiments[2].points[0].extras["oob_score"] == pytest.approx(0.81)


def test_a_vote_of_two_families_says_it_is_the_better_family_s_predictions(
    sqlite_url: str,
) -> None:
    """Two voters agree or tie, and every tie goes to the family of the best validation
    accuracy: the vote is that family's predictions, image for image, and says so."""
    spec = {
        "name": "x",
        "folds": 2,
        "dataset": {"kind": "synthetic"},
        "svm": {},
        "rf": {},
        "blend": {"families": ["svm", "rf"]},
    }
    store = make_store(sqlite_url, spec, "x-1")
    labels = [0, 1, 2, 1]
    (svm,) = [u for u in store.units("x-1") if u.family == "svm"]
    finish(store, svm.key, 0.7, [2, 1, 2, 2], labels)
    (rf,) = [u for u in store.units("x-1") if u.family == "rf"]
    finish(store, rf.key, 0.9, [0, 1, 0, 1], labels)
    blends = {b.name: b for b in build_report_data(store, "x-1").blends}
    vote = blends["SVM + RF vote"]
    assert vote.note == (
        "two families: each disagreement is a tie, which goes to RF, so the vote is RF's "
        "predictions"
    )
    # RF's own: t1 and t2 right, t3 wrong (0 for 2), t4 right
    assert vote.test_acc == blends["RF best point"].test_acc == pytest.approx(3 / 4)


def test_blend_members_tie_break_and_alignment() -> None:
    a = Predicted(["x", "y", "z"], np.array([0, 1, 2]), np.array([0, 1, 2]), None)
    b = Predicted(["z", "y"], np.array([2, 1]), np.array([1, 0]), None)
    vote, averaged = blend_members([a, b], 3, tie_break=1)
    assert vote.ids == ["y", "z"]  # only the images both predicted
    assert vote.preds.tolist() == [0, 1]  # every tie goes to member 1
    assert averaged is None


def test_learning_curves_from_per_epoch_metrics(store: Store) -> None:
    cnn, first, second = cnn_points(store)
    for u in cnn:
        val = 0.5 if u.params_hash == first else 0.8
        for epoch in range(3):
            store.record_metrics(
                u.key,
                epoch,
                {
                    "train_loss": 1.0 / (epoch + 1),
                    "train_acc": 0.5 + 0.1 * epoch,
                    "val_loss": 1.1 / (epoch + 1),
                    "val_acc": val - 0.1 * (2 - epoch),
                    "epoch_seconds": 0.5,
                },
            )
        finish(store, u.key, val, [0, 1, 2, 0], [0, 1, 2, 1], fold=u.fold)
    data = build_report_data(store, "r-1")
    titles = [c.title for c in data.curves]
    assert len(data.curves) == 3, titles  # best point, best with lr=0.01, lr comparison
    best = data.curves[0]
    assert "best point" in best.title
    assert sorted(best.series) == ["fold 0", "fold 1", "fold 2"]
    assert best.series["fold 0"]["val_acc"] == [
        (0, pytest.approx(0.6)),
        (1, pytest.approx(0.7)),
        (2, pytest.approx(0.8)),
    ]
    comparison = data.curves[-1]
    assert set(comparison.series) == {"0.02", "0.01"}
    assert set(comparison.series["0.01"]) == {"val_acc", "val_loss"}


# --------------------------------------------------------------------------- LIME glue


def test_lime_explains_the_best_cnn_fold(sqlite_url: str, tmp_path: Path) -> None:
    spec = {
        "name": "l",
        "folds": 2,
        "dataset": {"kind": "synthetic"},
        "cnn": {"folds": 2, "image_size": 32, "width": 0.125},
        "report": {"lime_samples": 20, "lime_per_class": 1},
    }
    store = make_store(sqlite_url, spec, "l-1")
    settings = Settings(
        home=tmp_path, broker_url="memory://", database_url=sqlite_url, artifacts=tmp_path / "art"
    )
    # the image cache: 6 test images at 64 px in one shard, recorded like preprocessing does
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 64, 64, 3), dtype=np.uint8)
    cache_key = "k" * 16
    rel = f"cache/{cache_key}/{shard_name(0)}"
    shard = write_shard(settings.artifacts / rel, images)
    store.record_artifact(Artifact(rel, "shard", shard.sha256, shard.size, "l-1"))
    entries = tuple(
        Entry(f"t{i}.jpg", "ABC"[i % 3], "test", f"/data/t{i}.jpg", NO_FOLD) for i in range(6)
    )
    manifest = Manifest(("A", "B", "C"), entries, "fp", cache_key, 64, 16)

    torch.manual_seed(0)
    params = CnnParams(image_size=32, width=0.125).model_dump()
    model = build_model(params, 3)
    units = [u for u in store.units("l-1") if u.family == "cnn"]
    for u in units:
        buffer = io.BytesIO()
        torch.save({"state_dict": model.state_dict(), "params": params}, buffer)
        path = Path("campaigns/l-1/models") / f"cnn-{u.fold}.pt"
        written = atomic_write_bytes(settings.artifacts / path, buffer.getvalue())
        artifact = Artifact(path.as_posix(), "model", written.sha256, written.size, "l-1", u.key)
        finish(
            store,
            u.key,
            0.5 + 0.1 * u.fold,
            [0, 1, 2, 0],
            [0, 1, 2, 1],
            fold=u.fold,
            artifacts=[artifact],
        )

    data = build_report_data(store, "l-1", manifest=manifest, settings=settings)
    lime = data.lime
    assert lime is not None, data.lime_note
    assert lime.note == "" and lime.num_samples == 20
    assert lime.unit_key == units[1].key  # the fold with the better validation accuracy
    assert len(lime.items) == 3  # one per class
    assert [i.true_label for i in lime.items] == ["A", "B", "C"]
    for item in lime.items:
        assert item.overlay.shape == item.image.shape == (32, 32, 3)
        assert 0.0 <= item.probability <= 1.0
    files = write_report(data, tmp_path / "report")
    assert "lime-cnn.png" in files.figures

    off = build_report_data(store, "l-1")  # no manifest or settings: said, not crashed
    assert off.lime is None and "model files" in off.lime_note

    # a campaign whose folds were copied from l-1 (`submit --reuse`) has no model files
    # of its own: LIME uses the model of the unit each fold was copied from
    reused = make_store(sqlite_url, spec, "l-2")
    for u in (u for u in reused.units("l-2") if u.family == "cnn"):
        source = next(s for s in units if s.fold == u.fold)
        extra = {"reused_from": source.key}
        finish(reused, u.key, 0.5 + 0.1 * u.fold, [0, 1, 2, 0], [0, 1, 2, 1], extra=extra)
    again = build_report_data(reused, "l-2", manifest=manifest, settings=settings)
    assert again.lime is not None, again.lime_note
    assert again.lime.unit_key.startswith("l-2/") and len(again.lime.items) == 3


# --------------------------------------------------------------------------- what the report names


def _bare_manifest() -> Manifest:
    entries = tuple(
        Entry(f"t{i}.jpg", "ABC"[i % 3], "test", f"/data/t{i}.jpg", NO_FOLD) for i in range(3)
    )
    return Manifest(("A", "B", "C"), entries, "fp", "k" * 16, 64, 16)


def test_best_unit_and_lime_take_the_same_fold(
    store: Store, sqlite_url: str, tmp_path: Path
) -> None:
    cnn, first, second = cnn_points(store)
    vals = {0: 0.625, 1: 2 / 3, 2: 2 / 3}  # f1 and f2 tie: the lowest fold wins
    for u in cnn:
        val = vals[u.fold] if u.params_hash == second else 0.5
        finish(store, u.key, val, [0, 1, 2, 0], [0, 1, 2, 1], fold=u.fold)
    settings = Settings(
        home=tmp_path, broker_url="memory://", database_url=sqlite_url, artifacts=tmp_path / "art"
    )
    # no model files: LIME names the fold it would explain, and says what is missing
    data = build_report_data(store, "r-1", manifest=_bare_manifest(), settings=settings)

    best = f"r-1/cnn/{second}/f1"
    (row,) = [r for r in data.families if r.family == "cnn"]
    assert row.best_key == best
    assert row.val_acc == pytest.approx(mean(vals.values()))  # the point's mean
    assert data.lime is not None and data.lime.unit_key == best
    assert "no model file" in data.lime.note
    assert f"| cnn | `{best}` |" in render_markdown(data)

    folds = [u for u in cnn if u.params_hash == second]
    results = store.results("r-1")
    assert best_fold(folds[::-1], results).key == best  # plan order does not decide a tie


def test_svm_table_leaves_the_shared_projection_width_to_a_note(sqlite_url: str) -> None:
    spec = {"name": "s", "folds": 2, "dataset": {"kind": "synthetic"}}
    spec["svm"] = {"n_components": [20, 50], "C": [1.0, 10.0]}
    store = make_store(sqlite_url, spec, "s-1")
    for u in store.units("s-1"):
        if u.family == "svm":
            k = u.params["n_components"]
            extra = {"explained_variance": k / 100, "pca_components": 50, "pca_fitted": False}
            finish(store, u.key, 0.6, [0, 1, 2, 0], [0, 1, 2, 1], fold=u.fold, extra=extra)

    data = build_report_data(store, "s-1")
    (exp,) = data.experiments
    assert all(set(p.extras) == {"explained_variance"} for p in exp.points)
    assert exp.note is not None and "50 components wide" in exp.note

    table = render_markdown(data).split("### SVM", 1)[1].split("\n## ", 1)[0]
    header, *rows = [[c.strip() for c in line.strip("|").split("|")] for line in first_table(table)]
    assert "n_component" in header and "Explained variance" in header
    assert not any("pca" in h.lower() for h in header)
    column = header.index("n_component")
    assert {r[column].strip("*") for r in rows} == {"20", "50"}  # the point's own
    assert "shared by the whole grid and 50 components wide" in table


def test_reused_units_are_named_and_not_counted_as_this_campaigns_work(sqlite_url: str) -> None:
    spec = {"name": "u", "folds": 2, "dataset": {"kind": "synthetic"}, "cnn": {"folds": 2}}
    first = make_store(sqlite_url, spec, "u-1")
    second = make_store(sqlite_url, spec, "u-2")
    for cid, store in (("u-1", first), ("u-2", second)):
        store.record_artifact(Artifact(f"campaigns/{cid}/m.json", "manifest", "a" * 64, 1, cid))
    sources = [u for u in first.units("u-1") if u.family == "cnn"]
    for u in sources:
        finish(first, u.key, 0.6 + 0.1 * u.fold, [0, 1, 2, 0], [0, 1, 2, 1], fold=u.fold)
    reused = second.reuse_finished("u-2")
    assert sorted(reused.values()) == sorted(u.key for u in sources)
    (shard,) = [u for u in second.units("u-2") if u.family == "preprocess"]
    deliver(second, shard.key, worker="cpu@h", task_id=None)
    second.finish_unit(shard.key, Outcome(fit_seconds=0.1))

    data = build_report_data(second, "u-2")
    copied = {u.key: u.reused_from for u in data.units if u.family == "cnn"}
    assert copied == reused
    (row,) = data.families
    assert row.reused == 2 and row.succeeded == 2
    assert row.fit_seconds == 0.0  # the sources' 2 x 2.0 s were spent in u-1
    assert row.best_key == next(k for k, s in reused.items() if s.endswith("/f1"))
    assert [b.family for b in data.timeline] == ["preprocess"]

    md = render_markdown(data)
    assert (
        "Units: 2 model units (0 failed, 2 reused from earlier campaigns), "
        "plus 1 preprocessing shard and the report\n" in md
    )
    assert "| 2/2 (2 reused) |" in md
    units = md.split("\n## Units\n", 1)[1]
    assert units.splitlines()[1].endswith("| Error | Reused from |")
    for key, source in reused.items():
        assert next(line for line in units.splitlines() if key in line).endswith(f"`{source}` |")
    assert "2 units were reused from earlier campaigns" in units
    efficiency = md.split("\n## Efficiency\n", 1)[1].split("\n## ", 1)[0]
    assert "2 model units were reused from earlier campaigns" in efficiency
    assert "4.0 s in all" in efficiency and "not counted below" in efficiency
    # only the preprocessing shard ran here: no parallelism to speak of, no fit time
    assert "in parallel" not in efficiency
    assert "no model unit ran in this campaign" in efficiency
    families = md.split("\n## Model families\n", 1)[1].split("\n## ", 1)[0]
    (cnn_row,) = [line for line in families.splitlines() if line.startswith("| cnn |")]
    assert cnn_row.endswith("| — |") and "0.0 s" not in cnn_row
    assert "— where every unit was reused" in families


def test_created_at_is_the_same_utc_text_on_every_store(store_url: str) -> None:
    store = make_store(store_url, SPEC)
    data = build_report_data(store, "r-1")
    created = store.get_campaign("r-1").created_at
    assert data.created_at.endswith("+00:00")  # SQLite hands the time back without its zone
    expected = created.replace(tzinfo=created.tzinfo or UTC).astimezone(UTC)
    assert f"Created: {expected:%Y-%m-%d %H:%M:%S} UTC\n" in render_markdown(data)


def test_utc_iso_reads_naive_times_as_utc() -> None:
    naive = datetime(2026, 11, 28, 4, 49, 47, 123456)
    aware = datetime(2026, 11, 28, 5, 49, 47, tzinfo=timezone(timedelta(hours=1)))
    assert utc_iso(naive) == utc_iso(aware) == "2026-11-28T04:49:47+00:00"


def _rows(data, family: str) -> tuple[list[str], list[list[str]]]:
    title = {"cnn": "CNN", "svm": "SVM", "rf": "RF"}[family]
    section = render_markdown(data).split(f"### {title}", 1)[1].split("\n#", 1)[0]
    header, *rows = [
        [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
        for line in first_table(section)
    ]
    return header, rows[1:] if rows and set(rows[0][0]) <= set("-:") else rows


def first_table(markdown: str) -> list[str]:
    """The lines of the first table in ``markdown`` (an experiment's main table; the
    "best point per value" tables follow it)."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [line for line in lines[start:end] if line.startswith("| ")]  # no separator


def test_resumed_folds_are_named_and_counts_are_not_averaged(sqlite_url: str) -> None:
    spec = {"name": "c", "folds": 5, "dataset": {"kind": "synthetic"}, "cnn": {"folds": 5}}
    store = make_store(sqlite_url, spec, "c-1")
    cnn = [u for u in store.units("c-1") if u.family == "cnn"]
    for u in cnn:
        # fold 0 was cancelled at epoch 9 and resumed; fold 3 stopped early at 17
        extra = {
            "device": "cpu",
            "epochs": 17 if u.fold == 3 else 20,
            "resumed_from_epoch": 9 if u.fold == 0 else 0,
        }
        finish(store, u.key, 0.6, [0, 1, 2, 0], [0, 1, 2, 1], fold=u.fold, extra=extra)

    data = build_report_data(store, "c-1")
    (point,) = data.experiments[0].points
    assert point.extras == {"epochs": "17–20", "resumed_from_epoch": "f0 from 9"}
    header, (row,) = _rows(data, "cnn")
    assert row[header.index("Resumed")] == "f0 from 9"  # not the mean, 1.8
    assert row[header.index("Epochs")] == "17–20"  # not 19.4

    # no fold resumed: no column at all; the folds agree on the epochs: the count
    again = make_store(sqlite_url, spec, "c-2")
    for u in (u for u in again.units("c-2") if u.family == "cnn"):
        extra = {"epochs": 20, "resumed_from_epoch": 0}
        finish(again, u.key, 0.6, [0, 1, 2, 0], [0, 1, 2, 1], fold=u.fold, extra=extra)
    (point,) = build_report_data(again, "c-2").experiments[0].points
    assert point.extras == {"epochs": 20.0}


def test_svm_rows_follow_the_sweep_and_say_who_fitted_the_pca(sqlite_url: str) -> None:
    spec = {"name": "s", "folds": 2, "dataset": {"kind": "synthetic"}}
    spec["svm"] = {"folds": 1, "n_components": [20, 50], "C": [1.0, 10.0]}
    store = make_store(sqlite_url, spec, "s-1")
    svm = [u for u in store.units("s-1") if u.family == "svm"]
    # the plan sends the widest points first; the first of them fits the shared PCA
    assert [u.params["n_components"] for u in svm] == [50, 50, 20, 20]
    for i, u in enumerate(svm):
        k = u.params["n_components"]
        extra = {
            "explained_variance": k / 100 + 0.0001234,
            "pca_components": 50,
            "pca_fitted": i == 0,
            "support_vectors": 90 + i,
        }
        finish(store, u.key, 0.6, [0, 1, 2, 0], [0, 1, 2, 1], fold=u.fold, extra=extra)

    data = build_report_data(store, "s-1")
    (exp,) = data.experiments
    # the campaign file's order: n_components 20 then 50, C 1 then 10 within each
    assert [(p.params["n_components"], p.params["C"]) for p in exp.points] == [
        (20, 1.0),
        (20, 10.0),
        (50, 1.0),
        (50, 10.0),
    ]
    header, rows = _rows(data, "svm")
    assert [r[header.index("n_component")] for r in rows] == ["20", "20", "50", "50"]
    assert [r[header.index("C")] for r in rows] == ["1", "10", "1", "10"]
    fitted = header.index("Fitted the PCA")
    assert [r[fitted] for r in rows] == ["—", "—", "yes", "—"]
    assert [r[header.index("Explained variance")] for r in rows] == [
        "0.2001",
        "0.2001",
        "0.5001",
        "0.5001",
    ]
    table = render_markdown(data).split("### SVM", 1)[1].split("\n## ", 1)[0]
    assert "its Training time includes that fit" in table


def test_rf_oob_note_only_with_augmentation(sqlite_url: str) -> None:
    extra = {
        "oob_score": 0.5,
        "oob_grouped": 0.5,
        "oob_grouped_coverage": 1.0,
        "train_seconds": 0.7,
        "trees": 100,
    }
    for cid, augment in (("p-1", "none"), ("p-2", "rotate_flip")):
        spec = {"name": "p", "folds": 2, "dataset": {"kind": "synthetic"}}
        spec["rf"] = {"augment": augment, "n_estimators": [100, 300]}
        store = make_store(sqlite_url, spec, cid)
        for u in (u for u in store.units(cid) if u.family == "rf"):
            finish(store, u.key, 0.6, [0, 1, 2, 0], [0, 1, 2, 1], fold=u.fold, extra=extra)
        data = build_report_data(store, cid)
        (exp,) = data.experiments
        header, rows = _rows(data, "rf")
        assert "Grouped OOB coverage" in header and "Oob grouped coverage" not in header
        assert "Unit time" in header and "Tree fit time" in header
        assert [r[0] for r in rows] == ["100", "300"]  # the file's order, not the plan's
        if augment == "none":
            assert exp.note is None
            assert "Why the OOB score" not in render_markdown(data)
        else:
            assert exp.note and "siblings" in exp.note


def test_rf_columns_that_repeat_the_table_are_left_out(sqlite_url: str) -> None:
    """Trees equal to n_estimators and kept features equal to the pixel features (no
    selection, no PCA) say nothing the table does not: no column; a PCA's width stays."""
    spec = {"name": "k", "folds": 2, "dataset": {"kind": "synthetic"}}
    spec["rf"] = {"n_estimators": [10, 20]}
    store = make_store(sqlite_url, spec, "k-1")
    for u in (u for u in store.units("k-1") if u.family == "rf"):
        trees = u.params["n_estimators"]
        extra = {"trees": trees, "pixel_features": 768, "kept_features": 768, "oob_score": 0.5}
        finish(store, u.key, 0.6, [0, 1, 2, 0], [0, 1, 2, 1], fold=u.fold, extra=extra)
    header, _ = _rows(build_report_data(store, "k-1"), "rf")
    assert "Pixel features" in header and "oob_score_" in header
    assert "Trees" not in header and "Kept features" not in header
    spec["rf"] = {"n_estimators": 10, "pca_components": [8, 16]}
    store = make_store(sqlite_url, spec, "k-2")
    for u in (u for u in store.units("k-2") if u.family == "rf"):
        extra = {"trees": 10, "pixel_features": 768, "kept_features": u.params["pca_components"]}
        finish(store, u.key, 0.6, [0, 1, 2, 0], [0, 1, 2, 1], fold=u.fold, extra=extra)
    header, rows = _rows(build_report_data(store, "k-2"), "rf")
    assert "Kept features" in header and "Trees" not in header
    assert [r[header.index("Kept features")] for r in rows] == ["8", "16"]


@pytest.mark.parametrize("winner", ["none", "rotate_flip"])
def test_a_best_point_chosen_by_an_inflated_oob_says_so(sqlite_url: str, winner: str) -> None:
    """Under validation = "oob" an augmented point's OOB accuracy is inflated by its
    copies' siblings: the best model's line says so when such a point won, only then."""
    spec = {"name": "o", "folds": 2, "dataset": {"kind": "synthetic"}, "validation": "oob"}
    spec["rf"] = {"augment": ["none", "rotate_flip"]}
    store = make_store(sqlite_url, spec, "o-1")
    for u in (u for u in store.units("o-1") if u.family == "rf"):
        acc = 0.8 if u.params["augment"] == winner else 0.6
        finish(store, u.key, acc, [0, 1, 2, 0], [0, 1, 2, 1], fold=u.fold)
    data = build_report_data(store, "o-1")
    (family,) = data.families
    assert family.params["augment"] == winner
    header = next(line for line in render_markdown(data).splitlines() if "Best model" in line)
    said = "which its augmented training set inflates (see the note under the RF table)"
    assert data.best_inflated == (winner != "none") == (said in header)


def test_a_forest_in_tree_shards_counts_its_shards_time(sqlite_url: str) -> None:
    """A sharded forest's own unit only merges: its time, and its family's, include its
    shards' units (a reused shard's in the unit's time, not in this campaign's work)."""
    spec = {"name": "s", "folds": 2, "dataset": {"kind": "synthetic"}}
    spec["rf"] = {"n_estimators": [10, 20], "tree_shards": 2}
    store = make_store(sqlite_url, spec, "s-1")
    units = store.units("s-1")
    shards = [u for u in units if u.family == "rf_shard"]
    merges = [u for u in units if u.family == "rf"]
    assert len(shards) == 2 * len(merges) == 4  # 2 points, one fold each
    for u in shards:  # 2.0 s each, one of them copied from an earlier campaign
        reused = {"reused_from": "s-0/x"} if u is shards[0] else {}
        finish(store, u.key, 0.6, [0, 1, 2, 0], [0, 1, 2, 1], fold=u.fold, extra=reused)
    extra = {"train_seconds": 0.7, "train_wall_seconds": 0.4, "trees": 10}
    for u in merges:  # 2.0 s each
        finish(store, u.key, 0.6, [0, 1, 2, 0], [0, 1, 2, 1], fold=u.fold, extra=extra)
    data = build_report_data(store, "s-1")
    (family,) = data.families
    assert family.fit_seconds == pytest.approx(2 * 2.0 + 3 * 2.0)
    (exp,) = data.experiments
    assert [p.seconds for p in exp.points] == [pytest.approx(6.0)] * 2
    assert "its shards' units and the merge together" in render_markdown(data)


def test_units_line_counts_the_other_units(store: Store) -> None:
    data = build_report_data(store, "r-1")
    assert data.other_units == {"preprocess": 1, "report": 1}
    assert (
        "- Units: 7 model units (0 failed), plus 1 preprocessing shard and the report\n"
        in render_markdown(data)
    )


def test_preprocessing_line_says_where_the_images_were_decoded(sqlite_url: str) -> None:
    store = Store(sqlite_url)
    store.upgrade()
    campaign = parse_campaign(
        {
            **SPEC,
            "preprocessing": {"size": 64, "decoder": "nvjpeg"},
            "cnn": {**SPEC["cnn"], "image_size": 64},  # at most the cached images' size
        },
        source="test",
    )
    store.create_campaign(
        "pp-1",
        name="pp",
        source="r.toml",
        digest=campaign.digest(),
        spec=campaign.model_dump(mode="json"),
        classes=["A", "B", "C"],
        units=plan_units("pp-1", campaign, [(0, 4), (4, 8), (8, 10), (10, 12)]),
    )
    shards = [u.key for u in store.units("pp-1") if u.family == "preprocess"]
    extras = [
        {"images": 4, "reused": False, "decoded_on": "cuda:0 (NVIDIA H200)", "by_nvjpeg": 3},
        {"images": 4, "reused": False},  # written before shards counted their decoders
        {"images": 2, "reused": True},
    ]
    for key, extra in zip(shards, extras, strict=False):  # the fourth shard never ran
        deliver(store, key, worker="gpu@h", task_id=None)
        store.finish_unit(key, Outcome(fit_seconds=0.1, extra=extra))
    data = build_report_data(store, "pp-1")
    assert data.preprocessing is not None
    assert data.preprocessing.by_nvjpeg == {"cuda:0 (NVIDIA H200)": 3}
    assert (data.preprocessing.by_opencv, data.preprocessing.cached) == (5, 2)
    assert (
        "- Preprocessing: 10 images to 64×64 in 4 shards: 3 by nvJPEG on cuda:0 (NVIDIA H200), "
        "5 by OpenCV on the CPU, 2 found in the cache "
        "(1 of the shards without a result)\n" in render_markdown(data)
    )


def _standardize_sweep(sqlite_url: str, acc: dict[bool, float], extra=None) -> Store:
    """An SVM campaign sweeping ``standardize`` over both values, every unit finished
    with ``acc[standardize]`` (and ``extra(standardize)``)."""
    spec = {"name": "s", "folds": 2, "dataset": {"kind": "synthetic"}}
    spec["svm"] = {"standardize": [False, True]}
    store = make_store(sqlite_url, spec, "s-1")
    for u in store.units("s-1"):
        if u.family == "svm":
            on = bool(u.params.get("standardize"))
            more = extra(on) if extra else None
            finish(store, u.key, acc[on], [0, 1, 2, 0], [0, 1, 2, 1], fold=u.fold, extra=more)
    return store


def test_svm_standardize_sweep_shows_both_values_and_the_gamma_scale_taken(
    sqlite_url: str,
) -> None:
    def extra(on: bool) -> dict[str, float]:
        return {"explained_variance": 0.8, "gamma_scale": 1.07e-5 if on else 1.7e-4}

    store = _standardize_sweep(sqlite_url, {False: 0.6, True: 0.6}, extra)
    header, rows = _rows(build_report_data(store, "s-1"), "svm")
    assert [r[header.index("Standardized")] for r in rows] == ["False", "True"]
    assert [r[header.index("γ scale ≈")] for r in rows] == ["0.00017", "1.07e-05"]


def test_a_best_point_at_a_default_left_out_of_its_hash_still_names_it(
    sqlite_url: str,
) -> None:
    store = _standardize_sweep(sqlite_url, {False: 0.9, True: 0.6})  # the default point wins
    data = build_report_data(store, "s-1")
    [family] = data.families
    assert family.params["standardize"] is False
    svm_units = [s for s in data.units if s.family == "svm"]
    assert sorted(s.params["standardize"] for s in svm_units) == [False, True]


def test_sweep_plots_show_test_accuracy_where_the_units_have_it() -> None:
    """The study plots test score against a sweep (Fig. 16, 17)."""
    from shared.report import PointRow
    from workers.reporting.figures import sweep_plots

    def row(depth: int, test: float | None) -> PointRow:
        return PointRow(
            f"c/rf/{depth}", {"max_depth": depth}, 1, 1, 1.0, 0.7, None, test, 1.0,
            {"oob_score": 0.8},
        )  # fmt: skip

    (plot,) = sweep_plots("rf", [row(8, 0.6), row(16, 0.65)])
    assert plot.series == {
        "val acc": [0.7, 0.7],
        "test acc": [0.6, 0.65],
        "oob_score": [0.8, 0.8],
    }
    (unlabelled,) = sweep_plots("rf", [row(8, None), row(16, None)])
    assert "test acc" not in unlabelled.series


def test_a_feature_selection_sweep_shows_no_oob_and_says_why() -> None:
    """Forests after feature selection record no OOB score (their selection saw every
    row's label): the sweep plot has no OOB series and the table says why its cells
    are empty; a point without selection keeps its OOB figures."""
    from shared.report import Experiment, PointRow
    from workers.reporting.figures import sweep_plots

    def row(scaling: float | None, oob: float | None) -> PointRow:
        extras = {"oob_score": oob, "oob_grouped": oob, "oob_grouped_coverage": oob}
        return PointRow(
            f"c/rf/{scaling}", {"select_scaling": scaling}, 1, 1, 1.0, 0.7, None, 0.6, 1.0,
            extras,
        )  # fmt: skip

    selected = [row(0.5, None), row(2.0, None)]
    (plot,) = sweep_plots("rf", selected)
    assert plot.series == {"val acc": [0.7, 0.7], "test acc": [0.6, 0.6]}
    (mixed,) = sweep_plots("rf", [row(None, 0.8), *selected])
    assert mixed.series["oob_score"] == [0.8, None, None]
    from shared.report.document import Para, Table, _experiment_blocks

    blocks = _experiment_blocks(Experiment("rf", "Random forest", selected, selected[0].key))
    (table,) = [b for b in blocks if isinstance(b, Table)]
    assert table.header[-3:] == ("oob_score_", "Grouped OOB", "Grouped OOB coverage")
    assert [row[-3:] for row in table.rows] == [["—", "—", "—"]] * 2
    notes = " ".join(str(part) for b in blocks if isinstance(b, Para) for part in b.parts)
    assert "No OOB scores after feature selection: its forest was fitted on every" in notes
    # from the store, a sweep of selection alone has no OOB figure at all: no OOB columns,
    # and the same note
    bare = [dataclasses.replace(p, extras={}) for p in selected]
    blocks = _experiment_blocks(Experiment("rf", "Random forest", bare, bare[0].key))
    (table,) = [b for b in blocks if isinstance(b, Table)]
    assert not [name for name in table.header if "OOB" in name or "oob" in name]
    notes = " ".join(str(part) for b in blocks if isinstance(b, Para) for part in b.parts)
    assert "No OOB scores after feature selection" in notes


def test_a_grouped_oob_no_row_got_keeps_its_column(sqlite_url: str) -> None:
    """Few trees on an augmented set: no row got a grouped OOB vote, so every point's
    score is None; its column stays beside the coverage (0), where a column empty for
    every point is otherwise left out."""
    spec = {"name": "x", "folds": 2, "dataset": {"kind": "synthetic"}, "rf": {}}
    store = make_store(sqlite_url, spec, "x-1")
    (rf,) = [u for u in store.units("x-1") if u.family == "rf"]
    extra = {"oob_score": 0.8, "oob_grouped": None, "oob_grouped_coverage": 0.0}
    finish(store, rf.key, 0.6, [0, 1, 2, 0], [0, 1, 2, 1], extra=extra)
    (point,) = build_report_data(store, "x-1").experiments[0].points
    assert point.extras == {"oob_score": 0.8, "oob_grouped": None, "oob_grouped_coverage": 0.0}
    assert list(point.extras)[:3] == ["oob_score", "oob_grouped", "oob_grouped_coverage"]


def _svm_grid_store(url: str, campaign_id: str, cs: list[float]) -> Store:
    """A campaign of one SVM grid, 2 x len(cs) points on one fold, all finished."""
    spec = {"name": "g", "folds": 2, "dataset": {"kind": "synthetic"}}
    spec["svm"] = {"n_components": [4, 8], "C": cs, "folds": 1}
    store = make_store(url, spec, campaign_id)
    for i, u in enumerate(store.units(campaign_id)):
        if u.family == "svm":
            finish(store, u.key, 0.3 + (i % 7) / 20, [0, 1, 2, 0], [0, 1, 2, 1], fold=u.fold)
    return store


def _queries_of_a_report(store: Store, campaign_id: str) -> tuple[int, ReportData]:
    from sqlalchemy import event

    count = [0]

    def counted(*_args, **_kwargs) -> None:
        count[0] += 1

    event.listen(store.engine, "before_cursor_execute", counted)
    try:
        data = build_report_data(store, campaign_id)
    finally:
        event.remove(store.engine, "before_cursor_execute", counted)
    return count[0], data


def test_store_queries_do_not_grow_with_the_grid(tmp_path: Path) -> None:
    """A grid of hundreds of points is read in as many queries as one of a few: nothing
    is read per point or per unit (only the best point's predictions)."""
    small = _svm_grid_store(f"sqlite:///{tmp_path / 'small.db'}", "g-small", [1.0, 2.0])
    big = _svm_grid_store(
        f"sqlite:///{tmp_path / 'big.db'}", "g-big", [0.01 * 1.1**i for i in range(120)]
    )
    few, small_data = _queries_of_a_report(small, "g-small")
    many, big_data = _queries_of_a_report(big, "g-big")
    assert len(small_data.experiments[0].points) == 4
    assert len(big_data.experiments[0].points) == 240
    assert many == few
    assert len(big_data.sweeps) == len(small_data.sweeps) == 2  # one per swept parameter
    assert big_data.curves == [] and len(big_data.confusions) == 1

    # the page shows the best points, the CSV every one; its files are recorded
    files = write_report(big_data, tmp_path / "report")
    table = render_markdown(big_data).split("### SVM", 1)[1].split("\n## ", 1)[0]
    rows = first_table(table)[1:]  # below the header
    assert len(rows) == MAX_POINT_ROWS and rows[0].startswith("| **")  # the best first
    assert f"The {MAX_POINT_ROWS} best of 240 points by validation accuracy" in table
    assert set(files.tables) == {"experiments-svm.csv", "units.csv"}
    for name in files.tables:  # a header and a row per point, per unit
        assert len(files.tables[name].path.read_text().splitlines()) == 1 + 240


def test_a_report_run_again_drops_what_the_earlier_run_wrote_and_it_did_not(
    cached_campaign,  # noqa: ANN001
) -> None:
    """After `orchard resume` the report is written again: a table it no longer cuts
    (units.csv), or the curve of a point no longer best, must not stay beside it; what
    the report never recorded (a user's notes, a file being written) is not touched."""
    from shared.artifacts import atomic_write_text
    from shared.plan import REPORT
    from workers.tasks import report as report_task
    from workers.tasks.base import UnitContext

    store, settings, manifest = cached_campaign(
        "r-1", {"rf": {"n_estimators": 5}, "report": {"lime": False}}
    )
    unit = next(u for u in store.units("r-1") if u.stage == REPORT)
    folder = settings.artifacts / "campaigns" / "r-1" / "report"
    for name in ("units.csv", "report.md"):  # what the earlier run wrote and recorded
        written = atomic_write_text(folder / name, "earlier\n")
        path = written.path.relative_to(settings.artifacts).as_posix()
        store.record_artifact(
            Artifact(path, "report", written.sha256, written.size, "r-1", unit.key)
        )
    (folder / "notes.txt").write_text("mine\n")  # a user's, never recorded
    (folder / ".report.md.1234.tmp").write_text("")  # another delivery, writing
    context = UnitContext(store.get_campaign("r-1"), unit, store, settings, _manifest=manifest)
    outcome = report_task.report.run.__wrapped__(context)
    assert list(outcome.scratch) == ["campaigns/r-1/report/units.csv"]
    recorded = {a.path for a in outcome.artifacts}
    assert "campaigns/r-1/report/report.md" in recorded
    assert not recorded & set(outcome.scratch)


def test_a_search_s_choices_are_shown_as_chosen_never_averaged(sqlite_url: str) -> None:
    spec = {"name": "s", "folds": 3, "dataset": {"kind": "synthetic"}}
    spec["svm"] = {"folds": 3, "n_components": [20, 50], "search": {"C": [1.0, 2.0]}}
    store = make_store(sqlite_url, spec, "s-1")
    for u in (u for u in store.units("s-1") if u.family == "svm"):
        # the 50-component point's folds disagree on C; the 20-component point's agree
        c = 2.0 if u.params["n_components"] == 20 or u.fold == 1 else 1.0
        extra = {"best_C": c, "best_gamma": "scale", "search_cv_acc": 0.5 + u.fold / 10}
        finish(store, u.key, 0.6, [0, 1, 2, 0], [0, 1, 2, 1], fold=u.fold, extra=extra)

    data = build_report_data(store, "s-1")
    extras = {p.params["n_components"]: p.extras for p in data.experiments[0].points}
    assert extras[20] == {"best_C": 2.0, "best_gamma": "scale", "search_cv_acc": 0.6}
    assert extras[50]["best_C"] == "f0 1, f1 2, f2 1"  # not the mean, 1.33
    header, rows = _rows(data, "svm")
    assert {"Best C", "Best γ", "Search CV acc"} <= set(header)
    by_k = {r[header.index("n_component")].strip("*"): r for r in rows}
    assert by_k["20"][header.index("Best C")] == "2"
    assert by_k["50"][header.index("Best γ")] == "scale"
    assert by_k["20"][header.index("Search CV acc")] == "60.000%"  # as the other accuracies
    # the choices come first among the extras, beside the accuracies, as in the study
    assert header.index("Best C") < header.index("Search CV acc") == len(header) - 1
    # the best point's model ran with what its folds chose, where they agree
    (svm,) = data.families
    chosen = 2.0 if svm.params["n_components"] == 20 else None
    assert svm.params.get("C") == chosen and svm.params["gamma"] == "scale"


def test_a_report_on_a_worker_with_another_artifact_folder_fails_like_every_unit(
    tmp_path: Path,
) -> None:
    """Without its manifest a report still writes what the store holds, but not on a
    worker that has no folder for the campaign at all: there its ORCHARD_ARTIFACTS is
    another folder, and a report written there would be lost to the submitter."""
    from types import SimpleNamespace

    from shared.preprocess import PreprocessError
    from workers.tasks.report import _manifest_or_none

    missing = PreprocessError("…/manifest.json: the campaign's manifest is not there; …")

    def manifest() -> Manifest:
        raise missing

    ctx = SimpleNamespace(
        manifest=manifest,
        campaign_dir=tmp_path / "campaigns" / "c-1",
        campaign=SimpleNamespace(id="c-1"),
    )
    with pytest.raises(PreprocessError) as failed:
        _manifest_or_none(ctx)
    assert failed.value is missing
    assert not ctx.campaign_dir.exists()  # nothing made in the wrong folder
    ctx.campaign_dir.mkdir(parents=True)  # the campaign's folder, its manifest damaged
    assert _manifest_or_none(ctx) is None


def test_a_tied_vote_of_folds_without_probabilities_goes_to_the_best_fold(
    sqlite_url: str,
) -> None:
    """An SVM predicts labels only: a tie between its folds' votes goes to the class of
    the fold with the best validation accuracy, not to the lowest class, and the
    blend's note says so; the confusion matrix is of that vote."""
    spec = {**SPEC, "folds": 2, "cnn": {"folds": 2}, "svm": {"folds": 2, "C": 1.0}}
    store = make_store(sqlite_url, spec, "t-1")
    labels = [2, 1, 2, 0]
    for u in store.units("t-1"):
        if u.family == "svm":  # fold 1 validates better; they disagree on t1 and t4
            preds = [0, 1, 2, 0] if u.fold == 0 else [2, 1, 2, 2]
            finish(store, u.key, 0.5 + 0.2 * u.fold, preds, labels, fold=u.fold)
    data = build_report_data(store, "t-1")
    vote = next(b for b in data.blends if b.name == "SVM 2-fold vote")
    assert vote.note == "ties go to fold 1 (best validation)"
    assert vote.test_acc == pytest.approx(3 / 4)  # t1 by fold 1: right; t4: wrong
    assert data.confusions["svm"].matrix == [[0, 0, 1], [0, 1, 0], [0, 0, 2]]


def test_the_confusion_matrix_is_of_the_blend_the_campaign_asks_for(sqlite_url: str) -> None:
    spec = {**SPEC, "folds": 2, "cnn": {"folds": 2}, "blend": {"method": "mean"}}
    store = make_store(sqlite_url, spec, "m-1")
    labels = [0, 1, 2, 1]
    probs = {  # the folds tie on t4 (0 vs 1) by vote; the mean says 1
        0: [[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.45, 0.4, 0.15]],
        1: [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.2, 0.2, 0.6], [0.05, 0.9, 0.05]],
    }
    for u in store.units("m-1"):
        if u.family == "cnn":
            preds = np.argmax(probs[u.fold], axis=1).tolist()
            finish(store, u.key, 0.9, preds, labels, probs=probs[u.fold], fold=u.fold)
    data = build_report_data(store, "m-1")
    assert [b.name for b in data.blends if b.family == "cnn"] == ["CNN 2-fold mean"]
    cnn = data.confusions["cnn"]
    assert cnn.title == "CNN 2-fold mean (test)"
    assert cnn.matrix == [[1, 0, 0], [0, 2, 0], [0, 0, 1]]


def test_families_are_in_the_study_s_order_whatever_the_plan_s() -> None:
    assert in_study_order(["svm", "rf", "svm", "cnn", "rf"]) == ["cnn", "svm", "rf"]
    assert in_study_order(["rf", "svm"]) == ["svm", "rf"]


def test_a_point_with_a_failed_fold_ranks_after_the_points_without(store: Store) -> None:
    """Point 2's weaker fold failed: its mean over its two better folds (0.8) is higher
    than point 1's over all three (0.7), yet point 1 is the best, as GridSearchCV ranks a
    point whose score is NaN; no note, since the best point has every fold."""
    cnn, first, second = cnn_points(store)
    labels = [0, 1, 2, 1]
    for u in cnn:
        if u.params_hash == first:
            finish(store, u.key, 0.7, [0, 1, 2, 0], labels, fold=u.fold)
        elif u.fold == 2:
            deliver(store, u.key, worker="w@h", task_id=None)
            store.fail_unit(u.key, "RuntimeError: lost")
        else:
            finish(store, u.key, 0.8, [0, 1, 2, 0], labels, fold=u.fold)
    data = build_report_data(store, "r-1")
    cnn_row = next(r for r in data.families if r.family == "cnn")
    assert cnn_row.best_key.startswith(f"r-1/cnn/{first}/")
    assert cnn_row.val_acc == pytest.approx(0.7) and cnn_row.best_folds == (3, 3)
    (exp,) = [e for e in data.experiments if e.family == "cnn"]
    ranked = sorted(exp.points, key=lambda p: p.rank, reverse=True)
    assert [p.key for p in ranked] == [f"r-1/cnn/{first}", f"r-1/cnn/{second}"]
    assert "Ranked on the folds that succeeded" not in render_markdown(data)


def test_a_best_point_with_fewer_folds_than_planned_says_so(store: Store) -> None:
    """Every point lost a fold: they are ranked on the folds that succeeded (point 2's
    two at 0.8 over point 1's two at 0.7), and the Model families section says so."""
    cnn, first, second = cnn_points(store)
    labels = [0, 1, 2, 1]
    for u in cnn:
        if u.fold == 2:
            deliver(store, u.key, worker="w@h", task_id=None)
            store.fail_unit(u.key, "RuntimeError: lost")
        else:
            acc = 0.7 if u.params_hash == first else 0.8
            finish(store, u.key, acc, [0, 1, 2, 0], labels, fold=u.fold)
    data = build_report_data(store, "r-1")
    cnn_row = next(r for r in data.families if r.family == "cnn")
    assert cnn_row.best_key.startswith(f"r-1/cnn/{second}/")
    assert cnn_row.best_folds == (2, 3)
    section = render_markdown(data).split("## Model families", 1)[1].split("\n## ", 1)[0]
    assert (
        "Ranked on the folds that succeeded: CNN's best point has 2 of its 3 folds (the "
        "others did not succeed, and no point has more that did: see Units), so its mean "
        "is over fewer folds than planned: compare it with care." in section
    )


def test_the_description_reaches_the_report_on_one_line(tmp_path: Path) -> None:
    spec = {**SPEC, "description": "Mangoes,\n  graded by vote."}
    store = make_store(f"sqlite:///{tmp_path / 'd.db'}", spec)
    assert build_report_data(store, "r-1").description == "Mangoes, graded by vote."
    store.dispose()


def test_a_failed_shard_is_listed_with_its_error_before_the_units_it_failed(
    store: Store,
) -> None:
    """The model units say only "preprocessing failed: <shard>": the shard's own error
    (the image that changed, the manifest not there) is what the reader needs."""
    [shard] = [u.key for u in store.units("r-1") if u.family == "preprocess"]
    deliver(store, shard, worker="cpu-1@h", task_id=None)
    assert store.fail_unit(shard, "…/train/A/000.png: changed since the campaign was submitted")
    models = [u.key for u in store.units("r-1") if u.family in ("cnn", "svm")]
    store.fail_units([(key, f"preprocessing failed: {shard}") for key in models])
    data = build_report_data(store, "r-1")
    assert [u.key for u in data.failed_shards] == [shard]
    text = render_markdown(data)
    listed = text[text.index("## Failed units") :]
    assert listed.index(f"`{shard}` (FAILED on cpu-1@h)") < listed.index(f"`{models[0]}`")
    assert "000.png: changed since the campaign was submitted" in listed
    # more failures than the page lists: units.csv has every error, the shard's too
    many = replace(data, failed_shards=data.failed_shards * 20)
    assert "000.png: changed since" in table_csvs(many)["units.csv"]
