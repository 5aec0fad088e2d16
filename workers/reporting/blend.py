"""Blends: a family's best point's folds by vote and by mean probability, the families
of ``[blend] families`` together, and the best of them by out-of-fold validation accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from db.store import Prediction, Result, Store, Unit
from shared.metrics import (
    accuracy,
    accuracy_interval,
    majority_vote,
    mean_probabilities,
)
from shared.report import BlendRow, FamilyRow
from workers.reporting.units import best_fold


@dataclass
class Predicted:
    """One model's (or blend's) predictions on a split, aligned by image id."""

    ids: list[str]
    labels: np.ndarray
    preds: np.ndarray
    probs: np.ndarray | None  # (samples, classes), None when a member had none

    def take(self, ids: Sequence[str]) -> Predicted:
        index = {image_id: i for i, image_id in enumerate(self.ids)}
        rows = np.array([index[i] for i in ids], dtype=np.int64)
        return Predicted(
            list(ids),
            self.labels[rows],
            self.preds[rows],
            None if self.probs is None else self.probs[rows],
        )


def _predicted(rows: Sequence[Prediction]) -> Predicted:
    probs = None
    if rows and all(p.probs is not None for p in rows):
        probs = np.array([p.probs for p in rows], dtype=np.float64)
    return Predicted(
        [p.image_id for p in rows],
        np.array([p.label for p in rows], dtype=np.int64),
        np.array([p.pred for p in rows], dtype=np.int64),
        probs,
    )


def _common(members: Sequence[Predicted]) -> list[str]:
    ids = set(members[0].ids)
    for member in members[1:]:
        ids &= set(member.ids)
    return sorted(ids)


def blend_members(
    members: Sequence[Predicted],
    n_classes: int,
    tie_break: int | None = None,
    *,
    ties_by_mean: bool = False,
) -> tuple[Predicted, Predicted | None]:
    """(vote, probability mean) of ``members`` over the images they all predicted.

    The mean is None when a member has no probabilities (an SVM predicts labels only).
    A tied vote goes, with ``ties_by_mean`` and every member's probabilities, to the
    tied class of highest mean probability; else to the prediction of the member
    ``tie_break`` names; else to the lowest class.
    """
    ids = _common(members)
    aligned = [m.take(ids) for m in members]
    labels = aligned[0].labels
    if not ids:
        empty = np.empty(0, dtype=np.int64)
        return Predicted([], empty, empty, None), None
    stacked = np.stack([m.preds for m in aligned])
    referee = None if tie_break is None else aligned[tie_break].preds
    probs = None
    if all(m.probs is not None for m in aligned):
        probs = np.stack([m.probs for m in aligned])  # type: ignore[misc]
    scores = probs.mean(0) if ties_by_mean and probs is not None else None
    vote = Predicted(ids, labels, majority_vote(stacked, n_classes, referee, scores), None)
    if probs is None:
        return vote, None
    averaged = Predicted(ids, labels, mean_probabilities(probs), probs.mean(0))
    return vote, averaged


def _pooled(store: Store, units: Sequence[Unit], split: str) -> Predicted:
    """Each unit's predictions on ``split``, pooled (first unit wins a repeated image)."""
    rows: dict[str, Prediction] = {}
    for unit in units:
        for p in store.predictions(unit.key, split):
            rows.setdefault(p.image_id, p)
    return _predicted([rows[k] for k in sorted(rows)])


@dataclass
class FamilyBlend:
    family: str
    members: int
    test_vote: Predicted
    test_mean: Predicted | None
    oof: Predicted  # pooled out-of-fold validation predictions
    val_acc: float | None  # the best point's mean validation accuracy
    ties: str = ""  # how the vote settles a tie, for the report's note


def family_blend(
    store: Store,
    best: Sequence[Unit],
    results: dict[str, Result],
    n_classes: int,
    val: float | None,
) -> FamilyBlend:
    """The best point's folds blended on the test split. A tied vote (two folds of
    four for one class, two for another) goes to the tied class of highest mean
    probability, or, for a family without probabilities, to the best fold's class."""
    per_member = [_predicted(store.predictions(u.key, "test")) for u in best]
    referee = best_fold(best, results)
    vote, averaged = blend_members(
        per_member, n_classes, list(best).index(referee), ties_by_mean=True
    )
    if averaged is not None:
        ties = "ties by mean probability"
    else:
        ties = f"ties go to fold {referee.fold} (best validation)"
    oof = _pooled(store, best, "val")
    return FamilyBlend(best[0].family, len(best), vote, averaged, oof, val, ties)


def _acc(p: Predicted | None) -> float | None:
    return None if p is None or not len(p.ids) else accuracy(p.labels, p.preds)


def _labelled(p: Predicted | None) -> set[str]:
    """The images of ``p`` with a label: those its accuracy is over."""
    if p is None:
        return set()
    return {i for i, label in zip(p.ids, p.labels.tolist(), strict=True) if label >= 0}


def blend_row(
    name: str,
    family: str,
    method: str,
    members: int,
    test: Predicted | None,
    val: Predicted | None,
    note: str = "",
) -> BlendRow:
    labelled = len(_labelled(val)) if val is not None else None
    tested = len(_labelled(test)) if test is not None else 0
    return BlendRow(
        name,
        family,
        method,
        members,
        _acc(test),
        _acc(val),
        note,
        labelled or None,
        test_images=tested or None,
        test_ci=accuracy_interval(test.labels, test.preds) if tested else None,
    )


@dataclass(frozen=True)
class BestBlend:
    name: str | None
    by: str  # "val" | "test"
    compared_on: int | None = None  # the images all blends' validation covers, if fewer
    compared_acc: float | None = None  # the best's accuracy on them
    tied_with: tuple[str, ...] = ()
    compared: dict[str, float] = field(default_factory=dict)  # every blend's on them


def inflated(
    spec: dict[str, Any],
    families: Sequence[FamilyRow],
    blends: Sequence[BlendRow],
    best: str | None,
) -> bool:
    """The best blend was chosen by out-of-bag accuracy and one of its families' best
    point trained on augmented copies, whose siblings inflate that accuracy."""
    if spec.get("validation") != "oob" or best is None:
        return False
    family = next(b.family for b in blends if b.name == best)
    augmented = {r.family for r in families if r.params.get("augment") not in (None, "none")}
    return bool(set(family.split("+")) & augmented)


def choose_best(blends: Sequence[BlendRow], oof: dict[str, Predicted]) -> BestBlend:
    """The headline model: the best validation accuracy, never the test set's, which
    then measures it (test accuracy only when no blend has validation predictions).

    Blends whose validation covers different images (a 5-fold CNN beside one-fold
    forests, a fold that failed) are compared on the images every one of them covers,
    and where none is common, each on its own. Equals: the first row, the others named.
    """
    by = "val" if any(b.val_acc is not None for b in blends) else "test"
    scored = [b for b in blends if (b.val_acc if by == "val" else b.test_acc) is not None]
    if not scored:
        return BestBlend(None, by)
    score = {b.name: (b.val_acc if by == "val" else b.test_acc) or 0.0 for b in scored}
    compared_on = None
    if by == "val":
        covers = [_labelled(oof.get(b.name)) for b in scored]
        common = set.intersection(*covers)
        if common and any(len(c) > len(common) for c in covers):
            ids = sorted(common)
            for b in scored:
                taken = oof[b.name].take(ids)
                score[b.name] = accuracy(taken.labels, taken.preds) or 0.0
            compared_on = len(common)
    best = max(scored, key=lambda b: score[b.name])  # the first of equals
    tied = tuple(b.name for b in scored if b is not best and score[b.name] == score[best.name])
    compared_acc = score[best.name] if compared_on is not None else None
    compared = score if compared_on is not None else {}
    return BestBlend(best.name, by, compared_on, compared_acc, tied, compared)
